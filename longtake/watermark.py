"""The invisible watermark (#17): 64 bits (32 naming the job, 32 of CRC) in every frame's luma, written as the
frames stream to ffmpeg, read back after re-encoding, resizing, cutting, cropping, padding and brightness or
contrast changes.

The scheme (`NAME`: spread-transform dither modulation, a quantisation watermark, in resolution-free
coordinates):
- the mark lives in the frame's central region (MARGIN = 10 % in from each side, so a crop of up to 10 % per
  side leaves it whole); the region's luma is box-averaged to a GRID x GRID image (the same picture at any
  resolution: a frame halved in width and height averages to nearly the same grid), and its 2D DCT taken;
- BAND low and middle frequencies (2 <= u + v <= MAX_FREQ: waves of 2.3 grid cells and longer, which H.264 at
  CRF 28 and a halving keep) form a vector c; BITS fixed orthonormal directions q_k (from a public seed) give
  one projection p_k = q_k . c per bit;
- to embed bit b_k, p_k is moved to the nearest point of the lattice STEP * (n + DITHER + b_k / 2): the frame's
  own content never interferes (a quantisation watermark, not additive noise), and the change is at most
  STEP / 2 along q_k. DITHER (a quarter step) puts a projection of 0 (a flat frame, a black bar) halfway
  between the two lattices, so it votes for neither bit. The change is drawn at full resolution as the same
  smooth cosines continued past the region, faded out over the margin (no edge at the region's border, none
  at the frame's), added to R, G and B alike (luma only), and corrected twice for what clipping and rounding
  to uint8 took away;
- to read, every frame votes for each bit with how much nearer its projection is to one lattice than to the
  other; the sum decides. A frame alone usually suffices.

Reading searches what platforms do to a picture:
- padding: uniform bars at the edges (letterbox, pillarbox, any colour) are detected and left out (`bars`);
- brightness and contrast: an offset changes only the DC coefficient, which is not in the band; a gain
  (contrast, or a multiplicative brightness) scales every projection, so the lattice is searched at GAINS
  (x0.46 .. x1.71, 5 % apart);
- crops: first the region where it was written (stage A: any resize, re-encode, pad, gain), in all frames and
  in every run of GROUPS consecutive frames (a file marked only in part: an extended clip's new frames); when
  that finds nothing, every crop of -1.5 % .. 10.5 % per side in CROP_STEP steps, on SEARCH_FRAMES frames
  spread over those given (all, each half, each frame: stage B).

False positives. The payload is the first 32 bits of SHA-256(ProduceID) (the AIGC metadata's, so `verify`
finds the job by hashing the job ids in a job store) and a CRC-32 of them: a word read from a file with no
watermark passes the CRC with probability 2**-32. Stage A checks every candidate (2 paddings x 28 gains x
frame groups: at most 4,760 for 64 frames); stage B checks the CHECKED best-scoring distinct words; a file
written by the previous scheme (`LEGACY`, 16-bit CRC) is checked at most 5 times. Bound per unmarked file:
4,760 * 2**-32 + 64 * 2**-32 + 5 * 2**-16 < 1e-4 (`bench_watermark.false_positives` measures it on unmarked
clips). The directions are public (anyone can read the mark, and so could try to remove it; the integrity
code in the metadata is the keyed part). STEP is set for an average PSNR about 41 dB against the unmarked
frames (BENCHMARKS.md has the measured table, with the attacks).

Old files: `LEGACY` ("longtake-stdm-1": the whole frame, 48 bits with a CRC-16, no dither, no gain) is still
read, from the whole frame as found, at gain 1, in all frames and in runs of 16 (an old file survives what
it survived before; the new attacks need the new scheme). Old readers do not read the new scheme.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
from PIL import Image

NAME = "longtake-stdm-2"  # the scheme's name and version, in each file's `watermark` tag with the payload
GRID = 32
MAX_FREQ = 14
PAYLOAD_BITS = 32
CRC_BITS = 32
BITS = PAYLOAD_BITS + CRC_BITS
STEP = 32.0
DITHER = 0.25  # the lattices' offset, in steps: a projection of 0 is a quarter step from both
MARGIN = 0.10  # the mark's region leaves this fraction of the frame out on each side
SEED = 0x4C54_5732  # "LTW2": the public directions
FINE = 128  # frames are box-averaged to at most FINE x FINE before they are read
GAINS = 1.05 ** np.arange(-16, 12)  # contrast factors searched: 0.46 .. 1.71
CROP_STEP = 0.015
CROPS = np.round(np.arange(-1, 8) * CROP_STEP, 4)  # per side, -1.5 % .. 10.5 %: what stage B searches
SEARCH_FRAMES = 8  # frames stage B (the crop search) reads
CHECKED = 64  # stage B's best distinct words checked against the CRC
GROUPS = (16, 4, 1)  # stage A also reads each run of this many consecutive frames (a mark on part of a file)
BAR_TOLERANCE = 4.0  # luma levels: a row or column that varies less than this, on every frame, is a bar
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float64)


_D = _dct_matrix(GRID)[:MAX_FREQ + 1]  # only the rows the band uses
_U, _V = np.nonzero(np.add.outer(np.arange(MAX_FREQ + 1), np.arange(MAX_FREQ + 1)) <= MAX_FREQ)
_KEEP = (_U + _V) >= 2
_U, _V = _U[_KEEP], _V[_KEEP]
_Q = np.linalg.qr(np.random.default_rng(SEED).standard_normal((len(_U), BITS)))[0]  # (M, BITS), orthonormal


class LEGACY:
    """The previous scheme, longtake-stdm-1: the whole frame's grid, 48 bits (a CRC-16), no dither."""
    NAME, STEP, BITS, CRC_BITS, DITHER = "longtake-stdm-1", 34.0, 48, 16, 0.0
    Q = np.linalg.qr(np.random.default_rng(0x4C54_5741).standard_normal((len(_U), 48)))[0]


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (the legacy scheme's check)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _check(payload: int, crc_bits: int) -> int:
    data = payload.to_bytes(4, "big")
    return zlib.crc32(data) if crc_bits == 32 else crc16(data)


def payload_of(produce_id: str) -> int:
    """The 32-bit payload that names a job: the first 4 bytes of SHA-256(ProduceID)."""
    return int.from_bytes(hashlib.sha256(produce_id.encode()).digest()[:4], "big")


def bits_of(payload: int, crc_bits: int = CRC_BITS) -> np.ndarray:
    """The payload's 32 bits, then its check's, most significant first."""
    word = (payload << crc_bits) | _check(payload, crc_bits)
    n = PAYLOAD_BITS + crc_bits
    return np.array([(word >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.int64)


def _decode(bits: np.ndarray, crc_bits: int) -> int | None:
    """The payload of a word whose check matches, else None."""
    word = int("".join(map(str, bits)), 2)
    payload = word >> crc_bits
    return payload if _check(payload, crc_bits) == word & ((1 << crc_bits) - 1) else None


def _luma(frame: np.ndarray) -> np.ndarray:
    return np.asarray(frame, dtype=np.float32) @ LUMA


def _fine(luma: np.ndarray) -> np.ndarray:
    """The luma box-averaged to at most FINE x FINE (each axis on its own)."""
    h, w = luma.shape
    if h <= FINE and w <= FINE:
        return luma.astype(np.float64)
    size = (min(w, FINE), min(h, FINE))
    return np.asarray(Image.fromarray(luma.astype(np.float32), "F").resize(size, Image.BOX), np.float64)


def _box(n: int, start: float, stop: float) -> np.ndarray:
    """(MAX_FREQ + 1, n): the band's DCT rows of the GRID cells that split [start, stop) (fractions of an axis
    of n unit-wide cells), each cell the average of what it covers."""
    edges = (start + (stop - start) * np.arange(GRID + 1) / GRID) * n
    j = np.arange(n)
    overlap = np.clip(edges[1:, None], j, j + 1) - np.clip(edges[:-1, None], j, j + 1)  # (GRID, n)
    return _D @ (overlap / np.maximum(overlap.sum(1, keepdims=True), 1e-9))


def _region(lo: float, hi: float, base: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """The mark's region on an axis, in fractions of the frame, when the picture in [base] shows [lo, 1 - hi]
    of the marked frame (a crop of lo and hi; negative: more than the frame)."""
    span = 1 - lo - hi
    a, b = (MARGIN - lo) / span, (1 - MARGIN - lo) / span
    return base[0] + a * (base[1] - base[0]), base[0] + b * (base[1] - base[0])


def _coefficients(fine: np.ndarray, ry: tuple[float, float], rx: tuple[float, float]) -> np.ndarray:
    h, w = fine.shape
    return (_box(h, *ry) @ fine @ _box(w, *rx).T)[_U, _V]


def _projections(fine: np.ndarray) -> np.ndarray:
    """The BITS projections of a frame, read where they were written."""
    whole = _region(0.0, 0.0)
    return _Q.T @ _coefficients(fine, whole, whole)


def _basis(n: int) -> np.ndarray:
    """(n, MAX_FREQ + 1): the band's DCT basis at the centres of n pixels (continued past the region), faded
    out over the margin."""
    start, stop = _region(0.0, 0.0)
    t = (np.arange(n) + 0.5) / n
    s = (t - start) / (stop - start) * GRID  # in grid cells
    k = np.arange(MAX_FREQ + 1)
    norm = np.where(k == 0, np.sqrt(1.0 / GRID), np.sqrt(2.0 / GRID))
    fade = np.sin(np.pi / 2 * np.clip(np.minimum(t, 1 - t) / MARGIN, 0, 1)) ** 2
    return np.cos(np.pi * np.outer(s, k) / GRID) * norm * fade[:, None]


class Embedder:
    """Marks uint8 RGB frames of one size with one payload (`mark(frames)` returns new frames)."""

    def __init__(self, payload: int, width: int, height: int, iterations: int = 3):
        self.bits = bits_of(payload)
        self.width, self.height, self.iterations = width, height, iterations
        self._by, self._bx = _basis(height).astype(np.float32), _basis(width).astype(np.float32)

    def _delta_image(self, delta_p: np.ndarray) -> np.ndarray:
        coeffs = np.zeros((MAX_FREQ + 1, MAX_FREQ + 1), np.float32)
        coeffs[_U, _V] = _Q @ delta_p
        return (self._by @ coeffs) @ self._bx.T  # (H, W)

    def mark_frame(self, frame: np.ndarray) -> np.ndarray:
        base = frame.astype(np.float32)
        p = _projections(_fine(_luma(base)))
        offset = STEP * (DITHER + self.bits / 2)
        target = STEP * np.round((p - offset) / STEP) + offset
        marked, delta = base, np.zeros((self.height, self.width), np.float32)
        for _ in range(self.iterations):  # what clipping and rounding took, corrected
            delta += self._delta_image(target - p)
            marked = np.clip(np.rint(base + delta[..., None]), 0, 255)
            p = _projections(_fine(_luma(marked)))
        return marked.astype(np.uint8)

    def mark(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.mark_frame(f) for f in frames]) if len(frames) else frames


def _votes(p: np.ndarray, step: float, dither: float) -> np.ndarray:
    """Each projection's vote, in [-0.5, 0.5]: > 0 for 1 (nearer the lattice of 1s). A triangle wave."""
    x = p / step - dither
    x -= np.floor(x)
    return 0.5 - 2 * np.abs(x - 0.5)


def bars(frames_luma_range: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], height: int,
         width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the picture inside uniform bars at the edges, from each row's and column's
    (min, max) over every frame; the whole frame when what is left would be under a third of a side."""
    row_min, row_max, col_min, col_max = frames_luma_range

    def inside(uniform: np.ndarray, n: int) -> tuple[int, int]:
        lo, hi = 0, n
        while lo < n and uniform[lo]:
            lo += 1
        while hi > lo and uniform[hi - 1]:
            hi -= 1
        return (lo, hi) if hi - lo >= n / 3 else (0, n)

    y0, y1 = inside(row_max - row_min <= BAR_TOLERANCE, height)
    x0, x1 = inside(col_max - col_min <= BAR_TOLERANCE, width)
    return y0, y1, x0, x1


def _groups(n: int) -> list[tuple[int, int]]:
    """The frame ranges stage A reads: all, then every run of GROUPS[i] consecutive frames."""
    out = [(0, n)]
    for size in GROUPS:
        if size < n:
            out += [(i, min(i + size, n)) for i in range(0, n, size)]
    return out


def _score(total: np.ndarray, count: int) -> np.ndarray:
    """Mean |summed vote| per bit, over the frames read, scaled to 0 .. 1 (1: every vote sure and agreed)."""
    return np.abs(total).mean(-1) / count * 2


def read(frames) -> dict:
    """Read the mark from decoded uint8 RGB frames (any size, any count): {"found", "payload", "crc_ok",
    "confidence" (the mean |vote| of the summed bits, 0 to 1), "frames" (read), "voters" (the frames whose
    summed votes gave the payload: all, or a run of them when only part of the file is marked), "scheme" (NAME,
    or LEGACY's name), "gain", "crop" ([left, right, top, bottom], fractions of the marked frame cropped
    away; null: read where it was written), "bars" ([y0, y1, x0, x1], the picture inside bars, when the mark
    was read there), "checked" (words checked against a CRC, by its bits), "bits" (the word read, or the
    surest one when none passed)}."""
    fines, shape, ranges = [], None, None
    for frame in frames:
        luma = _luma(frame)
        stats = (luma.min(1), luma.max(1), luma.min(0), luma.max(0))
        ranges = stats if ranges is None else (np.minimum(ranges[0], stats[0]), np.maximum(ranges[1], stats[1]),
                                              np.minimum(ranges[2], stats[2]), np.maximum(ranges[3], stats[3]))
        fines.append(_fine(luma))
        shape = luma.shape
    n = len(fines)
    result = {"found": False, "payload": None, "crc_ok": False, "confidence": 0.0, "frames": n, "scheme": None,
              "voters": 0, "gain": None, "crop": None, "bars": None, "bits": np.zeros(BITS, np.int64)}
    if n == 0:
        return result
    h, w = shape
    y0, y1, x0, x1 = bars(ranges, h, w)
    bases = [((y0 / h, y1 / h), (x0 / w, x1 / w))]
    if (y0, y1, x0, x1) != (0, h, 0, w):  # bars, or a picture whose own edges are uniform: both are read
        bases.append(((0.0, 1.0), (0.0, 1.0)))
    best: dict = {"rank": (False, 0, -1.0)}
    checked = {CRC_BITS: 0, LEGACY.CRC_BITS: 0}  # words checked, by the bits of their check

    def consider(score: float, word: np.ndarray, crc_bits: int, voters: int, **where) -> None:
        """Keep the best reading: one that passes its check before one that does not, then the one read from
        more frames, then the surer."""
        nonlocal best
        checked[crc_bits] += 1
        payload = _decode(word, crc_bits)
        if payload is None and crc_bits != CRC_BITS:
            return  # an unread legacy word is not this scheme's best guess
        rank = (payload is not None, voters if payload is not None else 0, float(score))
        if rank > best["rank"]:
            best = {"rank": rank, "bits": word, "payload": payload, **where}

    whole = ((0.0, 1.0), (0.0, 1.0))
    # stage A: the region where the mark was written, in the picture inside any bars; every gain, every group
    for by, bx in bases:
        ry, rx = _region(0, 0, by), _region(0, 0, bx)
        p = np.stack([_Q.T @ _coefficients(f, ry, rx) for f in fines])  # (n, BITS)
        for gain in GAINS:
            v = _votes(p, gain * STEP, DITHER)
            for lo, hi in _groups(n):
                total = v[lo:hi].sum(0)
                word = (total > 0).astype(np.int64)
                consider(_score(total, hi - lo), word, CRC_BITS, hi - lo, scheme=NAME, gain=float(gain),
                         crop=None, bars=None if (by, bx) == whole else [y0, y1, x0, x1])
    # the legacy scheme: the whole frame as it is, gain 1, all frames and runs of 16
    p = np.stack([LEGACY.Q.T @ _coefficients(f, *whole) for f in fines])
    v = _votes(p, LEGACY.STEP, LEGACY.DITHER)
    runs = [(i, min(i + GROUPS[0], n)) for i in range(0, n, GROUPS[0])] if n > GROUPS[0] else []
    for lo, hi in [(0, n), *runs]:
        total = v[lo:hi].sum(0)
        consider(_score(total, hi - lo), (total > 0).astype(np.int64), LEGACY.CRC_BITS, hi - lo,
                 scheme=LEGACY.NAME, gain=1.0, crop=None, bars=None)
    if best["payload"] is None:
        _search_crops(fines, bases, (y0, y1, x0, x1), consider)
    result["checked"] = {f"crc{k}": v for k, v in checked.items()}
    return _result(result, best)


def _search_crops(fines: list[np.ndarray], bases, rect, consider) -> None:
    """Stage B: every crop in CROPS per side, every gain, on SEARCH_FRAMES frames (all of them, each half, each
    frame); the CHECKED best distinct words are checked against the CRC."""
    pick = np.unique(np.linspace(0, len(fines) - 1, min(SEARCH_FRAMES, len(fines))).round().astype(int))
    chosen = [fines[i] for i in pick]
    m = len(chosen)
    groups = [(0, m)] + ([(0, m // 2), (m // 2, m)] if m >= 4 else []) + ([(i, i + 1) for i in range(m)]
                                                                          if m > 1 else [])
    crops = [(lo, hi) for lo in CROPS for hi in CROPS]
    k = MAX_FREQ + 1
    pool = []  # (score, word, where)
    for by, bx in bases:
        rows = np.concatenate([_box(chosen[0].shape[0], *_region(lo, hi, by)) for lo, hi in crops])  # (N*k, h)
        cols = np.concatenate([_box(chosen[0].shape[1], *_region(lo, hi, bx)) for lo, hi in crops])  # (N*k, w)
        p = []
        for f in chosen:
            r = (rows @ (f @ cols.T)).reshape(len(crops), k, len(crops), k)  # (Ny, k, Nx, k)
            p.append(r.transpose(0, 2, 1, 3)[:, :, _U, _V].reshape(-1, len(_U)) @ _Q)  # (Ny * Nx, BITS)
        p = np.stack(p)  # (m, Ny * Nx, BITS)
        for gain in GAINS:
            v = _votes(p, gain * STEP, DITHER)
            for lo, hi in groups:
                total = v[lo:hi].sum(0)  # (Ny * Nx, BITS)
                score = _score(total, hi - lo)
                for i in np.argpartition(-score, 4)[:4]:
                    cy, cx = crops[i // len(crops)], crops[i % len(crops)]
                    pool.append((float(score[i]), (total[i] > 0).astype(np.int64),
                                 {"voters": hi - lo, "gain": float(gain),
                                  "crop": [float(c) for c in (cx[0], cx[1], cy[0], cy[1])],
                                  "bars": None if by == bx == (0.0, 1.0) else list(rect)}))
    words: dict[bytes, list] = {}  # word: [its best score, its reading from the most frames (then the surest)]
    for score, word, where in pool:
        best = words.setdefault(word.tobytes(), [score, (score, word, where)])
        best[0] = max(best[0], score)
        if (where["voters"], score) > (best[1][2]["voters"], best[1][0]):
            best[1] = (score, word, where)
    for _, (score, word, where) in sorted(words.values(), key=lambda x: -x[0])[:CHECKED]:
        consider(score, word, CRC_BITS, scheme=NAME, **where)


def _result(result: dict, best: dict) -> dict:
    found, voters, score = best["rank"]
    if score < 0:
        return result
    result.update(confidence=round(score, 3), bits=best["bits"])
    if found:
        result.update(found=True, crc_ok=True, payload=f"{best['payload']:08x}", scheme=best["scheme"],
                      voters=voters, gain=round(best["gain"], 3), bars=best["bars"],
                      crop=[round(c, 3) for c in best["crop"]] if best["crop"] else None)
    return result


def bit_accuracy(read_bits: np.ndarray, payload: int) -> float:
    """The fraction of the 32 payload bits read right."""
    return float((np.asarray(read_bits)[:PAYLOAD_BITS] == bits_of(payload)[:PAYLOAD_BITS]).mean())
