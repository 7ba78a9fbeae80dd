"""Procedural training clips for the bundled default model: coloured shapes moving over plain backgrounds.

Each clip is (frames, size, size, 3) uint8 with a caption built from the same words the eval uses:
"a red ball moving right on a blue background". Motion wraps around the frame edges, so "moving
right" can go on for a minute. Shapes are drawn with 4x supersampling for smooth edges.
Knows numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBJECT_COLORS = {"red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 70, 235), "yellow": (240, 215, 30)}
BACKGROUNDS = {"black": (12, 12, 12), "white": (240, 240, 240), "gray": (120, 120, 120), "blue": (30, 50, 160)}
SHAPES = ("ball", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "bouncing", "still")
WORDS = sorted(set("a on background moving bouncing still".split()) | set(OBJECT_COLORS) | set(BACKGROUNDS)
               | set(SHAPES) | {"left", "right", "up", "down"})


@dataclass(frozen=True)
class ClipSpec:
    color: str
    shape: str
    motion: str
    background: str

    @property
    def caption(self) -> str:
        phrase = {"bouncing": "bouncing", "still": "still"}.get(self.motion, f"moving {self.motion}")
        return f"a {self.color} {self.shape} {phrase} on a {self.background} background"


def parse_caption(text: str) -> ClipSpec | None:
    """The words of a caption back to a ClipSpec (None if it is not one of ours)."""
    words = text.lower().replace(",", " ").split()
    pick = lambda options: next((w for w in words if w in options), None)
    color = pick(OBJECT_COLORS)
    # the background colour is the word right before "background"
    bg = words[words.index("background") - 1] if "background" in words[1:] else None
    if bg == color and words.count(color) == 1:
        color = None
    motion = pick({"left", "right", "up", "down", "bouncing", "still"})
    shape = pick(SHAPES)
    if None in (color, bg, motion, shape) or bg not in BACKGROUNDS:
        return None
    return ClipSpec(color, shape, motion, bg)


def all_specs() -> list[ClipSpec]:
    return [ClipSpec(c, s, m, b) for c in OBJECT_COLORS for s in SHAPES for m in MOTIONS for b in BACKGROUNDS
            if not (c == "blue" and b == "blue")]


def trajectory(motion: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, 2) centre positions (x, y) in pixels; wraps around for the four directions."""
    x0, y0 = rng.uniform(0, size, 2)
    t = np.arange(frames, dtype=np.float64)
    # about 1 pixel per frame at 16 px (a window of 16 frames crosses the frame once): motion the model can
    # see at its resolution; half that speed (model v1) was learned as "still" or not at all
    speed = rng.uniform(0.85, 1.05) * size / 16
    if motion in ("left", "right", "up", "down"):
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
        xs, ys = (x0 + dx * speed * t) % size, (y0 + dy * speed * t) % size
    elif motion == "bouncing":
        period = rng.uniform(10, 16)
        floor, height = size * 0.78, size * rng.uniform(0.35, 0.5)
        phase = rng.uniform(0, 1)
        xs = np.full(frames, rng.uniform(size * 0.25, size * 0.75))
        ys = floor - height * np.abs(np.sin(np.pi * (t / period + phase)))
    elif motion == "still":
        xs, ys = np.full(frames, rng.uniform(size * 0.2, size * 0.8)), np.full(frames, rng.uniform(size * 0.2, size * 0.8))
    else:
        raise ValueError(f"motion: got {motion!r}, expected one of {', '.join(MOTIONS)}")
    return np.stack([xs, ys], axis=1)


def _mask(shape: str, cx: float, cy: float, r: float, size: int, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage (size, size) in [0, 1], drawn with wrap-around copies."""
    coords = (np.arange(size * ss) + 0.5) / ss
    X, Y = np.meshgrid(coords, coords)
    cover = np.zeros_like(X, dtype=bool)
    near = lambda c: [o for o in (-size, 0, size) if -r - 1 <= c + o <= size + r + 1]  # copies that can show
    for ox in near(cx):
        for oy in near(cy):
            dx, dy = X - (cx + ox), Y - (cy + oy)
            if shape == "ball":
                cover |= dx**2 + dy**2 <= r**2
            elif shape == "square":
                cover |= (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
            elif shape == "triangle":  # pointing up
                cover |= (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
            else:
                raise ValueError(f"shape: got {shape!r}, expected one of {', '.join(SHAPES)}")
    return cover.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render_clip(spec: ClipSpec, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, size, size, 3) uint8."""
    radius = size * rng.uniform(0.17, 0.21)  # 2.7-3.4 px at 16 px: 1.6x the area of model v1's objects
    path = trajectory(spec.motion, frames, size, rng)
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.array(OBJECT_COLORS[spec.color], dtype=np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f, (x, y) in enumerate(path):
        m = _mask(spec.shape, x, y, radius, size)[..., None]
        out[f] = np.round(bg * (1 - m) + fg * m).astype(np.uint8)
    return out


def sample_batch(rng: np.random.Generator, batch: int, frames: int, size: int) -> tuple[np.ndarray, list[str]]:
    specs = all_specs()
    picks = [specs[i] for i in rng.integers(0, len(specs), batch)]
    clips = np.stack([render_clip(s, frames, size, rng) for s in picks])  # (B, F, H, W, 3)
    return clips, [s.caption for s in picks]
