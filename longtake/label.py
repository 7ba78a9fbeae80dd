"""The visible "AI-generated" label (#17): white text on an opaque black box, drawn on delivered frames.

Fonts ship with longtake, never taken from the machine: GNU Unifont's 8x16 / 16x16 bitmaps for every glyph of
Unicode's Basic Multilingual Plane (CJK included: "AI生成"), scaled by whole pixels, and a 3x5 pixel font of
our own for ASCII in frames too narrow for Unifont's 8 px per letter. The text is at least 5 % of the frame's
short side high (the bar GB 45438-2025 sets for a video's explicit label): Unifont at ceil(5 % of the short
side / 16) px per font pixel when the text fits the width that way, else the 3x5 font (letters upper-cased)
at ceil(5 % / 5); on frames whose short side is under 107 px (where Unifont's 16 px would be over 15 % of
it) the 3x5 font comes first. A text that fits neither way is refused before any work (`layout` raises `LabelError`):
the default "AI-generated" needs a frame 104 px wide for Unifont and 52 px for the 3x5 font; on a narrower
frame it becomes "AI" (3x5, from 11 px), and a request whose own text does not fit is refused.

Drawn pixels are pure black and white (neutral chroma survives H.264's 4:2:0), so the box is legible on any
background and `detect` finds it again in a decoded file.
"""

from __future__ import annotations

import functools
import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNIFONT = Path(__file__).parent / "assets" / "unifont-15.0.01.hex.gz"
MIN_HEIGHT_SHARE = 0.05  # text height / the frame's short side, at least
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
MODES = ("start", "always", "none")  # the request's `label`: the first LABEL_SECONDS, every frame, no label
LABEL_SECONDS = 2.0
DEFAULT_TEXT = "AI-generated"
SHORT_TEXT = "AI"  # the default text's stand-in on frames too narrow for it (under 52 px)
DEFAULT_POSITION = "bottom-right"
MAX_TEXT = 40
SMALL_FRAME = 107  # short side under which the 3x5 font comes first (Unifont's 16 px would be over 15 %)

_TINY = {  # the 3x5 font, rows top to bottom, '#' on
    "A": (".#.", "#.#", "###", "#.#", "#.#"), "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": (".##", "#..", "#..", "#..", ".##"), "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"), "F": ("###", "#..", "##.", "#..", "#.."),
    "G": (".##", "#..", "#.#", "#.#", ".##"), "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "J": ("..#", "..#", "..#", "#.#", ".#."),
    "K": ("#.#", "#.#", "##.", "#.#", "#.#"), "L": ("#..", "#..", "#..", "#..", "###"),
    "M": ("#.#", "###", "#.#", "#.#", "#.#"), "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": (".#.", "#.#", "#.#", "#.#", ".#."), "P": ("##.", "#.#", "##.", "#..", "#.."),
    "Q": (".#.", "#.#", "#.#", "##.", ".##"), "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": (".##", "#..", ".#.", "..#", "##."), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"), "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "W": ("#.#", "#.#", "###", "###", "#.#"), "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."), "Z": ("###", "..#", ".#.", "#..", "###"),
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("##.", "..#", ".#.", "#..", "###"), "3": ("##.", "..#", ".#.", "..#", "##."),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "##.", "..#", "##."),
    "6": (".##", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "##."),
    "-": ("...", "...", "###", "...", "..."), ".": ("...", "...", "...", "...", ".#."),
    ":": ("...", ".#.", "...", ".#.", "..."), "/": ("..#", "..#", ".#.", "#..", "#.."),
    "(": (".#.", "#..", "#..", "#..", ".#."), ")": (".#.", "..#", "..#", "..#", ".#."),
    "!": (".#.", ".#.", ".#.", "...", ".#."), "?": ("##.", "..#", ".#.", "...", ".#."),
    ",": ("...", "...", "...", ".#.", "#.."), "'": (".#.", ".#.", "...", "...", "..."),
    "+": ("...", ".#.", "###", ".#.", "..."), "_": ("...", "...", "...", "...", "###"),
    " ": ("...", "...", "...", "...", "..."),
}


class LabelError(ValueError):
    """A label that cannot be drawn: names the field, the value and what was expected."""

    def __init__(self, field: str, value, expected: str):
        self.field, self.value, self.expected = field, value, expected
        super().__init__(f"{field}: got {value!r}, expected {expected}")


def _tiny_glyph(ch: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in _TINY[ch]], dtype=bool)


@functools.lru_cache(maxsize=1)
def _unifont() -> dict[int, str]:
    """Code point -> the glyph's hex bitmap (32 hex digits: 8x16, 64: 16x16)."""
    glyphs = {}
    with gzip.open(UNIFONT, "rt", encoding="ascii") as f:
        for line in f:
            code, _, bits = line.strip().partition(":")
            glyphs[int(code, 16)] = bits
    return glyphs


def _unifont_glyph(ch: str) -> np.ndarray | None:
    bits = _unifont().get(ord(ch))
    if bits is None:
        return None
    width = len(bits) * 4 // 16  # bits per row: 8 or 16
    rows = [int(bits[i:i + width // 4], 16) for i in range(0, len(bits), width // 4)]
    return np.array([[(r >> (width - 1 - x)) & 1 for x in range(width)] for r in rows], dtype=bool)


def _text_bitmap(text: str, font: str) -> np.ndarray | None:
    """The text as one bool bitmap at 1 px per font pixel, or None when a character has no glyph."""
    if font == "unifont":
        glyphs = [_unifont_glyph(ch) for ch in text]
        if any(g is None for g in glyphs):
            return None
        return np.concatenate(glyphs, axis=1)
    upper = text.upper()
    if any(ch not in _TINY for ch in upper):
        return None
    parts = []
    for i, ch in enumerate(upper):
        if i:
            parts.append(np.zeros((5, 1), dtype=bool))  # 1 px between letters
        parts.append(_tiny_glyph(ch))
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class Layout:
    """Where and how a label sits on a width x height frame: the box's corner and the text's pixels."""
    text: str
    position: str
    font: str  # "unifont" or "3x5"
    scale: int  # frame pixels per font pixel
    x: int  # the box's top-left corner
    y: int
    pad: int
    mask: np.ndarray  # bool (h, w): the text's pixels, scaled

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the black box, the text inside it with `pad` around."""
        h, w = self.mask.shape
        return self.x, self.y, self.x + w + 2 * self.pad, self.y + h + 2 * self.pad

    def draw(self, frames: np.ndarray) -> None:
        """Draw the label on uint8 frames (n, H, W, 3), in place."""
        x0, y0, x1, y1 = self.box
        frames[:, y0:y1, x0:x1] = 0
        h, w = self.mask.shape
        region = frames[:, y0 + self.pad:y0 + self.pad + h, x0 + self.pad:x0 + self.pad + w]
        region[:, self.mask] = 255

    def to_dict(self) -> dict:
        x0, y0, x1, y1 = self.box
        return {"text": self.text, "position": self.position, "font": self.font, "scale": self.scale,
                "box": [x0, y0, x1, y1], "text_height_px": int(self.mask.shape[0])}


def check_text(text) -> str:
    """The label text as given, or LabelError: 1 to MAX_TEXT characters of one line, each with a glyph."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT or "\n" in text:
        raise LabelError("label_text", text, f"1 to {MAX_TEXT} characters on one line")
    missing = sorted({ch for ch in text if _unifont_glyph(ch) is None})
    if missing:
        raise LabelError("label_text", text, f"characters longtake's font has (GNU Unifont, Unicode's Basic "
                         f"Multilingual Plane); it has none for {''.join(missing)!r}")
    return text


def layout(text: str, position: str, width: int, height: int) -> Layout:
    """The label's layout on a width x height frame, or LabelError when it does not fit (the default text
    falls back to SHORT_TEXT first)."""
    check_text(text)
    if position not in POSITIONS:
        raise LabelError("label_position", position, f"one of {', '.join(POSITIONS)}")
    try:
        return _layout(text, position, width, height)
    except LabelError:
        if text != DEFAULT_TEXT:
            raise
        return _layout(SHORT_TEXT, position, width, height)


def _layout(text: str, position: str, width: int, height: int) -> Layout:
    short = min(width, height)
    margin = max(1, round(0.02 * short))
    fonts = (("unifont", 16), ("3x5", 5))
    if short < SMALL_FRAME:  # Unifont's 16 px would cover too much of a small frame: the 3x5 font first
        fonts = fonts[::-1]
    for font, cell in fonts:
        bitmap = _text_bitmap(text, font)
        if bitmap is None:
            continue
        scale = max(1, math.ceil(MIN_HEIGHT_SHARE * short / cell))
        pad = scale
        mask = np.kron(bitmap, np.ones((scale, scale), dtype=bool))
        h, w = mask.shape
        if w + 2 * pad + 2 * margin > width or h + 2 * pad + 2 * margin > height:
            continue
        x = margin if position.endswith("left") else width - margin - w - 2 * pad
        y = margin if position.startswith("top") else height - margin - h - 2 * pad
        return Layout(text, position, font, scale, x, y, pad, mask)
    tiny = _text_bitmap(text, "3x5")
    need = ("" if tiny is None else f"; the 3x5 font needs {tiny.shape[1] + 2 + 2 * max(1, round(0.02 * short))} px")
    raise LabelError("label_text", text, f"a text whose label fits a {width}x{height} frame (at least "
                     f"{MIN_HEIGHT_SHARE:.0%} of the short side high): shorter text or a wider frame{need}")


def frames_labelled(mode: str, fps: float, frames: int) -> int:
    """How many opening frames carry the label: LABEL_SECONDS' worth (all of a shorter clip) for "start",
    all for "always", none for "none"."""
    if mode == "none":
        return 0
    if mode == "always":
        return frames
    return min(frames, math.ceil(LABEL_SECONDS * fps - 1e-9))


def labelled_span(mode: str, fps: float, new_start: int, new_frames: int, total: int) -> tuple[int, int]:
    """The output frames [start, end) that carry the label: every frame for "always"; for "start", the
    opening LABEL_SECONDS of the new frames, which begin at `new_start` (after an extended clip's frames,
    passed through) and number `new_frames`; none for "none"."""
    if mode == "always":
        return 0, total
    return new_start, new_start + frames_labelled(mode, fps, new_frames)


def detect(frame: np.ndarray, lay: Layout) -> dict:
    """Whether a decoded uint8 (H, W, 3) frame carries the label `lay` describes: the text's pixels bright,
    the box's others dark. Returns {"present", "text_mean", "box_mean"} (luma, 0-255)."""
    luma = np.asarray(frame, dtype=np.float32).mean(axis=2)
    x0, y0, x1, y1 = lay.box
    if y1 > luma.shape[0] or x1 > luma.shape[1]:
        return {"present": False, "text_mean": None, "box_mean": None}
    box = luma[y0:y1, x0:x1]
    text = np.zeros(box.shape, dtype=bool)
    h, w = lay.mask.shape
    text[lay.pad:lay.pad + h, lay.pad:lay.pad + w] = lay.mask
    text_mean, box_mean = float(box[text].mean()), float(box[~text].mean())
    return {"present": text_mean > 150 and box_mean < 80 and text_mean - box_mean > 100,
            "text_mean": round(text_mean, 1), "box_mean": round(box_mean, 1)}
