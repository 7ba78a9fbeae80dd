"""Known frames: a request's image, keyframes, clip to extend and clip to lead into, as one mechanism.

Each medium is a run of frames whose content is given (`Pinned`). The denoised clip is laid out as

    [context of `extend`] [the new frames] [context of `lead_into`]
     ctx_before frames     frames asked     ctx_after frames

with the image at new frame 0 and each keyframe at its time in the new frames. Before the first step and
after every scheduler step the engine sets the pinned frames' latents to their known latents, clean (a
clean context: on the bundled model it joins clips about twice as smoothly as RePaint-style context noised
to each step's level); the windows that hold them condition their other frames on them, and fusion carries
that into the neighbouring windows. Nothing here is family-specific: a backend only turns frames into
latents (`encode_frames`, the inverse of its `decode`).

A bridge (extend and lead_into) starts its new frames from the two contexts' crossfade instead of noise
alone (SDEdit-style, as video to video): each new latent frame is the interpolation between the known latent
frames around it (keyframes included), noised to the level of the first step of the last `strength` of the
schedule (default 0.9; 0.7 where the bundled model's motion plan draws the bridge: the engine sets it). The
clean context alone conditions the new frames through the model's temporal layers only, which a small model
does weakly: it held a bridge's new frames on the first clip's look and jumped to the second clip at its
junction (12.5x the frame-to-frame change there on the bundled model alone; 0.9 of a crossfade brings it to
about 1; docs/rendering.md has the figures).

The output is `extend`'s frames as read (passed through, not re-rendered), the new frames, then
`lead_into`'s frames (only the new frames with `include_inputs` false: a story's shot). The context defaults to one window of frames, or all of a shorter input; an explicit
`context` the input cannot supply is an error. For a family whose causal VAE packs 4 frames in a latent
frame (Wan) the context is cut to 4k + 1 frames, so the extended clip's latents are exactly the context's;
frames pinned later in the clip (keyframes, `lead_into`) are encoded as clips of their own (approximate).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from longtake.media import VideoInput, file_sha256, frames_at, load_image, open_video, probe_media, video_chunks
from longtake.request import DEFAULT_BRIDGE_STRENGTH, DEFAULT_STRENGTH, RenderRequest, RequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pinned:
    frame: int  # first frame, in the denoised clip
    pixels: np.ndarray  # (n, H, W, 3) uint8 at the output size
    source: str  # the request field it came from


@dataclass(frozen=True)
class Inputs:
    new: int = 0  # frames made: round(seconds * fps), or a redrawn video's frame count
    pinned: tuple[Pinned, ...] = ()
    before: VideoInput | None = None  # `extend`: its frames open the output
    after: VideoInput | None = None  # `lead_into`: its frames close the output
    ctx_before: int = 0  # frames of `before` at the start of the denoised clip
    ctx_after: int = 0  # frames of `after` at its end
    source: VideoInput | None = None  # `video`: the clip redrawn (video to video), streamed when encoded
    strength: float = 1.0  # how much of `source`, or of a bridge's crossfade, is redrawn (1: from noise alone)
    hashes: dict = field(default_factory=dict)  # field -> SHA-256 of the file(s), for the checkpoint fingerprint
    include: bool = True  # `before` and `after` are in the output (request.include_inputs)

    @property
    def redraws(self) -> bool:
        """A video redrawn (video to video below strength 1: its frames, not a plan, say where things are)."""
        return self.source is not None and self.strength < 1.0

    @property
    def passthrough(self) -> int:
        """Output frames copied from the inputs."""
        return (self.before.frames if self.before else 0) + (self.after.frames if self.after else 0) \
            if self.include else 0


def _context_frames(request: RenderRequest, window_frames: int, causal: bool, temporal: int) -> int:
    frames = window_frames if request.context is None else max(1, round(request.context * request.fps))
    if causal:  # 4k + 1 frames: the context's latents are the clip's first ones exactly
        frames = (frames - 1) // temporal * temporal + 1
    return frames


def _fit(video: VideoInput, frames: int, explicit: bool, field_name: str, fps: float, causal: bool,
         temporal: int) -> int:
    """The context frames `video` supplies: `frames`, or all it has when the context was not asked for."""
    if frames <= video.frames:
        return frames
    if explicit:
        raise RequestError(field_name, video.path, f"a video of at least {frames} frames at {fps:g} fps (the "
                                                   f"context, {frames / fps:g} s); it has {video.frames}")
    return (video.frames - 1) // temporal * temporal + 1 if causal else video.frames


def _video(field: str, path: str, fps: float, width: int, height: int, head: int = 0, tail: int = 0,
           pixels: bool = True) -> VideoInput:
    """`open_video`, or with `pixels=False` the same VideoInput with the frame count from the packets and
    black frames (never allocated: broadcast) for the head and tail, no file hash."""
    if pixels:
        return open_video(field, path, fps, width, height, head=head, tail=tail)
    frames = frames_at(field, path, fps)
    black = np.zeros((1, height, width, 3), np.uint8)
    return VideoInput(path=str(path), frames=frames, sha256="",
                      head=np.broadcast_to(black, (min(head, frames), height, width, 3)),
                      tail=np.broadcast_to(black, (min(tail, frames), height, width, 3)))


def resolve_inputs(request: RenderRequest, height: int, width: int, window_frames: int, causal: bool = False,
                   temporal: int = 1, pin_reference: bool = True, pixels: bool = True) -> Inputs:
    """Open and check every medium of a request (no model involved). Raises RequestError naming the field.
    `pin_reference=False`: the reference photo is the model's conditioning (Wan-Animate: `reference_image`),
    not a known frame 0. `pixels=False`: videos are probed, not decoded (`_video`): the frame counts and
    every check, for a server checking a request it is about to queue."""
    fps, new = request.fps, request.num_frames
    pinned, hashes = [], {}
    source, strength = None, 1.0
    if request.video is not None:  # video to video: its length, unless fewer seconds are asked for
        source = _video("video", request.video, fps, width, height, pixels=pixels)
        if request.seconds is not None and new > source.frames:
            raise RequestError("seconds", request.seconds, f"at most the video's length ({source.frames} frames at "
                                                           f"{fps:g} fps = {source.frames / fps:g} s), or no value")
        new = new if request.seconds is not None else source.frames
        strength = request.strength if request.strength is not None else DEFAULT_STRENGTH
        hashes["video"] = [source.sha256, strength]
    before = after = None
    ctx_before = ctx_after = 0
    want = _context_frames(request, window_frames, causal, temporal)
    explicit = request.context is not None
    if request.extend is not None:  # one pass: its frame count and its last frames
        before = _video("extend", request.extend, fps, width, height, tail=want, pixels=pixels)
        ctx_before = _fit(before, want, explicit, "extend", fps, causal, temporal)
        pinned.append(Pinned(0, before.tail[len(before.tail) - ctx_before:], "extend"))
        hashes["extend"] = before.sha256
    if request.lead_into is not None:
        after = _video("lead_into", request.lead_into, fps, width, height, head=want, pixels=pixels)
        ctx_after = _fit(after, want, explicit, "lead_into", fps, causal, temporal)
        pinned.append(Pinned(ctx_before + new, after.head[:ctx_after], "lead_into"))
        hashes["lead_into"] = after.sha256
        if before is not None:  # a bridge: its new frames start from the crossfade of the two contexts
            strength = request.strength if request.strength is not None else DEFAULT_BRIDGE_STRENGTH
            hashes["bridge"] = strength
    for name in ("image", "reference"):  # the reference photo of a pose-driven clip is pinned as an image is
        path = getattr(request, name)
        if name == "reference" and not pin_reference:
            continue
        if path is not None:
            pinned.append(Pinned(ctx_before, load_image(name, path, width, height)[None], name))
            hashes[name] = file_sha256(path)
    taken = {}
    first = ("image" if request.image is not None else
             "reference" if request.reference is not None and pin_reference else None)
    for i, key in enumerate(request.keyframes or []):
        name = f"keyframes[{i}]"
        frame = min(round(key.at * fps), new - 1)
        if key.at * fps >= new:
            raise RequestError(f"{name}.at", key.at, f"a time from 0 to below the clip's length ({new / fps:g} s)")
        if frame in taken or (frame == 0 and first):
            other = taken.get(frame, first)
            raise RequestError(f"{name}.at", key.at, f"a time whose frame ({frame} at {fps:g} fps) no other image "
                                                     f"is pinned at ({other} is)")
        taken[frame] = name
        pinned.append(Pinned(ctx_before + frame, load_image(f"{name}.image", key.image, width, height)[None], name))
        hashes[name] = [key.at, file_sha256(key.image)]
    return Inputs(new, tuple(pinned), before, after, ctx_before, ctx_after, source, strength, hashes,
                  request.include_inputs)


def reference_image(field: str, path: str, width: int, height: int) -> np.ndarray:
    """A reference photo that conditions a model (not a pinned frame) -> (height, width, 3) uint8: fitted
    inside the output size (aspect kept, bilinear) and centred on black, as diffusers' WanAnimatePipeline
    prepares its reference (`resize_mode="fill"`), so the whole figure stays in the picture (a pinned image
    is cropped instead). RequestError naming `field` when it is not a readable image."""
    from pathlib import Path

    from PIL import Image

    if not Path(path).is_file():
        raise RequestError(field, path, "an existing image file")
    info = probe_media(field, path)
    if info["kind"] != "image":
        raise RequestError(field, path, "an image file (PNG, JPEG, WebP...), not a video")
    image = Image.fromarray(load_image(field, path, info["width"], info["height"]))  # as read (and checked)
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    canvas = Image.new("RGB", (width, height), color=0)
    canvas.paste(image.resize((src_w, src_h), resample=Image.Resampling.BILINEAR),
                 box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return np.asarray(canvas, np.uint8).copy()


def clip_frames(field: str, path: str, frames: int, fps: float, width: int, height: int, loop: bool = False,
                gray: bool = False, pixels: bool = True) -> np.ndarray | None:
    """A conditioning video (a face, a background, a mask) as `frames` frames at `fps`, scaled to cover
    width x height and centre-cropped, (frames, height, width, 3) uint8 (`gray`: (frames, height, width), the
    luma PIL's "L" conversion gives, as diffusers' mask processor reads masks). Shorter than the clip: an error
    naming `field`, unless `loop` (pose_loop: it repeats, as the pose does). `pixels=False`: that check on
    its length from its packets, nothing decoded, None."""
    from PIL import Image

    from longtake.media import head_frames

    have = frames_at(field, path, fps) if not pixels else None
    read = head_frames(field, path, fps, width, height, frames) if pixels else ()
    have = len(read) if pixels else have
    if have < frames and not loop:
        raise RequestError(field, path, f"a video as long as the clip ({frames / fps:g} s at {fps:g} fps), or "
                                        f"pose_loop; it has {have / fps:g} s ({have} frames)")
    if not pixels:
        return None
    out = np.stack([read[i % len(read)] for i in range(frames)])
    if gray:
        out = np.stack([np.asarray(Image.fromarray(f).convert("L"), np.uint8) for f in out])
    return out


def latent_index(frame: int, temporal: int, causal: bool) -> int:
    """The latent frame that holds output frame `frame` (causal: frame 0 alone, then 4 a latent frame)."""
    if causal:
        return 0 if frame == 0 else math.ceil(frame / temporal)
    return frame // temporal


# -- known frames as latents: a job's encode_frames calls on its workers (`job`: an engine.Job) --------------

def source_latents(job, pool, tick=None) -> torch.Tensor:
    """Video to video: the input's latents (1, C, F, h, w), encoded chunk by chunk on the workers as the
    frames stream from ffmpeg (never the whole video as pixels). Chunks are one window of frames; a causal
    VAE (Wan) encodes frame 0 alone, then 4m frames at a time after the frame before them (whose latent is
    dropped): each chunk restarts the VAE's cache, an approximation of one whole-clip encode."""
    src, layout, req = job.inputs.source, job.model.layout, job.request
    size = max(1, layout.frames(job.window) - (1 if layout.causal else 0))
    parts, buffer, prev, left = [], [], None, job.frames
    first = True

    def flush(group: list, prefix) -> None:
        frames = np.stack(([prefix] if prefix is not None else []) + group)
        latents = pool.call("encode_frames", frames, tick=tick)  # (1, C, n, h, w)
        parts.append(latents[:, :, 1:] if prefix is not None else latents)

    for chunk in video_chunks("video", src.path, req.fps, job.width, job.height, chunk=size):
        for frame in chunk[:left]:
            buffer.append(frame)
            left -= 1
            if len(buffer) == (1 if first and layout.causal else size):
                flush(buffer, prev)
                prev, buffer, first = (buffer[-1] if layout.causal else None), [], False
        if left <= 0:
            break
    if buffer:  # the last group, padded with its last frame to whole latent frames (a causal VAE drops a rest)
        flush(buffer + [buffer[-1]] * (-len(buffer) % layout.temporal if prev is not None else 0), prev)
    return torch.cat(parts, 2)[:, :, : job.latent_frames]


class KnownLatents:
    """The latents of a job's known frames: `pin(z, start)` sets those among z's frames, which are the clip's
    frames [start, start + z's length), in place, to the known latents themselves (clean, at every step: a
    clean context, which the bundled model follows much more closely than RePaint-style context noised to
    each step's level; the note of issue 15 has the figures); `crossfade(z)` is a clip whose every frame is known or interpolated between the known
    frames around it (held before the first and after the last): a bridge's start (inputs.py)."""

    def __init__(self, index: torch.Tensor, known: torch.Tensor):
        self.index, self.known = index, known  # (k,) sorted latent frames, (1, C, k, h, w)

    def __call__(self, z: torch.Tensor, start: int = 0) -> None:
        inside = (self.index >= start) & (self.index < start + z.shape[2])
        if bool(inside.any()):
            z[:, :, self.index[inside] - start] = self.known[:, :, inside].to(z.dtype)

    def crossfade(self, z: torch.Tensor) -> torch.Tensor:
        frames = z.shape[2]
        at = torch.arange(frames, dtype=torch.float64)
        index = self.index.to(torch.float64)
        hi = torch.searchsorted(index, at).clamp(max=len(index) - 1)  # first known frame at or after each frame
        lo = torch.where(index[hi] > at, (hi - 1).clamp(min=0), hi)  # last known frame at or before it
        span = index[hi] - index[lo]
        weight = torch.where(span > 0, (at - index[lo]) / span.clamp(min=1), torch.zeros_like(at))
        weight = weight.to(z.dtype).view(1, 1, frames, 1, 1)
        known = self.known.to(z.dtype)
        return (1 - weight) * known[:, :, lo] + weight * known[:, :, hi]


def known_latents(job, pool, tick=None) -> KnownLatents | None:
    """The latents of a job's known frames (`KnownLatents`), encoded once, on a worker; None when nothing is
    known."""
    if not job.inputs.pinned:
        return None
    layout, latent_frames = job.model.layout, job.latent_frames
    at: dict[int, torch.Tensor] = {}  # latent frame -> known latent (a later pin wins)
    for p in job.inputs.pinned:
        latents = pool.call("encode_frames", p.pixels, tick=tick)  # (1, C, n, h, w)
        first = latent_index(p.frame, layout.temporal, layout.causal)
        for k in range(min(latents.shape[2], latent_frames - first)):
            at[first + k] = latents[:, :, k]
    index = torch.tensor(sorted(at))
    known = torch.stack([at[f] for f in sorted(at)], 2)  # (1, C, k, h, w)
    logger.info("%d latent frames known (%s)", len(index), ", ".join(p.source for p in job.inputs.pinned))
    return KnownLatents(index, known)
