"""Untrusted image and video inputs: checked, converted to the output's size and frame rate, streamed.

A request's media (an image, keyframes, a clip to extend, a clip to lead into) are files a user gave. Each
is opened once here, before any model is loaded: what cannot be read, has no video stream, is too large or
too long gets a `RequestError` naming the field. The conversions are fixed and documented:

- size: scaled to cover the output frame, then centre-cropped to it (no padding, no distortion);
- frame rate: resampled to the request's fps by ffmpeg's `fps` filter (frames dropped or repeated);
- images: the first frame of the file, RGB (alpha dropped, palette expanded).

Limits: at most MAX_INPUT_PIXELS pixels a frame (images and videos), videos at most MAX_INPUT_SECONDS long.
ffmpeg runs with an argument list, never a shell, reads local files only (`-protocol_whitelist file,pipe`:
no URL), and opens only real video containers and streams (`-format_whitelist VIDEO_FORMATS`): a playlist
or script (HLS .m3u8, ffconcat, DASH...) that would make it read other files is refused as not a video.
Videos stream in chunks; only the frames a job pins (a context of one window or a few seconds) are held as
pixels.
"""

from __future__ import annotations

import hashlib
import logging
import time
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
# the demuxers a video may be read with: containers and raw streams of real video, never a playlist or a
# script that names other files (hls, concat, dash, image2's file patterns, ...)
VIDEO_FORMATS = ("mov", "matroska", "avi", "mpegts", "mpeg", "flv", "ogg", "asf", "mxf", "nut", "dv", "ivf",
                 "h264", "hevc", "m4v", "obu", "mjpeg", "yuv4mpegpipe")
SAFE_INPUT = ["-protocol_whitelist", "file,pipe",  # local files only: no URL
              "-format_whitelist", ",".join(VIDEO_FORMATS)]  # a video container, never a playlist
NOT_A_VIDEO = ("a video file (MP4, MOV, WebM, MKV, AVI, MPEG-TS...; playlists such as HLS .m3u8 and ffconcat "
               "are refused)")
CHUNK = 16  # frames per chunk when a video streams
HEADER_WAIT_S = 9.5  # imageio-ffmpeg waits 10 s for ffmpeg's header: a failure after that long was a slow start
HEADER_ATTEMPTS = 3  # opens of a video whose header was slow before it counts as unreadable
# imageio-ffmpeg warns whenever the frames are read at another size than the source's: here always, on purpose
logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)


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
    for attempt in range(1, HEADER_ATTEMPTS + 1):
        reader = imageio_ffmpeg.read_frames(str(p), pix_fmt="rgb24", input_params=SAFE_INPUT,
                                            output_params=_filters(fps, width, height))
        started = time.monotonic()
        try:
            meta = next(reader)
            break
        except (OSError, RuntimeError, StopIteration) as e:
            reader.close()
            # imageio-ffmpeg gives up when ffmpeg's header takes 10 s: on a starved machine that is no bad file,
            # so the file is opened again (a file ffmpeg refuses fails at once, and is not retried)
            if time.monotonic() - started >= HEADER_WAIT_S and attempt < HEADER_ATTEMPTS:
                logging.getLogger(__name__).warning("%s: ffmpeg's header of %s took %.0f s; reading it again",
                                                    field, path, time.monotonic() - started)
                continue
            if "not on whitelist" in str(e):  # a playlist, or another format that is not a video container
                raise RequestError(field, path, NOT_A_VIDEO) from None
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or ["no video stream"]
            raise RequestError(field, path, f"a readable video with a video stream ({last[0].strip()[:160]})") from None
    source = meta.get("source_size") or meta.get("size") or (0, 0)
    duration = float(meta.get("duration") or 0)
    if not duration:  # no container duration (a raw H.264 stream): its length from its packets
        duration = probe_video(field, path)["seconds"]
    try:
        _check_limits(field, path, source, duration)
    except RequestError:
        reader.close()
        raise
    return reader, {"width": source[0], "height": source[1], "seconds": duration}


def _check_limits(field: str, path: str, size: tuple[int, int], seconds: float) -> None:
    """RequestError naming `field` for a video over MAX_INPUT_PIXELS a frame or MAX_INPUT_SECONDS long."""
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise RequestError(field, path, f"a video of at most {MAX_INPUT_PIXELS} pixels a frame (got "
                                        f"{size[0]}x{size[1]})")
    if seconds > MAX_INPUT_SECONDS:
        raise RequestError(field, path, f"a video of at most {MAX_INPUT_SECONDS:g} seconds (got {seconds:g})")


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


def probe_video(field: str, path: str) -> dict:
    """A video's size and length from its packets, without decoding a frame: {"width", "height", "seconds",
    "packets"}. ffmpeg copies the first video stream's packets to its `framecrc` muxer (one line per packet:
    its timestamps), so a stream without a container duration (a raw H.264 upload) has its true length too;
    what it reads is bounded by the file's size, not by what decoding it would cost. RequestError naming
    `field` when it is not a readable video, or is over the limits above."""
    import subprocess

    p = Path(path)
    if not p.is_file():
        raise RequestError(field, path, "an existing video file")
    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *SAFE_INPUT,
                           "-i", str(p), "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if "not on whitelist" in proc.stderr:
            raise RequestError(field, path, NOT_A_VIDEO)
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no video stream"]
        raise RequestError(field, path, f"a readable video with a video stream ({last[0].strip()[:160]})")
    base, size, first, end, packets = None, (0, 0), None, None, 0
    for line in proc.stdout.splitlines():
        if line.startswith("#tb 0:"):
            num, den = line.split(":", 1)[1].strip().split("/")
            base = int(num) / int(den)
        elif line.startswith("#dimensions 0:"):
            w, h = line.split(":", 1)[1].strip().split("x")
            size = (int(w), int(h))
        elif line and not line.startswith("#"):
            _, dts, pts, duration, *_ = (x.strip() for x in line.split(","))
            t = int(pts) if int(pts) > -2**62 else int(dts)  # a raw stream's packets have no pts
            first = t if first is None else min(first, t)
            end = t + int(duration) if end is None else max(end, t + int(duration))
            packets += 1
    if not packets or base is None:
        raise RequestError(field, path, "a video with at least one frame")
    seconds = (end - first) * base
    _check_limits(field, path, size, seconds)
    return {"width": size[0], "height": size[1], "seconds": seconds, "packets": packets}


def frames_at(field: str, path: str, fps: float) -> int:
    """A video's frame count at `fps`, from its packets (`probe_video`: no frame decoded): what ffmpeg's fps
    filter gives it, to within a frame."""
    return max(1, round(probe_video(field, path)["seconds"] * fps))
