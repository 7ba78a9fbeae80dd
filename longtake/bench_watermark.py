"""The watermark table of `longtake bench` (#17): method x attack -> bit accuracy, with PSNR and frames per second.

A method is `embed(frames, bits) -> frames` (uint8 (n, H, W, 3), 32 payload bits) and `read(frames) -> bits`
(32, or None when it finds nothing). Each trial: a generated clip (a red blob crossing a textured gradient,
8 fps, 4 s) at 256x256 and 512x512 is marked, written as longtake writes (H.264, CRF 18), then attacked with
ffmpeg (re-encoded at CRF 28; resized to half width and height; cut to a 2-second excerpt; both) and read
back. Bit accuracy is over the 32 payload bits; PSNR is the marked frames against the unmarked ones, before
encoding. `scripts/watermark_candidates.py` runs the same trials for invisible-watermark's methods.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from longtake import watermark
from longtake.video import VideoWriter, ffmpeg_exe, read_frames

SIZES = (256, 512)
FPS = 8
SECONDS = 4
PAYLOAD = 0x5EED_CAFE
ATTACKS = {  # ffmpeg output options; every attacked file is re-encoded
    "none": None,
    "crf28": ["-c:v", "libx264", "-crf", "28"],
    "half": ["-vf", "scale=iw/2:ih/2", "-c:v", "libx264", "-crf", "28"],
    "excerpt_2s": ["-ss", "1.5", "-t", "2", "-c:v", "libx264", "-crf", "28"],
    "half_excerpt_2s": ["-ss", "1.5", "-t", "2", "-vf", "scale=iw/2:ih/2", "-c:v", "libx264", "-crf", "28"],
}


def make_clip(size: int, seconds: float = SECONDS, fps: float = FPS, seed: int = 0) -> np.ndarray:
    """A clip with texture, gradients, saturated colour and motion: uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    small = Image.fromarray((rng.random((max(size // 8, 2), max(size // 8, 2))) * 255).astype(np.uint8))
    texture = np.asarray(small.resize((size, size), Image.BICUBIC), np.float32) - 128
    n = round(seconds * fps)
    frames = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        bg = np.stack([80 + 100 * xx, 60 + 120 * yy, 150 - 60 * xx], -1) + texture[..., None] * 0.3
        cx, cy = 0.2 + 0.6 * t / n, 0.5 + 0.2 * np.sin(t / 5)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)[..., None]
        frames[t] = np.clip(bg * (1 - blob) + np.array([230, 40, 30]) * blob, 0, 255)
    return frames


def payload_bits(payload: int = PAYLOAD) -> np.ndarray:
    return np.array([(payload >> (31 - i)) & 1 for i in range(32)], dtype=np.int64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def trial(embed, read, size: int, tmp: Path, name: str) -> dict:
    frames = make_clip(size)
    bits = payload_bits()
    t0 = time.perf_counter()
    marked = embed(frames, bits)
    fps = len(frames) / (time.perf_counter() - t0)
    src = tmp / f"wm-{name}-{size}.mp4"
    with VideoWriter(src, size, size, FPS) as w:
        w.write(marked)
    row = {"psnr_db": round(psnr(marked, frames), 2), "embed_fps": round(fps, 1), "bit_accuracy": {}}
    for attack, options in ATTACKS.items():
        path = src
        if options is not None:
            path = tmp / f"wm-{name}-{size}-{attack}.mp4"
            subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(src), *options, str(path)], check=True,
                           timeout=600)
        got = read(read_frames(path))
        row["bit_accuracy"][attack] = 0.0 if got is None else round(float((np.asarray(got) == bits).mean()), 4)
    path.unlink(missing_ok=True)
    row["false_positive"] = read(frames) is not None and bool((np.asarray(read(frames)) == bits).all())
    return row


def _longtake_embed(frames: np.ndarray, bits: np.ndarray) -> np.ndarray:
    payload = int("".join(map(str, bits)), 2)
    return watermark.Embedder(payload, frames.shape[2], frames.shape[1]).mark(frames)


def _longtake_read(frames) -> np.ndarray | None:
    found = watermark.read(frames)
    return found["bits"][:32]


METHODS = {"longtake (STDM, luma DCT, 32 + 16 CRC bits)": (_longtake_embed, _longtake_read)}


def measure(tmp: Path, methods: dict = METHODS, sizes=SIZES) -> dict:
    """{method: {size: row}}."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {name: {str(size): trial(embed, read, size, tmp, f"m{i}") for size in sizes}
            for i, (name, (embed, read)) in enumerate(methods.items())}


def table(results: dict) -> list[str]:
    """Markdown lines: method, size, PSNR, fps, then bit accuracy per attack."""
    attacks = list(ATTACKS)
    lines = ["| method | size | PSNR dB | embed fps | " + " | ".join(attacks) + " |",
             "|---|---|---|---|" + "---|" * len(attacks)]
    for method, by_size in results.items():
        for size, row in by_size.items():
            if "error" in row:
                lines.append(f"| {method} | {size} | | | {row['error']} |" + " |" * (len(attacks) - 1))
                continue
            accs = " | ".join(f"{row['bit_accuracy'][a]:.3f}" for a in attacks)
            lines.append(f"| {method} | {size}x{size} | {row['psnr_db']:.1f} | {row['embed_fps']:.0f} | {accs} |")
    return lines


CANDIDATES = Path(__file__).resolve().parent.parent / "benchmarks" / "watermark-candidates.json"


def candidates() -> dict:
    """The other methods' rows, as `scripts/watermark_candidates.py` last measured them (its own venv: they
    need OpenCV, PyWavelets and onnxruntime, which longtake does not), or {} where the file is absent."""
    try:
        return json.loads(CANDIDATES.read_text())
    except (OSError, ValueError):
        return {}


def section(d: dict) -> list[str]:
    """The BENCHMARKS.md section: longtake's rows from this run, the candidates' from their script."""
    cand = d.get("candidates") or {}
    results = {**d["longtake"], **cand.get("results", {})}
    lines = ["## Watermark: method x attack -> bit accuracy", "",
             f"32 payload bits in every frame of a generated {SECONDS} s clip at {FPS} fps (a red blob crossing a "
             "textured gradient), written as longtake writes (H.264, CRF 18), then attacked with ffmpeg: "
             "`crf28` re-encoded at CRF 28, `half` resized to half width and height (and re-encoded), "
             "`excerpt_2s` a 2-second cut from 1.5 s (re-encoded), and both. Bit accuracy is read from the "
             "attacked file (every frame votes); PSNR is the marked frames against the unmarked ones; embed "
             "fps on one core.", "", *table(results)]
    notes = cand.get("notes")
    lines += ["", "Reading it: longtake's rows are from this run; the others from `scripts/watermark_candidates.py` "
              + (f"({cand.get('date', 'date not recorded')})" if cand else "(not run: no "
                 "benchmarks/watermark-candidates.json)") + ". " + (notes or "")]
    return lines
