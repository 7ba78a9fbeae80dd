"""The invisible watermark (#17, issue 31): read back after the platform edits of the table (real ffmpeg filters:
crops, padding, brightness, contrast), never found on unmarked clips, and files of the previous scheme still
read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from longtake import watermark
from longtake.tools import bench_watermark
from longtake.video import VideoWriter, read_frames

PAYLOAD = 0x0BADCAFE


@pytest.fixture(scope="module")
def marked_file(tmp_path_factory) -> str:
    """1 s at 8 fps, 256x256, marked with PAYLOAD and written as longtake writes (H.264, CRF 18)."""
    path = tmp_path_factory.mktemp("wm") / "marked.mp4"
    frames = bench_watermark.make_clip(256, seconds=1, seed=7)
    with VideoWriter(path, 256, 256, 8) as w:
        w.write(watermark.Embedder(PAYLOAD, 256, 256).mark(frames))
    return str(path)


CHECKS = {  # attack (bench_watermark.ATTACKS): what the reader must have found out about it
    "crop_10": lambda r: r["crop"] and all(abs(c - 0.1) <= 0.01 for c in r["crop"]),
    "crop_asym": lambda r: r["crop"] and all(abs(c - e) <= 0.016 for c, e in zip(r["crop"], (0.1, 0.03, 0.03, 0.07))),
    "pad_16x9": lambda r: r["bars"] is not None and r["crop"] in (None, [0.0] * 4),
    "pad_9x16": lambda r: r["bars"] is not None,
    "brighter": lambda r: r["gain"] == 1.0,
    "darker": lambda r: abs(r["gain"] - 1) <= 0.06,
    "contrast_0.5": lambda r: abs(r["gain"] - 0.5) <= 0.03,
    "contrast_1.5": lambda r: abs(r["gain"] - 1.5) <= 0.05,
}


@pytest.mark.slow
@pytest.mark.parametrize("attack", CHECKS)
def test_the_payload_survives_a_platform_edit(marked_file, tmp_path, attack):
    path = bench_watermark.attack(marked_file, tmp_path / f"{attack}.mp4", attack)  # ffmpeg, then CRF 28
    frames = read_frames(path)
    if attack.startswith("crop"):
        assert frames.shape[1] < 256 and frames.shape[2] < 256
    result = watermark.read(frames)
    assert result["found"] and result["payload"] == f"{PAYLOAD:08x}", result
    assert result["scheme"] == watermark.NAME and CHECKS[attack](result), result


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))  # a moving blob, a still frame, a texture, letterboxed, dim
def test_an_unmarked_clip_is_not_found(seed):
    result = watermark.read(bench_watermark.unmarked_clip(128, seed, frames=16))
    assert not result["found"] and result["payload"] is None
    checked = result["checked"]  # the CRC-32 words (every geometry and gain), the legacy CRC-16 ones: few
    assert checked["crc32"] > 100 and checked["crc16"] <= 5
    assert checked["crc32"] * 2.0 ** -32 + checked["crc16"] * 2.0 ** -16 < 1e-4


@pytest.mark.slow
def test_a_flat_or_black_clip_is_not_found():
    for value in (0, 128, 255):
        assert not watermark.read(np.full((4, 64, 64, 3), value, np.uint8))["found"]


def _legacy_mark(frames: np.ndarray, payload: int) -> np.ndarray:
    """longtake-stdm-1, as the previous release embedded it: the whole frame's 32x32 box-averaged grid, 48
    bits (a CRC-16), step 34, no dither."""
    legacy = watermark.LEGACY
    bits = watermark.bits_of(payload, legacy.CRC_BITS)
    d = watermark._dct_matrix(32)
    u, v = watermark._U, watermark._V
    h, w = frames.shape[1:3]

    def projections(image):
        luma = image.astype(np.float32) @ watermark.LUMA
        grid = np.asarray(Image.fromarray(luma, "F").resize((32, 32), Image.BOX), np.float64)
        return legacy.Q.T @ (d @ grid @ d.T)[u, v]

    out = []
    for frame in frames:
        base = frame.astype(np.float32)
        p = projections(base)
        target = legacy.STEP * (np.round((p - bits * legacy.STEP / 2) / legacy.STEP) + bits / 2)
        marked, offset = base, np.zeros((h, w), np.float32)
        for _ in range(3):
            coeffs = np.zeros((32, 32))
            coeffs[u, v] = legacy.Q @ (target - p)
            grid = (d.T @ coeffs @ d).astype(np.float32)
            offset += np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.BILINEAR))
            marked = np.clip(np.rint(base + offset[..., None]), 0, 255)
            p = projections(marked)
        out.append(marked.astype(np.uint8))
    return np.stack(out)


def test_a_file_marked_by_the_previous_scheme_is_still_read(tmp_path):
    frames = bench_watermark.make_clip(64, seconds=1, seed=3)
    with VideoWriter(tmp_path / "old.mp4", 64, 64, 8) as w:
        w.write(_legacy_mark(frames, PAYLOAD))
    result = watermark.read(read_frames(tmp_path / "old.mp4"))
    assert result["found"] and result["payload"] == f"{PAYLOAD:08x}" and result["scheme"] == "longtake-stdm-1"
