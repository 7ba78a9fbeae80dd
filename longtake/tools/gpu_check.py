"""The GPU check: the one call to make when a GPU is available (`scripts/gpu_check.sh`; at most 8 minutes on
one GPU). It prints one JSON summary on stdout and writes the details into --out.

    scripts/gpu_check.sh [--dry-run] [--out DIR]

Steps (STEPS, in this order; each is timed, and one that fails is reported, not fatal):

families   every family's CUDA path on its tiny model (the bundled model, and TINY_MODELS: AnimateDiff with and
           without a pose ControlNet and IP-Adapter, Wan 2.1, Wan-Animate), in one process: the family's GPU
           weight dtype (ModelInfo.cuda_dtype: bfloat16 for Wan, float16 for AnimateDiff), float32 latents and
           VAE, against the same request's CPU float32 frames. Tolerance (FRAMES_TOLERANCE): the weights' dtype
           keeps 8 (bfloat16) or 11 (float16) bits of mantissa, about 0.4 % (0.05 %) per product, compounding
           through the layers and the steps of a random-weight model that nothing trained to be smooth; the
           latents, the scheduler and the VAE stay float32 and add no more. So: PSNR >= 25 dB against the CPU
           frames (a visible but small difference), and never a blank or NaN frame.
wan_1_3b   a 1.3B-sized Wan transformer (WAN_1_3B: Wan2.1-T2V-1.3B's published transformer config) with random
           bfloat16 weights at 480 x 832 with 81-frame windows (21 latent frames): seconds per window-step (two
           passes, classifier-free guidance), peak GPU memory per worker, and what that gives for a 20 s clip
           at 16 fps on one GPU (50 steps, the model's default, plus its decode).
decode     Wan's VAE (diffusers' AutoencoderKLWan default config: Wan 2.1's) with random float32 weights,
           decoding one 81-frame window at 480 x 832 frame by frame: peak GPU memory and frames per second.
bench      `longtake bench --quick --device cuda`: its GPU rows (BENCH_TIMEOUT_S at most).

--dry-run (on any machine): lists the steps with what each would run, imports everything they need, checks
the 1.3B config against diffusers' class (its parameter count, on the meta device: no memory), and exits 0
when all of that holds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

STEPS = ("families", "wan_1_3b", "decode", "bench")
FRAMES_TOLERANCE = {"psnr_db_min": 25.0}  # module docstring: why
BENCH_TIMEOUT_S = 200
CLIP_SECONDS, CLIP_FPS, CLIP_STEPS = 20, 16, 50  # the wan_1_3b projection's clip
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (1.42 B parameters)
WAN_1_3B = {"patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
WAN_SIZE = (480, 832)  # Wan 2.1 1.3B's published size
WAN_WINDOW = 21  # latent frames: 81 frames, the model's native length
WAN_OVERLAP = 5  # latent frames (longtake's default for Wan)
IMPORTS = ("torch", "diffusers", "transformers", "safetensors", "ray", "imageio_ffmpeg",
           "longtake.pipelines.animatediff", "longtake.pipelines.wan", "longtake.pipelines.wan_animate",
           "longtake.pipelines.parallel", "longtake.cluster.engine", "longtake.tools.bench")


def plan() -> list[dict]:
    """What each step runs (the dry run's list)."""
    from longtake.pipelines.tiny import TINY_MODELS

    return [
        {"step": "families", "runs": [f"{m}: a 2 s clip on cuda (its cuda_dtype) and on cpu (float32), frames compared"
                                      for m in family_models()], "tolerance": FRAMES_TOLERANCE},
        {"step": "wan_1_3b", "runs": f"WanTransformer3DModel(**WAN_1_3B) bfloat16, random weights, "
                                     f"{WAN_SIZE[0]}x{WAN_SIZE[1]}, {WAN_WINDOW} latent frames, 1 warm-up + 3 timed "
                                     f"window-steps (2 passes each)",
         "projects": f"a {CLIP_SECONDS} s clip at {CLIP_FPS} fps, {CLIP_STEPS} steps, on one GPU"},
        {"step": "decode", "runs": f"AutoencoderKLWan() float32, random weights, one {WAN_WINDOW}-latent-frame window "
                                   f"at {WAN_SIZE[0]}x{WAN_SIZE[1]}, frame by frame"},
        {"step": "bench", "runs": f"longtake bench --quick --device cuda (at most {BENCH_TIMEOUT_S} s)"},
        {"not_run": "context parallelism across GPUs (--cp): one GPU here; tests/test_cp.py runs it on the CPU "
                    "(gloo); on a node of 2+ GPUs: longtake render ... --model tiny-wan --cp 2 --device cuda",
         "tiny_models": list(TINY_MODELS)},
    ]


def family_models() -> list[str]:
    from longtake.pipelines.tiny import TINY_MODELS

    return ["default", *TINY_MODELS]


def _request(model: str, media: Path, out: Path) -> dict:
    """A short clip of `model`, with the pose and photo the models that need them take."""
    from longtake.pipelines.tiny import TINY_POSE, TINY_POSE_IP, TINY_WAN_ANIMATE

    req = {"prompt": "a red ball moving right", "seconds": 2, "fps": 8, "steps": 4, "seed": 0, "out": str(out),
           "model": model, "label": "none"}
    if model in (TINY_POSE, TINY_POSE_IP, TINY_WAN_ANIMATE):
        req["pose"] = str(media / "pose.json")
    if model in (TINY_POSE_IP, TINY_WAN_ANIMATE):
        req["reference"] = str(media / "photo.png")
    if model != "default":
        req.update(height=64, width=64)
    return req


def _frames(request: dict, gpus: int) -> tuple[np.ndarray, float]:
    from longtake.actors.pool import InProcessPool
    from longtake.cluster.engine import prepare, run
    from longtake.cluster.runtime import worker_plan
    from longtake.pipelines import ROLES

    job = prepare(request)
    spec, _ = worker_plan(job, gpus=gpus, cpus=1)
    pool = InProcessPool(replace(spec, roles=ROLES))
    chunks, t0 = [], time.perf_counter()
    try:
        run(job, pool, progress=False, on_frames=lambda first, f: chunks.append(f.copy()))
    finally:
        pool.shutdown()
    return np.concatenate(chunks), time.perf_counter() - t0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def check_families(work: Path) -> dict:
    from longtake.tools.samples import write_animate_media

    media = work / "media"
    media.mkdir(exist_ok=True)
    write_animate_media(media)
    out = {"models": {}}
    for model in family_models():
        try:
            req = _request(model, media, work / f"{model}.mp4")
            cpu, cpu_s = _frames({**req, "device": "cpu"}, gpus=0)
            gpu, gpu_s = _frames({**req, "device": "cuda"}, gpus=1)
            diff = np.abs(cpu.astype(int) - gpu)
            quality = psnr(cpu, gpu)
            out["models"][model] = {"frames": int(len(gpu)), "psnr_db": round(quality, 2), "max_abs": int(diff.max()),
                          "mean_abs": round(float(diff.mean()), 3), "cpu_s": round(cpu_s, 2), "cuda_s": round(gpu_s, 2),
                          "ok": bool(quality >= FRAMES_TOLERANCE["psnr_db_min"] and gpu.std() > 1)}
        except Exception as e:  # reported, not fatal: the other families still run
            out["models"][model] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                    "trace": traceback.format_exc()[-2000:]}
    out["ok"] = all(m["ok"] for m in out["models"].values())
    return out


def window_steps(seconds: float = CLIP_SECONDS, fps: float = CLIP_FPS) -> tuple[int, int]:
    """(frames, windows) of a Wan clip: 4k + 1 frames, windows of WAN_WINDOW latent frames."""
    from longtake.core.windows import plan_windows

    frames = round(seconds * fps)
    latent = (frames - 1 + 3) // 4 + 1
    return frames, len(plan_windows(latent, WAN_WINDOW, WAN_OVERLAP))


def wan_parameters(config: dict = WAN_1_3B) -> int:
    """The transformer's parameter count, built on the meta device (no memory)."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return sum(p.numel() for p in model.parameters())


def check_wan_1_3b() -> dict:
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("cuda"):
        model = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16).eval()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # a worker's peak: its bf16 weights and a window (not the fp32 init)
    h, w = WAN_SIZE[0] // 8, WAN_SIZE[1] // 8
    g = torch.Generator("cuda").manual_seed(0)
    z = torch.randn(1, 16, WAN_WINDOW, h, w, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.tensor([500.0], device="cuda")
    times = []
    with torch.inference_mode():
        for i in range(4):  # one warm-up, three timed
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for k in range(2):  # conditional and unconditional passes
                model(hidden_states=z, timestep=t, encoder_hidden_states=text[k:k + 1], return_dict=False)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    frames, windows = window_steps()
    return {"parameters": wan_parameters(), "window_step_s": round(step_s, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "clip": {"seconds": CLIP_SECONDS, "fps": CLIP_FPS, "steps": CLIP_STEPS, "frames": frames,
                     "windows": windows, "denoise_s": round(windows * CLIP_STEPS * step_s, 1),
                     "frames_per_second": round(frames / (windows * CLIP_STEPS * step_s), 3)}}


def check_decode() -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the VAE's float32 weights (0.5 GB) and its decode
    with torch.device("cuda"):
        vae = AutoencoderKLWan().eval()
    z = torch.randn(1, 16, WAN_WINDOW, WAN_SIZE[0] // 8, WAN_SIZE[1] // 8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        video = vae.decode(z, return_dict=False)[0]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"frames": int(video.shape[2]), "seconds": round(seconds, 2),
            "frames_per_second": round(video.shape[2] / seconds, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def check_bench(work: Path) -> dict:
    out = work / "bench-cuda.json"
    try:
        proc = subprocess.run([sys.executable, "-m", "longtake", "bench", "--quick", "--device", "cuda", "-q",
                               "--out", str(out)], capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"longer than {BENCH_TIMEOUT_S} s"}
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-2000:]}
    data = json.loads(out.read_text())
    return {"ok": True, "figures": data["figures"]}


def dry_run() -> dict:
    imports = {}
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
            imports[name] = getattr(module, "__version__", "ok")
        except Exception as e:
            imports[name] = f"FAILED: {type(e).__name__}: {e}"
    import torch

    from longtake.video import ffmpeg_exe

    parameters = wan_parameters()
    ok = not any(str(v).startswith("FAILED") for v in imports.values()) and 1.2e9 < parameters < 1.6e9
    return {"dry_run": True, "ok": ok, "cuda_available": torch.cuda.is_available(), "steps": plan(),
            "imports": imports, "ffmpeg": ffmpeg_exe(), "wan_1_3b_parameters": parameters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps and check the imports (any machine)")
    parser.add_argument("--out", default="gpu-check", help="where the details go (default gpu-check/)")
    args = parser.parse_args(argv)
    if args.dry_run:
        summary = dry_run()
        print(json.dumps(summary))
        return 0 if summary["ok"] else 1
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": f"no CUDA device (torch {torch.__version__}): run --dry-run here"}))
        return 1
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": {}}
    checks = {"families": lambda: check_families(Path(tempfile.mkdtemp(dir=work))), "wan_1_3b": check_wan_1_3b,
              "decode": check_decode, "bench": lambda: check_bench(work)}
    for step in STEPS:
        t0 = time.perf_counter()
        try:
            result = checks[step]()
        except Exception as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        summary["steps"][step] = {**result, "step_s": round(time.perf_counter() - t0, 1)}
        (work / "summary.json").write_text(json.dumps(summary, indent=1))  # what ran so far, if time runs out
    summary["ok"] = all(summary["steps"][s].get("ok", "error" not in summary["steps"][s]) for s in STEPS)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
