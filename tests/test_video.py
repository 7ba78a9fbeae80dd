"""Tests for longtake.video: encoding through real ffmpeg, probing, cleanup, previews."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from longtake.video import (
    VideoWriter,
    _moov_before_mdat,
    contact_sheet,
    ffmpeg_exe,
    preview_indices,
    probe,
    read_frames,
)

W, H = 64, 48
BACKGROUND = (40, 90, 160)
SQUARE = 12


def moving_square(n, width=W, height=H):
    """n frames of a white square moving 2 px right per frame over a coloured background."""
    frames = np.empty((n, height, width, 3), np.uint8)
    frames[:] = BACKGROUND
    for i in range(n):
        x = 2 + 2 * i
        frames[i, 18:18 + SQUARE, x:x + SQUARE] = 255
    return frames


def square_x(frame):
    """Mean column of the bright (square) pixels in a frame."""
    bright = np.all(frame > 200, axis=-1)
    assert bright.any(), "no square found in frame"
    return float(np.nonzero(bright)[1].mean())


def test_ffmpeg_exe_is_executable():
    exe = ffmpeg_exe()
    assert os.path.isfile(exe) and os.access(exe, os.X_OK)


def test_roundtrip_probe_and_frames(tmp_path):
    out = tmp_path / "clip.mp4"
    frames = moving_square(24)
    writer = VideoWriter(out, W, H, fps=8)
    writer.write(frames[:10])
    writer.write(frames[10:])
    assert not out.exists(), "nothing may exist at the path before close()"
    writer.close()

    assert os.listdir(tmp_path) == ["clip.mp4"]
    assert writer.frames_written == 24
    assert probe(out) == {"frames": 24, "fps": 8.0, "width": W, "height": H,
                          "codec": "h264", "pix_fmt": "yuv420p", "faststart": True}

    decoded = read_frames(out)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape
    diff = np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean()
    assert diff < 8, f"decoded frames differ too much from the input: mean abs diff {diff:.2f}"
    for i in (0, 11, 23):
        assert square_x(decoded[i]) == pytest.approx(square_x(frames[i]), abs=1.5)
    assert square_x(decoded[23]) - square_x(decoded[0]) == pytest.approx(46, abs=2)


def test_sha256_matches_bytes_written(tmp_path):
    frames = moving_square(7)
    fortran = np.asfortranarray(frames[3:6])  # not C-contiguous: hash must use C order
    with VideoWriter(tmp_path / "h.mp4", W, H, fps=8) as writer:
        assert writer.sha256 == hashlib.sha256().hexdigest()
        writer.write(frames[:3])
        writer.write(fortran)
        writer.write(frames[6])  # a single (H, W, 3) frame
    assert writer.frames_written == 7
    assert writer.sha256 == hashlib.sha256(frames.tobytes()).hexdigest()
    assert probe(tmp_path / "h.mp4")["frames"] == 7


@pytest.mark.parametrize("width,height,name", [(63, 48, "width"), (64, 47, "height")])
def test_odd_size_rejected(tmp_path, width, height, name):
    with pytest.raises(ValueError, match=f"{name}: got {width if name == 'width' else height}, "
                                         "expected an even number"):
        VideoWriter(tmp_path / "odd.mp4", width, height, fps=8)
    assert os.listdir(tmp_path) == []


def test_the_models_size_check_is_the_writers_rule(tmp_path):
    """One rule (longtake.video.valid_frame_side): the writer applies it, and a model's LatentLayout applies it
    with the model's own multiple before any work, so every size a layout accepts the writer accepts."""
    from longtake.pipelines import LatentLayout
    from longtake.request import RequestError
    from longtake.video import valid_frame_side

    for multiple in (1, 2, 3, 8, 16):
        layout = LatentLayout(channels=4, spatial=multiple, size_multiple=multiple, size_reason="the factor")
        for value in range(-2, 50):
            try:
                layout.check_size("height", value)
                accepted = True
            except RequestError:
                accepted = False
            assert accepted == (valid_frame_side(value) and value % multiple == 0), (multiple, value)
            assert accepted <= valid_frame_side(value)
    for value in (0, -2, 7, 2.5):
        assert not valid_frame_side(value)
        with pytest.raises(ValueError, match=f"width: got {value}, expected an even number > 0"):
            VideoWriter(tmp_path / "x.mp4", value, 8, fps=8)
    assert os.listdir(tmp_path) == []


def test_bad_dtype_and_shape_rejected(tmp_path):
    writer = VideoWriter(tmp_path / "bad.mp4", W, H, fps=8)
    try:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(moving_square(2).astype(np.float32))
        with pytest.raises(ValueError, match=r"\(n, 48, 64, 3\)"):
            writer.write(np.zeros((2, H, W - 2, 3), np.uint8))
        with pytest.raises(ValueError, match=r"\(n, 48, 64, 3\)"):
            writer.write(np.zeros((2, H, W, 4), np.uint8))
        assert writer.frames_written == 0
        assert writer.sha256 == hashlib.sha256().hexdigest()
    finally:
        writer.abort()


def test_abort_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "aborted.mp4"
    writer = VideoWriter(out, W, H, fps=8)
    writer.write(moving_square(5))
    proc = writer._proc
    writer.abort()
    assert proc.poll() is not None, "ffmpeg still running after abort()"
    assert os.listdir(tmp_path) == []
    writer.abort()  # idempotent
    with pytest.raises(RuntimeError, match="aborted"):
        writer.write(moving_square(1))
    with pytest.raises(RuntimeError, match="aborted"):
        writer.close()
    assert os.listdir(tmp_path) == []


def test_exception_inside_with_cleans_up(tmp_path):
    out = tmp_path / "boom.mp4"
    with pytest.raises(KeyError, match="boom"):
        with VideoWriter(out, W, H, fps=8) as writer:
            writer.write(moving_square(4))
            raise KeyError("boom")
    assert writer._proc.poll() is not None
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_ffmpeg_failure_reports_stderr_and_cleans_up(tmp_path):
    out = tmp_path / "fail.mp4"
    writer = VideoWriter(out, W, H, fps=8, preset="no-such-preset")
    with pytest.raises(RuntimeError, match="ffmpeg stderr") as excinfo:
        for _ in range(50):  # ffmpeg may die before or after the first writes land
            writer.write(moving_square(4))
        writer.close()
    assert "no-such-preset" in str(excinfo.value)
    assert writer._proc.poll() is not None
    assert os.listdir(tmp_path) == []


def test_close_without_frames_fails(tmp_path):
    writer = VideoWriter(tmp_path / "empty.mp4", W, H, fps=8)
    with pytest.raises(RuntimeError, match="no frames"):
        writer.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fps", [12, 30])
def test_fps_round_trips(tmp_path, fps):
    out = tmp_path / f"fps{fps}.mp4"
    with VideoWriter(out, W, H, fps=fps, preset="ultrafast") as writer:
        writer.write(moving_square(fps))
    info = probe(out)
    assert info["fps"] == pytest.approx(fps)
    assert info["frames"] == fps


def _box(kind: bytes, payload: bytes = b"", large: bool = False) -> bytes:
    if large:
        return (1).to_bytes(4, "big") + kind + (16 + len(payload)).to_bytes(8, "big") + payload
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


def test_faststart_box_walk(tmp_path):
    path = tmp_path / "boxes.mp4"
    ftyp = _box(b"ftyp", b"isom\0\0\2\0")
    path.write_bytes(ftyp + _box(b"mdat", b"x" * 100) + _box(b"moov", b"y" * 10))
    assert _moov_before_mdat(path) is False
    path.write_bytes(ftyp + _box(b"free", b"z" * 5, large=True) + _box(b"moov") + _box(b"mdat"))
    assert _moov_before_mdat(path) is True
    path.write_bytes(ftyp + _box(b"mdat", b"x" * 10, large=True) + _box(b"moov"))
    assert _moov_before_mdat(path) is False


def test_contact_sheet_grid(tmp_path):
    frames = moving_square(5)
    out = tmp_path / "sheet.png"
    contact_sheet([(i * 10, frames[i]) for i in range(5)], out, columns=4)
    assert os.listdir(tmp_path) == ["sheet.png"]
    with Image.open(out) as img:
        assert img.format == "PNG"
        # 64x48 frames are upscaled to 128 px on the short side: 171x128 tiles, 4 columns x 2 rows.
        assert img.size == (4 * 171, 2 * 128)
        sheet = np.asarray(img.convert("RGB"))
    tile0 = sheet[:128, :171]
    assert tuple(tile0[120, 4]) == BACKGROUND  # nearest-neighbour upscale keeps exact colours
    label = tile0[:16, :24]
    assert (label == 0).all(axis=-1).any() and (label > 200).all(axis=-1).any(), "no label drawn"
    assert (sheet[128:, 171:] == 0).all(), "empty grid cells should stay black"


def test_contact_sheet_explicit_tile_and_errors(tmp_path):
    frames = moving_square(3)
    out = tmp_path / "small.png"
    contact_sheet([(0, frames[0]), (7, frames[1]), (9, frames[2])], out, columns=2, tile=32)
    with Image.open(out) as img:
        assert img.size == (2 * 43, 2 * 32)
    with pytest.raises(ValueError, match="no frames"):
        contact_sheet([], tmp_path / "none.png")
    with pytest.raises(ValueError, match="uint8"):
        contact_sheet([(0, frames[0].astype(np.float32))], tmp_path / "float.png")
    assert os.listdir(tmp_path) == ["small.png"]


@pytest.mark.parametrize("num_frames,count,expected", [
    (0, 16, []),
    (1, 16, [0]),
    (2, 16, [0, 1]),
    (5, 16, [0, 1, 2, 3, 4]),
    (16, 16, list(range(16))),
    (1000, 2, [0, 999]),
    (10, 1, [0]),
    (11, 3, [0, 5, 10]),
])
def test_preview_indices_cases(num_frames, count, expected):
    assert preview_indices(num_frames, count) == expected


@pytest.mark.parametrize("num_frames,count", [(17, 16), (100, 16), (241, 16), (1001, 7)])
def test_preview_indices_spread(num_frames, count):
    idx = preview_indices(num_frames, count)
    assert len(idx) == count == len(set(idx))
    assert idx == sorted(idx) and idx[0] == 0 and idx[-1] == num_frames - 1
    gaps = np.diff(idx)
    assert gaps.max() - gaps.min() <= 1, f"uneven spread: {idx}"


@pytest.mark.slow
def test_a_video_whose_header_is_slow_is_read_again_and_a_bad_one_fails_at_once(tmp_path, monkeypatch):
    """imageio-ffmpeg gives up when ffmpeg's header takes 10 s (a starved machine): the reader opens the file
    again instead of calling a good video unreadable; a file ffmpeg refuses fails on the first open."""
    import sys

    from longtake.media import video_chunks
    from longtake.request import RequestError

    with VideoWriter(str(tmp_path / "a.mp4"), W, H, 8) as w:
        w.write(moving_square(8))
    calls = tmp_path / "calls"
    wrapper = tmp_path / "slow-ffmpeg"
    # the first run stalls past imageio-ffmpeg's 10 s header wait; every later one is the real ffmpeg
    wrapper.write_text(f"#!{sys.executable}\nimport os, sys, time\n"
                       f"first = not os.path.exists({str(calls)!r})\n"
                       f"open({str(calls)!r}, 'a').write('x')\n"
                       f"time.sleep(10.5 if first else 0)\n"
                       f"os.execv({ffmpeg_exe()!r}, [{ffmpeg_exe()!r}] + sys.argv[1:])\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(wrapper))
    frames = np.concatenate(list(video_chunks("video", str(tmp_path / "a.mp4"), 8, W, H)))
    assert np.array_equal(frames, read_frames(tmp_path / "a.mp4"))
    opens = len(calls.read_text())  # the stalled first open, then the open that read it
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(RequestError, match=r"^video: got .*bad\.mp4'?, expected a readable video"):
        list(video_chunks("video", str(tmp_path / "bad.mp4"), 8, W, H))
    assert len(calls.read_text()) == opens + 1  # refused at once: opened once
