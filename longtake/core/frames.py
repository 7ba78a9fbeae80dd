"""Drawn frames in their smallest exact form: one channel of palette indices.

A job's control frames (a pose's skeletons drawn from keypoints, the bundled model's plan silhouettes, a
grey mask video) have few colours, and at studio sizes they are the bulk of what a window call carries (a
720p Wan-Animate window's pose frames: 224 MB as RGB). `Indexed` keeps them as (n, H, W) uint8 indices into
a (k, 3) uint8 palette: a third of the bytes, bit for bit the same frames (`rgb()`). The engine holds them
so, slices them per window (`frames[i:j]`, `frames[[i, j, ...]]`) and sends the slice; the worker expands it
(`np.asarray(frames)`) before the model sees it. Frames that are not drawn (a pose video: compression noise)
stay RGB: `as_indexed` keeps what it cannot make exact as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRAY = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # palette of the grey levels
CHUNK = 64  # frames looked at (`as_indexed`) or expanded (`update_digest`) at a time


@dataclass(frozen=True, eq=False)
class Indexed:
    """(n, H, W) uint8 `index` into a (k, 3) uint8 `palette`: n RGB frames (module docstring)."""

    index: np.ndarray
    palette: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, frames) -> "Indexed":
        """Some of the frames (a slice or a list of indices), sharing the palette."""
        if isinstance(frames, (int, np.integer)):
            frames = slice(frames, frames + 1)
        return Indexed(self.index[frames], self.palette)

    def __iter__(self):
        for i in range(len(self)):
            yield self.palette[self.index[i]]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.index.shape, 3)

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.palette.nbytes

    def rgb(self) -> np.ndarray:
        """The frames, (n, H, W, 3) uint8."""
        return self.palette[self.index]

    def __array__(self, dtype=None, copy=None):
        rgb = self.rgb()
        return rgb if dtype is None else rgb.astype(dtype)


def as_indexed(frames):
    """RGB frames (n, H, W, 3) uint8 as `Indexed` when that is exact for a cheap check: grey frames (every
    pixel R = G = B: a plan's silhouettes, a grey mask) index the grey palette; anything else (or an
    `Indexed` already, or None) is returned as it is."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        return frames
    for i in range(0, len(frames), CHUNK):  # chunks: no whole-clip temporaries
        part = frames[i:i + CHUNK]
        if not (np.array_equal(part[..., 0], part[..., 1]) and np.array_equal(part[..., 1], part[..., 2])):
            return frames
    return Indexed(np.ascontiguousarray(frames[..., 0]), GRAY)


def update_digest(digest, frames) -> None:
    """Feed a hash the frames' RGB bytes, C order (the same digest whether they are `Indexed` or RGB)."""
    if not isinstance(frames, Indexed):
        digest.update(np.ascontiguousarray(frames).tobytes())
        return
    for i in range(0, len(frames), CHUNK):
        digest.update(frames[i:i + CHUNK].rgb().tobytes())
