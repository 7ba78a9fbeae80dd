"""Encoding rendered frames to H.264 MP4 through ffmpeg, plus small inspection helpers.

``VideoWriter`` streams raw rgb24 frames into an ffmpeg subprocess that writes a
temporary file next to the destination; the file only appears at its final path
once ffmpeg has exited cleanly.  ``probe``, ``read_frames``, ``preview_indices``
and ``contact_sheet`` are for checking what came out.
"""

from __future__ import annotations

import hashlib
import re
import logging
import math
import os
import secrets
import shutil
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Callable

import ffmpeg
import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

_STDERR_TAIL_BYTES = 4000
_MIN_TILE_SIDE = 128

# The writer's rule for a frame side (width or height): libx264 in yuv420p halves the chroma planes both
# ways, so both sides are even. `LatentLayout.check_size` applies this same rule (with the model's own
# multiple) to every request before any work, so a size the writer would refuse never reaches it.
FRAME_SIDE_MULTIPLE = 2
FRAME_SIDE_REASON = "even, for H.264 in yuv420p"


def valid_frame_side(value, multiple: int = 1) -> bool:
    """Whether the writer takes `value` as a frame's width or height (a positive integer, a multiple of
    FRAME_SIDE_MULTIPLE), and it is also a multiple of `multiple` (a model's own rule)."""
    try:
        integral = int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False
    return integral and value > 0 and value % math.lcm(FRAME_SIDE_MULTIPLE, int(multiple)) == 0


def ffmpeg_exe() -> str:
    """The ffmpeg binary: the one on PATH if any, else the one imageio-ffmpeg ships."""
    return shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe()


def _partial_path(path: Path, suffix: str) -> Path:
    """A hidden temporary name in the same directory as ``path`` (so os.replace is atomic)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(3)}{suffix}")


def _rate(fps: float) -> str:
    """fps as an exact ffmpeg rational, e.g. 8 -> '8', 29.97002997 -> '30000/1001'."""
    return str(Fraction(fps).limit_denominator(1001))


class VideoWriter:
    """Streams uint8 RGB frames into ffmpeg (libx264, yuv420p, +faststart) at exactly ``fps``.

    ``tags``: called at close with the SHA-256 of the encoded video stream (`stream_sha256`), it
    returns the MP4 tags to write; the encoded file is then remuxed (``-c copy``, the frames are not encoded
    again) with them under ``moov/udta/meta`` (``-movflags use_metadata_tags``). ``sign(src, dst)``, last:
    writes the file to ``dst`` signed (a C2PA manifest)."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float,
                 crf: int = 18, preset: str = "medium", tags: Callable[[str], dict[str, str]] | None = None,
                 sign: Callable[[Path, Path], None] | None = None):
        for name, value in (("width", width), ("height", height)):
            if not valid_frame_side(value):
                raise ValueError(f"{name}: got {value}, expected an even number > 0 (H.264 in yuv420p halves the "
                                 f"chroma planes)")
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps: got {fps}, expected a positive finite number")
        self.path = Path(path)
        self.width, self.height, self.fps = int(width), int(height), float(fps)
        self.frames_written = 0
        self._sha = hashlib.sha256()
        self._state = "open"  # -> "closed" (file at path) or "aborted" (nothing left behind)
        self._tmp = _partial_path(self.path, ".mp4")
        self._tags, self._sign = tags, sign
        rate = _rate(self.fps)
        flags = {"movflags": "+faststart"} if tags is None else {}  # with tags, the remux moves moov first
        stream = (
            ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24",
                         s=f"{self.width}x{self.height}", framerate=rate)
            .output(str(self._tmp), format="mp4", vcodec="libx264", pix_fmt="yuv420p",
                    crf=crf, preset=preset, r=rate, **flags)
        )
        # Global options go first; -y because ffmpeg would otherwise prompt on our stdin pipe.
        self._cmd = ffmpeg.compile(stream, cmd=[ffmpeg_exe(), "-hide_banner", "-nostats", "-y"])
        # create the file now: an unwritable or missing directory fails here, as an OSError naming the path
        # (ffmpeg would only exit with a status)
        self._tmp.touch(exist_ok=False)
        self._stderr = tempfile.TemporaryFile()
        log.debug("starting ffmpeg: %s", " ".join(self._cmd))
        try:
            self._proc = subprocess.Popen(self._cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=self._stderr, start_new_session=True)
        except OSError:
            self._stderr.close()
            self._tmp.unlink(missing_ok=True)
            raise

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of every frame byte written so far, in order."""
        return self._sha.hexdigest()

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames shaped (n, H, W, 3), or one frame shaped (H, W, 3)."""
        if self._state != "open":
            raise RuntimeError(f"write to {self.path}: writer is already {self._state}")
        frames = np.asarray(frames)
        expected = f"(n, {self.height}, {self.width}, 3) or ({self.height}, {self.width}, 3)"
        if frames.dtype != np.uint8:
            raise ValueError(f"frames: got dtype {frames.dtype}, expected uint8 with shape {expected}")
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames: got shape {frames.shape}, expected {expected}")
        frames = np.ascontiguousarray(frames)
        try:
            self._proc.stdin.write(memoryview(frames.reshape(-1)))
        except BrokenPipeError:
            raise self._fail("ffmpeg exited while frames were being written") from None
        self._sha.update(frames)
        self.frames_written += frames.shape[0]

    def close(self) -> None:
        """Finish encoding and move the file into place; raises RuntimeError if ffmpeg failed."""
        if self._state == "closed":
            return
        if self._state == "aborted":
            raise RuntimeError(f"close {self.path}: writer was aborted (or ffmpeg failed)")
        if self.frames_written == 0:
            raise self._fail("no frames were written")
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg already gone; wait() below reports its exit status
        returncode = self._proc.wait()
        if returncode != 0:
            raise self._fail(f"ffmpeg exited with status {returncode}")
        try:
            if self._tags is not None:
                self._add_tags()
            if self._sign is not None:  # sign(src, dst): the file again, with a C2PA manifest
                signed = _partial_path(self.path, ".mp4")
                try:
                    self._sign(self._tmp, signed)
                    os.replace(signed, self._tmp)
                finally:
                    signed.unlink(missing_ok=True)
            os.replace(self._tmp, self.path)
        except BaseException:  # nothing left behind: no partial file, no untagged output
            self.abort()
            raise
        self._state = "closed"
        self._stderr.close()
        log.info("wrote %s: %d frames at %g fps, %dx%d", self.path, self.frames_written,
                 self.fps, self.width, self.height)

    def _add_tags(self) -> None:
        """Remux the encoded file with its tags (the packets copied as they are)."""
        tags = self._tags(stream_sha256(self._tmp))
        tagged = _partial_path(self.path, ".mp4")
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-i", str(self._tmp),
               "-map", "0", "-map_metadata", "-1", "-c", "copy", "-movflags", "+faststart+use_metadata_tags"]
        for key, value in tags.items():
            cmd += ["-metadata", f"{key}={value}"]
        proc = subprocess.run([*cmd, "-f", "mp4", str(tagged)], capture_output=True, timeout=3600)
        if proc.returncode != 0:
            tagged.unlink(missing_ok=True)
            raise RuntimeError(f"tagging {self.path} failed: ffmpeg exited with status {proc.returncode}: "
                               f"{proc.stderr.decode('utf-8', 'replace')[-_STDERR_TAIL_BYTES:]}")
        os.replace(tagged, self._tmp)

    def abort(self) -> None:
        """Kill ffmpeg if it is running and remove the partial file. Idempotent; never raises."""
        if self._state == "closed":
            return
        self._state = "aborted"
        try:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._stderr.close()
            self._proc.stdin.close()
        except (OSError, ValueError):  # a broken pipe on close is expected here
            pass
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("abort %s: could not remove %s: %s", self.path, self._tmp, exc)

    def _stderr_tail(self) -> str:
        try:
            self._stderr.flush()
            size = self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, size - _STDERR_TAIL_BYTES))
            return self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return "<ffmpeg stderr unavailable>"

    def _fail(self, what: str) -> RuntimeError:
        """Stop ffmpeg, clean up, and build the error to raise (with ffmpeg's stderr tail)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        tail = self._stderr_tail()
        self.abort()
        return RuntimeError(f"encoding {self.path} failed: {what} "
                            f"(after {self.frames_written} frames).\nffmpeg stderr:\n{tail}")

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _moov_before_mdat(path: Path) -> bool:
    """Walk the top-level MP4 boxes and report whether 'moov' precedes 'mdat'."""
    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if len(header) < 8:
                return False
            size, kind = int.from_bytes(header[:4], "big"), header[4:]
            header_len = 8
            if size == 1:
                size, header_len = int.from_bytes(f.read(8), "big"), 16
            if kind == b"moov":
                return True
            if kind == b"mdat" or size == 0 or size < header_len:  # size 0: box runs to EOF
                return False
            f.seek(size - header_len, os.SEEK_CUR)


def probe(path: str | os.PathLike) -> dict:
    """Frame count (by decoding), fps, size, codec, pix_fmt and faststart of a video file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe: no such file {path}")
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    finally:
        reader.close()
    frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    return {"frames": int(frames), "fps": float(meta["fps"]), "width": int(width),
            "height": int(height), "codec": str(meta["codec"]),
            "pix_fmt": str(meta["pix_fmt"]).split("(")[0], "faststart": _moov_before_mdat(path)}


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame to uint8 (n, H, W, 3). Loads the whole clip: small clips only."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    width, height = next(reader)["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames) if frames else np.empty((0, height, width, 3), np.uint8)


def iter_frames(path: str | os.PathLike, limit: int | None = None):
    """Decoded uint8 (H, W, 3) frames, one at a time, at most `limit` (decoding nothing after them)."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        width, height = next(reader)["size"]
        for i, buf in enumerate(reader):
            if limit is not None and i >= limit:
                break
            yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)
    finally:
        reader.close()


def read_first_frame(path: str | os.PathLike) -> np.ndarray:
    """The first frame, uint8 (H, W, 3), decoding nothing after it."""
    for frame in iter_frames(path, 1):
        return frame.copy()
    raise ValueError(f"{path}: no frames")


def preview_indices(num_frames: int, count: int = 16) -> list[int]:
    """Up to ``count`` distinct, sorted indices spread evenly, including both ends when possible."""
    if num_frames <= 0 or count <= 0:
        return []
    if count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [0]
    step = (num_frames - 1) / (count - 1)
    return sorted({int(math.floor(i * step + 0.5)) for i in range(count)})


def _tile_size(height: int, width: int, tile: int | None) -> tuple[int, int]:
    """(width, height) of a tile whose short side is ``tile`` px (default: native, at least 128)."""
    short = min(height, width)
    target = tile if tile is not None else max(short, _MIN_TILE_SIDE)
    scale = target / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def contact_sheet(frames: list[tuple[int, np.ndarray]], path: str | os.PathLike,
                  columns: int = 4, tile: int | None = None) -> None:
    """Write a PNG grid of (frame_index, uint8 HxWx3) pairs, each tile labelled with its index."""
    if not frames:
        raise ValueError("contact_sheet: got no frames, expected at least one (index, image) pair")
    if columns < 1:
        raise ValueError(f"columns: got {columns}, expected >= 1")
    shape = np.asarray(frames[0][1]).shape
    for index, image in frames:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.shape != shape or len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"frame {index}: got {image.dtype} {image.shape}, "
                             f"expected uint8 (H, W, 3) matching the first frame {shape}")
    tile_w, tile_h = _tile_size(shape[0], shape[1], tile)
    cols = min(columns, len(frames))
    rows = math.ceil(len(frames) / cols)
    sheet = Image.new("RGB", (cols * tile_w, rows * tile_h))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for slot, (index, image) in enumerate(frames):
        x, y = (slot % cols) * tile_w, (slot // cols) * tile_h
        img = Image.fromarray(np.asarray(image), "RGB")
        upscale = tile_w >= img.width
        sheet.paste(img.resize((tile_w, tile_h), Image.NEAREST if upscale else Image.BOX), (x, y))
        label = str(index)
        left, top, right, bottom = draw.textbbox((x + 2, y + 2), label, font=font)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
        draw.text((x + 2, y + 2), label, fill=(255, 255, 255), font=font)
    path = Path(path)
    tmp = _partial_path(path, ".png")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote contact sheet %s: %d tiles of %dx%d", path, len(frames), tile_w, tile_h)


def ffmpeg_output(args: list[str], what: str) -> str:
    """What ffmpeg prints on stdout reading `args` (an argument list, never a shell); ValueError naming `what`
    when it cannot read it."""
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *args],
                          capture_output=True, timeout=600)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        raise ValueError(f"{what}: ffmpeg could not read it ({tail or 'exit ' + str(proc.returncode)})")
    return proc.stdout.decode("utf-8", "replace")


def stream_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file's first video stream's packets (no decoding)."""
    out = ffmpeg_output(["-protocol_whitelist", "file", "-i", str(path), "-map", "0:v:0", "-c", "copy",
                   "-f", "hash", "-hash", "sha256", "-"], str(path))
    match = re.search(r"SHA256=([0-9a-f]{64})", out)
    if not match:
        raise ValueError(f"{path}: no video stream")
    return match.group(1)
