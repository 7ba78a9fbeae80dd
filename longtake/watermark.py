"""The invisible watermark (#17): 48 bits (32 naming the job, 16 of CRC) in every frame's luma, written as the
frames stream to ffmpeg, read back after re-encoding, resizing and cutting.

The scheme (spread-transform dither modulation, a quantisation watermark, in resolution-free coordinates):
- a frame's luma is box-averaged to a GRID x GRID image (the same picture at any resolution: a frame halved in
  width and height averages to nearly the same grid), and its 2D DCT taken;
- BAND low and middle frequencies (2 <= u + v <= MAX_FREQ: waves of 2.3 grid cells and longer, which H.264 at
  CRF 28 and a halving keep) form a vector c; BITS fixed orthonormal directions q_k (from a public seed) give
  one projection p_k = q_k . c per bit;
- to embed bit b_k, p_k is moved to the nearest point of the lattice STEP * (n + b_k / 2): the frame's own
  content never interferes (a quantisation watermark, not additive noise), and the change is at most STEP / 2
  along q_k. The change is drawn at full resolution as smooth cosines, added to R, G and B alike (luma only),
  and corrected twice for what clipping and rounding to uint8 took away;
- to read, every frame votes for each bit with how much nearer its projection is to one lattice than to the
  other; the sum decides. A 2-second excerpt at 8 fps has 16 voters; a frame alone usually suffices.

The payload is the first 32 bits of SHA-256(ProduceID) (the AIGC metadata's, so `verify` finds the job by
hashing the job ids in a job store) and a CRC-16 of them: a file with no watermark passes the CRC with
probability 2**-16. The directions are public (anyone can read the mark, and so could try to remove it; the
integrity code in the metadata is the keyed part). STEP is set for an average PSNR about 41 dB against the
unmarked frames (BENCHMARKS.md has the measured table, with the attacks).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

NAME = "longtake-stdm-1"  # the scheme's name and version, in each file's `watermark` tag with the payload
GRID = 32
MAX_FREQ = 14
PAYLOAD_BITS = 32
CRC_BITS = 16
BITS = PAYLOAD_BITS + CRC_BITS
STEP = 34.0
SEED = 0x4C54_5741  # "LTWA": the public directions
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float64)


_D = _dct_matrix(GRID)
_U, _V = np.nonzero(np.add.outer(np.arange(GRID), np.arange(GRID)) <= MAX_FREQ)
_KEEP = (_U + _V) >= 2
_U, _V = _U[_KEEP], _V[_KEEP]
_Q = np.linalg.qr(np.random.default_rng(SEED).standard_normal((len(_U), BITS)))[0]  # (M, BITS), orthonormal


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def payload_of(produce_id: str) -> int:
    """The 32-bit payload that names a job: the first 4 bytes of SHA-256(ProduceID)."""
    return int.from_bytes(hashlib.sha256(produce_id.encode()).digest()[:4], "big")


def bits_of(payload: int) -> np.ndarray:
    data = payload.to_bytes(4, "big")
    word = (payload << CRC_BITS) | crc16(data)
    return np.array([(word >> (BITS - 1 - i)) & 1 for i in range(BITS)], dtype=np.int64)


def _grid(luma: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(luma.astype(np.float32), "F").resize((GRID, GRID), Image.BOX), np.float64)


def _projections(luma: np.ndarray) -> np.ndarray:
    coeffs = _D @ _grid(luma) @ _D.T
    return _Q.T @ coeffs[_U, _V]


def _luma(frame: np.ndarray) -> np.ndarray:
    return np.asarray(frame, dtype=np.float32) @ LUMA


class Embedder:
    """Marks uint8 RGB frames of one size with one payload (`mark(frames)` returns new frames)."""

    def __init__(self, payload: int, width: int, height: int, iterations: int = 3):
        self.bits = bits_of(payload)
        self.width, self.height, self.iterations = width, height, iterations

    def _delta_image(self, delta_p: np.ndarray) -> np.ndarray:
        coeffs = np.zeros((GRID, GRID))
        coeffs[_U, _V] = _Q @ delta_p
        grid = (_D.T @ coeffs @ _D).astype(np.float32)
        return np.asarray(Image.fromarray(grid, "F").resize((self.width, self.height), Image.BILINEAR))

    def mark_frame(self, frame: np.ndarray) -> np.ndarray:
        base = frame.astype(np.float32)
        p = _projections(_luma(base))
        target = STEP * (np.round((p - self.bits * STEP / 2) / STEP) + self.bits / 2)
        marked, offset = base, np.zeros((self.height, self.width), np.float32)
        for _ in range(self.iterations):  # what clipping and rounding took, corrected
            offset += self._delta_image(target - p)
            marked = np.clip(np.rint(base + offset[..., None]), 0, 255)
            p = _projections(_luma(marked))
        return marked.astype(np.uint8)

    def mark(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.mark_frame(f) for f in frames]) if len(frames) else frames


def votes(frame: np.ndarray) -> np.ndarray:
    """One frame's vote per bit, in [-0.5, 0.5]: > 0 for 1 (nearer the half-step lattice)."""
    r = _projections(_luma(frame)) / STEP
    d0 = np.abs(r - np.round(r))
    d1 = np.abs(r - 0.5 - np.round(r - 0.5))
    return d0 - d1


def read(frames) -> dict:
    """Read the mark from decoded uint8 RGB frames (any size, any count): {"found", "payload", "crc_ok",
    "confidence" (mean |vote| of the summed bits, 0 to 1), "frames"}."""
    total, n = np.zeros(BITS), 0
    for frame in frames:
        total += votes(frame)
        n += 1
    if n == 0:
        return {"found": False, "payload": None, "crc_ok": False, "confidence": 0.0, "frames": 0}
    bits = (total > 0).astype(np.int64)
    word = int("".join(map(str, bits)), 2)
    payload, crc = word >> CRC_BITS, word & 0xFFFF
    crc_ok = crc16(payload.to_bytes(4, "big")) == crc
    confidence = float(np.abs(total).mean() / n * 2)
    return {"found": crc_ok, "payload": f"{payload:08x}" if crc_ok else None, "crc_ok": crc_ok,
            "confidence": round(confidence, 3), "frames": n, "bits": bits}


def bit_accuracy(read_bits: np.ndarray, payload: int) -> float:
    return float((np.asarray(read_bits) == bits_of(payload)).mean())
