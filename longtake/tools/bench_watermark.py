"""The watermark table of `longtake bench` (#17): method x attack -> bit accuracy, with PSNR and frames per second,
and longtake's false-positive count on unmarked clips.

A method is `embed(frames, bits) -> frames` (uint8 (n, H, W, 3), 32 payload bits) and `read(frames) -> bits`
(32, or None when it finds nothing), and optionally `detect(frames) -> watermark.read's dict`. Each trial: a
generated clip (a red blob crossing a textured gradient, 8 fps, 4 s) at 256x256 and 512x512 is marked, written
as longtake writes (H.264, CRF 18), then attacked with ffmpeg (ATTACKS: re-encoded at CRF 28; resized to half
width and height; cut to a 2-second excerpt; both; cropped; padded to 16:9 or 9:16; brighter, darker, less
or more contrast; each re-encoded at CRF 28) and read back. Bit accuracy is over the 32 payload bits; PSNR
is the marked frames against the unmarked ones, before encoding. With `detect`, UNMARKED_CLIPS clips never
marked (moving, still, textured, letterboxed, dim) are read as `verify` reads a file (64 frames) and every
payload found is a false positive. `scripts/watermark_candidates.py` runs the same trials for
invisible-watermark's methods.

    python -m longtake.tools.bench_watermark --table BENCHMARKS.md   # this table alone, rewritten in place
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
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
_X264 = ["-c:v", "libx264", "-crf", "28"]
ATTACKS = {  # ffmpeg output options; every attacked file is re-encoded at CRF 28
    "none": None,
    "crf28": _X264,
    "half": ["-vf", "scale=iw/2:ih/2", *_X264],
    "excerpt_2s": ["-ss", "1.5", "-t", "2", *_X264],
    "half_excerpt_2s": ["-ss", "1.5", "-t", "2", "-vf", "scale=iw/2:ih/2", *_X264],
    "crop_10": ["-vf", "crop=iw*0.8:ih*0.8", *_X264],  # 10 % off every side
    "crop_asym": ["-vf", "crop=iw*0.87:ih*0.9:iw*0.1:ih*0.03", *_X264],  # 10 % left, 3 % right, 3 % top, 7 % bottom
    "pad_16x9": ["-vf", "pad=ceil(iw*16/9/2)*2:ih:(ow-iw)/2:0", *_X264],  # pillarboxed into a 16:9 frame
    "pad_9x16": ["-vf", "pad=iw:ceil(ih*16/9/2)*2:0:(oh-ih)/2", *_X264],  # letterboxed into a 9:16 frame
    "brighter": ["-vf", "eq=brightness=0.15", *_X264],  # + 0.15 of the luma range (about 40 of 255 levels)
    "darker": ["-vf", "eq=brightness=-0.15", *_X264],
    "contrast_0.5": ["-vf", "eq=contrast=0.5", *_X264],  # luma's distance from mid-grey halved
    "contrast_1.5": ["-vf", "eq=contrast=1.5", *_X264],  # ... and x1.5 (clipped where it overflows)
}
UNMARKED_CLIPS = 24  # per size: clips never marked, read for false positives
UNMARKED_FRAMES = 64  # each, as many as `verify` samples from a file


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


def attack(src: Path, dst: Path, name: str) -> Path:
    """`src` attacked by ATTACKS[name] (ffmpeg), written to `dst`; `src` itself for "none"."""
    if ATTACKS[name] is None:
        return src
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(src), *ATTACKS[name], str(dst)], check=True,
                   timeout=600)
    return dst


def trial(embed, read, size: int, tmp: Path, name: str, detect=None, unmarked: int = UNMARKED_CLIPS,
          attacks=tuple(ATTACKS)) -> dict:
    """One method at one size: PSNR, embed fps, bit accuracy per attack (of `attacks`); with `detect` (a reader
    that says whether its check passed), "found" per attack, and false positives on `unmarked` clips."""
    frames = make_clip(size)
    bits = payload_bits()
    took = []
    while len(took) < 3 and sum(took) < 5:  # the fastest of up to 3 runs (within 5 s): a shared machine is noisy
        t0 = time.perf_counter()
        marked = embed(frames, bits)
        took.append(time.perf_counter() - t0)
    fps = len(frames) / min(took)
    src = tmp / f"wm-{name}-{size}.mp4"
    with VideoWriter(src, size, size, FPS) as w:
        w.write(marked)
    row = {"psnr_db": round(psnr(marked, frames), 2), "embed_fps": round(fps, 1), "bit_accuracy": {}}
    if detect is not None:
        row["found"] = {}
    for name_ in attacks:
        path = attack(src, tmp / f"wm-{name}-{size}-{name_}.mp4", name_)
        if detect is not None:
            found = detect(read_frames(path))
            got, row["found"][name_] = found["bits"][:32], found["found"]
        else:
            got = read(read_frames(path))
        row["bit_accuracy"][name_] = 0.0 if got is None else round(float((np.asarray(got) == bits).mean()), 4)
        if path != src:
            path.unlink()
    src.unlink()
    plain = read(frames)
    row["false_positive"] = plain is not None and bool((np.asarray(plain) == bits).all())
    if detect is not None and unmarked:
        row["unmarked"] = false_positives(detect, size, unmarked)
    return row


def unmarked_clip(size: int, seed: int, frames: int = UNMARKED_FRAMES) -> np.ndarray:
    """A clip no watermark was written on, one of five kinds by seed: the moving blob of `make_clip`, one still
    frame, a texture (2 to 32 px grain) drifting a pixel a frame, either of the first two letterboxed (black
    bars, a quarter of the height), or a dim, low-contrast one."""
    rng = np.random.default_rng(seed)
    kind = seed % 5
    if kind == 2:
        grain = int(rng.choice([2, 4, 8, 16, 32]))
        small = Image.fromarray((rng.random((size // grain + 2, (size + frames) // grain + 2)) * 255).astype(np.uint8))
        field = np.asarray(small.resize((small.width * grain, small.height * grain), Image.BICUBIC))
        clip = np.stack([field[:size, t:t + size] for t in range(frames)])
        return np.repeat(clip[..., None], 3, -1)
    clip = make_clip(size, seconds=frames / FPS, seed=seed)
    if kind == 1:
        return np.repeat(clip[:1], frames, 0)
    if kind == 3:
        bar = size // 8
        clip[:, :bar] = clip[:, -bar:] = 0
    if kind == 4:
        clip = (clip.astype(np.float32) * 0.3 + 20).astype(np.uint8)
    return clip


def false_positives(detect, size: int, clips: int = UNMARKED_CLIPS) -> dict:
    """`detect` on `clips` unmarked clips: how many gave a payload (each one a false positive), the words
    checked against a CRC (by its bits, per clip on average), and the bound they give per file,
    sum(checked * 2**-bits)."""
    found, checked = 0, {}
    for seed in range(clips):
        result = detect(unmarked_clip(size, seed))
        found += bool(result["found"])
        for kind, count in result.get("checked", {}).items():
            checked[kind] = checked.get(kind, 0) + count
    mean = {kind: round(count / clips, 1) for kind, count in checked.items()}
    bound = sum(count * 2.0 ** -int(kind.removeprefix("crc")) for kind, count in mean.items())
    return {"clips": clips, "frames": UNMARKED_FRAMES, "found": found, "checked_per_clip": mean,
            "bound_per_file": float(f"{bound:.2g}")}


def _longtake_embed(frames: np.ndarray, bits: np.ndarray) -> np.ndarray:
    payload = int("".join(map(str, bits)), 2)
    return watermark.Embedder(payload, frames.shape[2], frames.shape[1]).mark(frames)


def _longtake_read(frames) -> np.ndarray | None:
    found = watermark.read(frames)
    return found["bits"][:32]


METHODS = {  # name: (embed, read[, detect])
    f"longtake ({watermark.NAME}: STDM, luma DCT, {watermark.PAYLOAD_BITS} + {watermark.CRC_BITS} CRC bits)":
        (_longtake_embed, _longtake_read, watermark.read)}


def measure(tmp: Path, methods: dict = METHODS, sizes=SIZES) -> dict:
    """{method: {size: row}}."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {name: {str(size): trial(embed, read, size, tmp, f"m{i}", *detect) for size in sizes}
            for i, (name, (embed, read, *detect)) in enumerate(methods.items())}


def table(results: dict) -> list[str]:
    """Markdown lines: method, size, PSNR, fps, then bit accuracy per attack ("n/m": not measured; a "*" where
    the method's own check found no mark)."""
    attacks = list(ATTACKS)
    lines = ["| method | size | PSNR dB | embed fps | " + " | ".join(attacks) + " |",
             "|---|---|---|---|" + "---|" * len(attacks)]
    for method, by_size in results.items():
        for size, row in by_size.items():
            if "error" in row:
                lines.append(f"| {method} | {size} | | | {row['error']} |" + " |" * (len(attacks) - 1))
                continue
            found = row.get("found", {})
            accs = " | ".join("n/m" if a not in row["bit_accuracy"] else f"{row['bit_accuracy'][a]:.3f}"
                              + ("*" if found.get(a) is False else "") for a in attacks)
            lines.append(f"| {method} | {size}x{size} | {row['psnr_db']:.1f} | {row['embed_fps']:.0f} | {accs} |")
    return lines


def false_positive_lines(results: dict) -> list[str]:
    """One sentence per method and size measured on unmarked clips."""
    lines = []
    for method, by_size in results.items():
        for size, row in by_size.items():
            u = row.get("unmarked")
            if u is None:
                continue
            checked = ", ".join(f"{n} against a {k.upper()}" for k, n in u["checked_per_clip"].items())
            lines.append(f"- {method.split(' (')[0]}, {size}x{size}: a payload in {u['found']} of {u['clips']} "
                         f"unmarked clips of {u['frames']} frames; words checked per clip {checked}: at most "
                         f"{u['bound_per_file']:.1e} false positives per file.")
    return lines


CANDIDATES = Path(__file__).resolve().parents[2] / "benchmarks" / "watermark-candidates.json"


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
             "textured gradient), written as longtake writes (H.264, CRF 18), then attacked with ffmpeg, each "
             "attacked file re-encoded at CRF 28: `crf28` only that, `half` resized to half width and height, "
             "`excerpt_2s` a 2-second cut from 1.5 s, and both; `crop_10` 10 % cropped off every side, "
             "`crop_asym` 10 % off the left, 3 % off the right and top, 7 % off the bottom; `pad_16x9` "
             "pillarboxed (black bars left and right) into a 16:9 frame, `pad_9x16` letterboxed into 9:16; "
             "`brighter` and `darker` ffmpeg's `eq=brightness=` +0.15 and -0.15 (luma up or down by about 40 of 255 "
             "levels, clipped), `contrast_0.5` and `contrast_1.5` `eq=contrast=` (luma's distance from "
             "mid-grey x0.5 and x1.5, clipped). The sizes follow Video Seal's published attacks (crops, "
             "brightness and contrast x0.5 to x1.5). Bit accuracy is read from the attacked file (every frame "
             "votes); a `*` marks a file where the method's own check found nothing; PSNR is the marked frames "
             "against the unmarked ones; embed fps on one core, the fastest of up to 3 runs.", "", *table(results)]
    fp = false_positive_lines(d["longtake"])
    if fp:
        lines += ["", "False positives, measured: unmarked clips (a moving blob, a still frame, a drifting texture, "
                  "letterboxed, dim and low-contrast; `bench_watermark.unmarked_clip`), read as `verify` reads "
                  "a file. A payload is reported only when its CRC-32 passes (the legacy scheme's CRC-16 is "
                  "checked a few times), so the bound is the number of words checked times 2**-32 (2**-16):", "",
                  *fp]
    notes = cand.get("notes")
    lines += ["", "Reading it: longtake's rows are from this run; the others from `scripts/watermark_candidates.py` "
              + (f"({cand.get('date', 'date not recorded')})" if cand else "(not run: no "
                 "benchmarks/watermark-candidates.json)") + ". " + (notes or "")]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description="The watermark table alone (`longtake bench` runs it too).")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--table", type=Path, help="a Markdown file whose watermark section is replaced (or appended)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = {"longtake": measure(Path(tmp)), "candidates": candidates()}
    if args.out:
        args.out.write_text(json.dumps(d, indent=2, default=lambda o: o.tolist()) + "\n")
    text = "\n".join(section(d))
    print(text)
    if args.table:
        old = args.table.read_text() if args.table.exists() else ""
        head = "## Watermark: method x attack -> bit accuracy"
        start = old.find(head)
        if start < 0:
            args.table.write_text(old.rstrip("\n") + "\n\n" + text + "\n")
        else:
            end = old.find("\n## ", start + len(head))
            args.table.write_text(old[:start] + text + ("\n" + old[end:] if end >= 0 else "\n"))


if __name__ == "__main__":
    main()
