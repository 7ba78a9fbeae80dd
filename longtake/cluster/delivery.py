"""Delivery: the output frames of a job, in order, through a chain of small links into the MP4.

    frames (as generated, or an input clip's as read)
      -> FramesHash   frames_sha256: the frames as generated, before any mark (the determinism oracle)
      -> Tap          `on_frames(first, frames)`: a caller's view of the frames as generated
      -> Label        the visible label, on the frames of its span (label.labelled_span)
      -> Watermark    the invisible mark, on the new frames only (an input clip keeps whatever it carries)
      -> Writer       the MP4 (video.VideoWriter: delivered_sha256, then the AIGC tags and integrity code)
      -> Previews     the frames the contact sheet samples

Each link is a callable `link(first, frames, new) -> frames` with one job: `first` is the output index of
the chunk's first frame, `new` whether the frames were made here (not an extended or lead-into clip's).
`Delivery` assembles the chain once from the job and is a context manager: leaving it normally finishes
the MP4 (renamed into place) and writes the contact sheet; leaving it on an error leaves no file behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from longtake.label import labelled_span
from longtake.video import VideoWriter, contact_sheet, preview_indices
from longtake.watermark import Embedder, payload_of


class FramesHash:
    """frames_sha256: the frames as generated, before the label and the watermark."""

    def __init__(self):
        self.sha256 = hashlib.sha256()

    def __call__(self, first: int, frames: np.ndarray, new: bool) -> np.ndarray:
        self.sha256.update(np.ascontiguousarray(frames))
        return frames


class Tap:
    """A caller's `on_frames(first, frames)`, on the frames as generated."""

    def __init__(self, on_frames):
        self.on_frames = on_frames

    def __call__(self, first: int, frames: np.ndarray, new: bool) -> np.ndarray:
        self.on_frames(first, frames)
        return frames


class Label:
    """The visible label (`layout`, label.py) on the output frames [span[0], span[1])."""

    def __init__(self, layout, span: tuple[int, int]):
        self.layout, self.span = layout, span

    def __call__(self, first: int, frames: np.ndarray, new: bool) -> np.ndarray:
        lo, hi = max(self.span[0] - first, 0), min(self.span[1] - first, len(frames))
        if hi > lo:
            frames = frames.copy()
            self.layout.draw(frames[lo:hi])
        return frames


class Watermark:
    """The invisible watermark naming the job (watermark.py), on the frames made here."""

    def __init__(self, produce_id: str, width: int, height: int):
        self.embedder = Embedder(payload_of(produce_id), width, height)

    def __call__(self, first: int, frames: np.ndarray, new: bool) -> np.ndarray:
        return self.embedder.mark(frames) if new else frames


class Writer:
    """The MP4: every frame written (video.VideoWriter)."""

    def __init__(self, writer: VideoWriter):
        self.writer = writer

    def __call__(self, first: int, frames: np.ndarray, new: bool) -> np.ndarray:
        self.writer.write(frames)
        return frames


class Previews:
    """The frames a contact sheet of `total` frames samples (video.preview_indices), as written."""

    def __init__(self, total: int):
        self.wanted, self.kept = set(preview_indices(total)), []

    def __call__(self, first: int, frames: np.ndarray, new: bool) -> np.ndarray:
        self.kept.extend((first + k, frames[k].copy()) for k in range(len(frames)) if first + k in self.wanted)
        return frames


class Delivery:
    """The chain of a job's output (module docstring). `write(frames, new)` sends the output's next frames
    through it; `frames_written`, `frames_sha256`, `delivered_sha256`, `labelled` after."""

    def __init__(self, job, provenance, on_frames=None):
        req, inputs = job.request, job.inputs
        self.job, self.provenance = job, provenance
        self.produce_id = provenance.produce_id_for(req.model_dump(mode="json"))
        # the visible label: on the first seconds of the new frames, wherever they are in the file (after an
        # extended clip's), or on every frame
        first_new = inputs.before.frames if inputs.before is not None and inputs.include else 0
        self.span = labelled_span(req.label, req.fps, first_new, job.new_frames, job.output_frames) \
            if job.label is not None else (0, 0)
        self.hash = FramesHash()
        self.previews = Previews(job.output_frames) if req.preview else None
        sign = (lambda src, dst: provenance.sign(src, dst, Path(req.out).name)) if provenance.c2pa else None
        self.video = VideoWriter(req.out, job.width, job.height, req.fps, tags=self._tags, sign=sign)
        self.links = [self.hash, *([Tap(on_frames)] if on_frames is not None else []),
                      *([Label(job.label, self.span)] if job.label is not None else []),
                      Watermark(self.produce_id, job.width, job.height), Writer(self.video),
                      *([self.previews] if self.previews is not None else [])]

    def _tags(self, stream_sha256: str) -> dict[str, str]:
        req = self.job.request
        label = {"mode": req.label, "text": req.label_text, "position": req.label_position, "frames": self.span}
        return self.provenance.tags(request=req.model_dump(mode="json"), frames_sha256=self.frames_sha256,
                                    delivered_sha256=self.video.sha256, stream_sha256=stream_sha256, label=label)

    def write(self, frames: np.ndarray, new: bool = True) -> None:  # (n, H, W, 3) uint8: the output's next frames
        first = self.video.frames_written
        for link in self.links:
            frames = link(first, frames, new)

    @property
    def frames_written(self) -> int:
        return self.video.frames_written

    @property
    def frames_sha256(self) -> str:
        return self.hash.sha256.hexdigest()

    @property
    def delivered_sha256(self) -> str:
        return self.video.sha256

    @property
    def labelled(self) -> int:
        return self.span[1] - self.span[0]

    def __enter__(self) -> "Delivery":
        self.video.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.video.__exit__(*exc)
        if exc[0] is None and self.previews is not None:
            contact_sheet(self.previews.kept, self.job.request.preview)
