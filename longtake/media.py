"""Untrusted image and video inputs: checked, converted to the output's size and frame rate, streamed.

A request's media (an image, keyframes, a clip to extend, a clip to lead into) are files a user gave. Each
is opened once here, before any model is loaded: what cannot be read, has no video stream, is too large or
too long gets a `RequestError` naming the field. The conversions are fixed and documented:

- size: scaled to cover the output frame, then centre-cropped to it (no padding, no distortion);
- frame rate: resampled to the request's fps by ffmpeg's `fps` filter (frames dropped or repeated);
- images: the first frame of the file, RGB (alpha dropped, palette expanded).

Limits: at most MAX_INPUT_PIXELS pixels a frame (images and videos), videos at most MAX_INPUT_SECONDS long.
ffmpeg runs with an argument list, never a shell, and reads local files only (`-protocol_whitelist
file,pipe`: a playlist naming a URL is refused). Videos stream in chunks; only the frames a job pins (a
context of one window or a few seconds) are held as pixels.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import imageio_ffmpeg
import numpy as np
from PIL import Image, UnidentifiedImageError

from longtake.request import MAX_SECONDS, RequestError

MAX_INPUT_PIXELS = 4096 * 4096  # per frame, images and videos
MAX_INPUT_SECONDS = MAX_SECONDS  # the longest video input
SAFE_INPUT = ["-protocol_whitelist", "file,pipe"]  # local files only: no URL a playlist could name
CHUNK = 16  # frames per chunk when a video streams


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cover_crop(image: Image.Image, width: int, height: int) -> np.ndarray:
    """Scale to cover (width, height), centre-crop to it: (height, width, 3) uint8."""
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8).copy()


def load_image(field: str, path: str, width: int, height: int) -> np.ndarray:
    """An image file -> (height, width, 3) uint8, scaled to cover and centre-cropped. RequestError naming
    `field` when it is not a readable image or is larger than MAX_INPUT_PIXELS."""
    p = Path(path)
    if not p.is_file():
        raise RequestError(field, path, "an existing image file")
    try:
        with Image.open(p) as image:
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise RequestError(field, path, f"an image of at most {MAX_INPUT_PIXELS} pixels (got "
                                                f"{image.width}x{image.height})")
            image.seek(0)
            image.load()
            rgb = image.convert("RGB")
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(field, path, f"a readable image (PNG, JPEG, WebP...): {type(e).__name__}") from None
    return _cover_crop(rgb, width, height)


def probe_media(field: str, path: str) -> dict:
    """What a file is, by its content (never its name): {"kind": "image" | "video", "width", "height"} and,
    for a video, "seconds". RequestError naming `field` when it is neither a readable image nor a video
    with at least one decodable frame, or is over the limits above."""
    try:
        with Image.open(path) as image:
            size = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        size = None
    if size is not None:
        load_image(field, path, 16, 16)  # the pixel limit, and a full decode
        return {"kind": "image", "width": size[0], "height": size[1]}
    reader, meta = _reader(field, path, 1, 16, 16)
    try:
        next(reader)
    except (OSError, RuntimeError, StopIteration):
        raise RequestError(field, path, "a video with at least one decodable frame") from None
    finally:
        reader.close()
    return {"kind": "video", **meta}


def _filters(fps: float, width: int, height: int) -> list[str]:
    from longtake.video import _rate

    return ["-vf", f"fps={_rate(fps)},scale={width}:{height}:force_original_aspect_ratio=increase,"
                   f"crop={width}:{height},format=rgb24"]


def _reader(field: str, path: str, fps: float, width: int, height: int):
    """imageio-ffmpeg's frame generator, and its metadata, read and checked."""
    p = Path(path)
    if not p.is_file():
        raise RequestError(field, path, "an existing video file")
    reader = imageio_ffmpeg.read_frames(str(p), pix_fmt="rgb24", input_params=SAFE_INPUT,
                                        output_params=_filters(fps, width, height))
    try:
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
        reader.close()
        last = [line for line in str(e).splitlines() if line.strip()][-1:] or ["no video stream"]
        raise RequestError(field, path, f"a readable video with a video stream ({last[0].strip()[:160]})") from None
    source = meta.get("source_size") or meta.get("size") or (0, 0)
    duration = float(meta.get("duration") or 0)
    problem = None
    if source[0] * source[1] > MAX_INPUT_PIXELS:
        problem = f"a video of at most {MAX_INPUT_PIXELS} pixels a frame (got {source[0]}x{source[1]})"
    elif duration > MAX_INPUT_SECONDS:
        problem = f"a video of at most {MAX_INPUT_SECONDS:g} seconds (got {duration:g})"
    if problem:
        reader.close()
        raise RequestError(field, path, problem)
    return reader, {"width": source[0], "height": source[1], "seconds": duration}


def video_chunks(field: str, path: str, fps: float, width: int, height: int, chunk: int = CHUNK
                 ) -> Iterator[np.ndarray]:
    """A video's frames at `fps` and (height, width), in (n <= chunk, H, W, 3) uint8 chunks, streamed."""
    reader, _ = _reader(field, path, fps, width, height)
    frame_bytes = width * height * 3
    try:
        buffer = []
        for raw in reader:
            if len(raw) != frame_bytes:
                raise RequestError(field, path, f"frames of {width}x{height} after conversion (got {len(raw)} bytes)")
            buffer.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
            if len(buffer) == chunk:
                yield np.stack(buffer)
                buffer = []
        if buffer:
            yield np.stack(buffer)
    finally:
        reader.close()


def head_frames(field: str, path: str, fps: float, width: int, height: int, frames: int) -> list[np.ndarray]:
    """Up to `frames` frames of a video at `fps` and (height, width), from its start (the rest is not read);
    RequestError naming `field` when it has none."""
    read: list[np.ndarray] = []
    for chunk in video_chunks(field, path, fps, width, height):
        read.extend(chunk)
        if len(read) >= frames:
            break
    if not read:
        raise RequestError(field, path, "a video with at least one frame")
    return read[:frames]


@dataclass(frozen=True)
class VideoInput:
    """A video as a job uses it: its frame count at the job's fps and size, and the frames it pins."""

    path: str
    frames: int  # at the job's fps
    head: np.ndarray  # (n, H, W, 3) its first frames (as many as asked)
    tail: np.ndarray  # (n, H, W, 3) its last frames (as many as asked)
    sha256: str


def open_video(field: str, path: str, fps: float, width: int, height: int, head: int = 0, tail: int = 0,
               need: int = 1) -> VideoInput:
    """One streaming pass over a video: count its frames at `fps` and keep the first `head` and the last
    `tail` of them. RequestError when it has fewer than `need` frames (the context it must supply)."""
    first: list[np.ndarray] = []
    last: deque = deque(maxlen=max(tail, 0) or None)
    count = 0
    for frames in video_chunks(field, path, fps, width, height):
        for frame in frames:
            if len(first) < head:
                first.append(frame)
            if tail:
                last.append(frame)
            count += 1
    if count < need:
        raise RequestError(field, path, f"a video of at least {need} frames at {fps:g} fps (the context it "
                                        f"supplies); it has {count}")
    empty = np.empty((0, height, width, 3), np.uint8)
    return VideoInput(path=str(path), frames=count, head=np.stack(first) if first else empty,
                      tail=np.stack(list(last)) if tail else empty, sha256=file_sha256(path))
