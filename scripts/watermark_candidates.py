"""Measure invisible-watermark's methods (dwtDct, dwtDctSvd, rivaGan) on the trials of longtake's own watermark.

Each method marks every frame of the generated clips of `longtake.tools.bench_watermark` (256x256 and 512x512) with
the same 32 bits; its reader decodes every frame of the attacked MP4 and takes a per-bit majority vote. The
trials, attacks and metrics (PSNR, embed fps, bit accuracy per attack) are `bench_watermark.measure`'s.

It needs its own venv, since longtake does not depend on OpenCV, PyWavelets, onnxruntime or torch:

    python3 -m venv /tmp/cand
    /tmp/cand/bin/pip install numpy pillow imageio-ffmpeg ffmpeg-python pydantic pyyaml \
        opencv-python-headless PyWavelets onnxruntime torch
    /tmp/cand/bin/pip install --no-deps -e . invisible-watermark   # its own deps name the non-headless opencv
    /tmp/cand/bin/python scripts/watermark_candidates.py --out results.json

It writes {"date", "notes", "results": {method: {size: row}}} to --out (the shape that
`bench_watermark.candidates()` reads from benchmarks/watermark-candidates.json) and prints the markdown table.
A method that cannot be imported or fails on a size gets {"error": "..."} for that size.

imwatermark refuses images with fewer than 256x256 pixels, so the reader upscales smaller decoded frames (the
"half" attacks of the 256 clip give 128x128) to 256 on the short side before decoding. It works on BGR images
(OpenCV's order); the wrappers convert from and to the harness's RGB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np

from longtake.tools.bench_watermark import SIZES, measure, table

METHODS = ("dwtDct", "dwtDctSvd", "rivaGan")
MIN_SIDE = 256  # imwatermark raises on images with fewer than 256*256 pixels
NOTES = ("invisible-watermark 0.2.0, every frame marked with the same 32 bits, read by a per-bit majority vote "
         "over all decoded frames; frames under 256x256 (the 256 clip's half attacks) are upscaled (bicubic) to "
         "256 before decoding, as imwatermark refuses smaller images. rivaGan runs its bundled ONNX models on CPU.")


def _fit(frame: np.ndarray) -> np.ndarray:
    import cv2

    h, w = frame.shape[:2]
    if h * w >= MIN_SIDE * MIN_SIDE:
        return frame
    s = MIN_SIDE / min(h, w)
    return cv2.resize(frame, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)


def imwatermark_method(method: str):
    """(embed, read) for one of imwatermark's methods; raises here if the library cannot be imported."""
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    if method == "rivaGan":
        WatermarkEncoder.loadModel()

    def embed(frames: np.ndarray, bits: np.ndarray) -> np.ndarray:
        enc = WatermarkEncoder()
        enc.set_watermark("bits", [int(b) for b in bits])
        out = [enc.encode(np.ascontiguousarray(f[..., ::-1]), method)[..., ::-1] for f in frames]  # RGB<->BGR
        return np.stack(out).astype(np.uint8)

    def read(frames) -> np.ndarray | None:
        dec = WatermarkDecoder("bits", 32)
        votes = [np.asarray(dec.decode(np.ascontiguousarray(_fit(f)[..., ::-1]), method), np.int64)
                 for f in frames]
        if not votes:
            return None
        return (np.mean(votes, axis=0) > 0.5).astype(np.int64)  # a tie reads as 0

    return embed, read


def run(methods=METHODS, sizes=SIZES) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            name = f"invisible-watermark {method}"
            results[name] = {}
            for size in sizes:
                try:
                    row = measure(Path(tmp), {name: imwatermark_method(method)}, (size,))[name][str(size)]
                except Exception as e:  # noqa: BLE001 - record, go on with the next method or size
                    row = {"error": f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:200]}
                results[name][str(size)] = row
                print(name, size, json.dumps(row), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("watermark-candidates.json"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    args = ap.parse_args()
    results = run(args.methods, args.sizes)
    doc = {"date": datetime.date.today().isoformat(), "notes": NOTES, "results": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
