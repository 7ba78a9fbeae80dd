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
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) of the four moves
# the clips' objects and motions (models/planner.py draws its paths with the same numbers)
SPEED = (0.85, 1.05)  # pixels per frame at 16 px: a window of 16 frames crosses the frame about once
RADIUS = (0.17, 0.21)  # of the frame: 2.7-3.4 px at 16 px, 1.6x the area of model v1's objects
BOUNCE_PERIOD = (10.0, 16.0)  # frames per hop
BOUNCE_HEIGHT = (0.35, 0.5)  # of the frame
FLOOR = 0.78  # of the frame: a bounce's floor
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
    motion = pick(MOTIONS)
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
    speed = rng.uniform(*SPEED) * size / 16
    if motion in DIRECTIONS:
        dx, dy = DIRECTIONS[motion]
        xs, ys = (x0 + dx * speed * t) % size, (y0 + dy * speed * t) % size
    elif motion == "bouncing":
        period = rng.uniform(*BOUNCE_PERIOD)
        floor, height = size * FLOOR, size * rng.uniform(*BOUNCE_HEIGHT)
        phase = rng.uniform(0, 1)
        xs = np.full(frames, rng.uniform(size * 0.25, size * 0.75))
        ys = floor - height * np.abs(np.sin(np.pi * (t / period + phase)))
    elif motion == "still":
        xs, ys = np.full(frames, rng.uniform(size * 0.2, size * 0.8)), np.full(frames, rng.uniform(size * 0.2, size * 0.8))
    else:
        raise ValueError(f"motion: got {motion!r}, expected one of {', '.join(MOTIONS)}")
    return np.stack([xs, ys], axis=1)


def coverage(shape: str, cx: float, cy: float, r: float, size: int, ss: int = 4, height: int | None = None
          ) -> np.ndarray:
    """Anti-aliased coverage (height, size) in [0, 1] (height: size unless given), drawn with wrap-around
    copies."""
    height = size if height is None else height
    X, Y = np.meshgrid((np.arange(size * ss) + 0.5) / ss, (np.arange(height * ss) + 0.5) / ss)
    cover = np.zeros_like(X, dtype=bool)
    near = lambda c, n: [o for o in (-n, 0, n) if -r - 1 <= c + o <= n + r + 1]  # copies that can show
    for ox in near(cx, size):
        for oy in near(cy, height):
            dx, dy = X - (cx + ox), Y - (cy + oy)
            if shape == "ball":
                cover |= dx**2 + dy**2 <= r**2
            elif shape == "square":
                cover |= (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
            elif shape == "triangle":  # pointing up
                cover |= (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
            else:
                raise ValueError(f"shape: got {shape!r}, expected one of {', '.join(SHAPES)}")
    return cover.reshape(height, ss, size, ss).mean(axis=(1, 3))


def render_clip(spec: ClipSpec, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, size, size, 3) uint8."""
    radius = size * rng.uniform(*RADIUS)
    path = trajectory(spec.motion, frames, size, rng)
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.array(OBJECT_COLORS[spec.color], dtype=np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f, (x, y) in enumerate(path):
        m = coverage(spec.shape, x, y, radius, size)[..., None]
        out[f] = np.round(bg * (1 - m) + fg * m).astype(np.uint8)
    return out


def sample_batch(rng: np.random.Generator, batch: int, frames: int, size: int) -> tuple[np.ndarray, list[str]]:
    specs = all_specs()
    picks = [specs[i] for i in rng.integers(0, len(specs), batch)]
    clips = np.stack([render_clip(s, frames, size, rng) for s in picks])  # (B, F, H, W, 3)
    return clips, [s.caption for s in picks]


# --- silhouettes: the "pose" of an object, for the bundled model's control branch (train_control.py) ---
PATHS = ("circle", "eight", "line", "wander")  # free paths beside the captioned motions


def free_path(kind: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, 2) centre positions of a path no caption names, at the captioned motions' speed (about one
    pixel per frame at 16 px), wrapping around the edges: a circle, a figure eight, a line in any direction,
    or a wander (a random walk whose heading turns slowly)."""
    t = np.arange(frames, dtype=np.float64)
    speed = rng.uniform(0.6, 1.1) * size / 16
    cx, cy = rng.uniform(0, size, 2)
    if kind in ("circle", "eight"):
        radius = size * rng.uniform(0.15, 0.32)
        omega = speed / radius * rng.choice([-1, 1])  # angular speed for that path speed
        phase = rng.uniform(0, 2 * np.pi)
        if kind == "circle":
            xs, ys = cx + radius * np.cos(omega * t + phase), cy + radius * np.sin(omega * t + phase)
        else:
            xs, ys = cx + radius * np.sin(omega * t + phase), cy + radius / 2 * np.sin(2 * (omega * t + phase))
    elif kind == "line":
        angle = rng.uniform(0, 2 * np.pi)
        xs, ys = cx + speed * np.cos(angle) * t, cy + speed * np.sin(angle) * t
    elif kind == "wander":
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.25, frames))
        xs = cx + np.concatenate([[0], np.cumsum(speed * np.cos(heading[:-1]))])
        ys = cy + np.concatenate([[0], np.cumsum(speed * np.sin(heading[:-1]))])
    else:
        raise ValueError(f"path: got {kind!r}, expected one of {', '.join(PATHS)}")
    return np.stack([xs % size, ys % size], axis=1)


def render_path(spec: ClipSpec, path: np.ndarray, radius: float, size: int, mask_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The object along `path` (in pixels of `size`): (frames, size, size, 3) uint8 frames and its
    silhouettes, (frames, mask_size, mask_size) uint8 white (255) on black, drawn at `mask_size` (the
    control frames' resolution) from the same path."""
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.array(OBJECT_COLORS[spec.color], dtype=np.float64)
    frames = np.empty((len(path), size, size, 3), dtype=np.uint8)
    masks = np.empty((len(path), mask_size, mask_size), dtype=np.uint8)
    k = mask_size / size
    for f, (x, y) in enumerate(path):
        m = coverage(spec.shape, x, y, radius, size)[..., None]
        frames[f] = np.round(bg * (1 - m) + fg * m).astype(np.uint8)
        masks[f] = np.where(coverage(spec.shape, x * k, y * k, radius * k, mask_size, ss=2) >= 0.5, 255, 0)
    return frames, masks


def sample_control_batch(rng: np.random.Generator, batch: int, frames: int, size: int,
                         mask_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Clips with their silhouettes and captions: half follow a captioned motion (captioned with or without
    its motion words, at random), half a free path (captioned without motion words, "a red ball on a blue
    background"). Returns (B, F, size, size, 3) uint8, (B, F, mask_size, mask_size) uint8, captions."""
    specs = all_specs()
    clips, masks, captions = [], [], []
    for i in rng.integers(0, len(specs), batch):
        spec = specs[i]
        radius = size * rng.uniform(0.15, 0.24)
        if rng.uniform() < 0.5:
            path, named = trajectory(spec.motion, frames, size, rng), rng.uniform() < 0.5
        else:
            path, named = free_path(PATHS[rng.integers(len(PATHS))], frames, size, rng), False
        clip, mask = render_path(spec, path, radius, size, mask_size)
        clips.append(clip)
        masks.append(mask)
        captions.append(spec.caption if named else f"a {spec.color} {spec.shape} on a {spec.background} background")
    return np.stack(clips), np.stack(masks), captions
