"""`longtake bench`: how close longtake runs to the compute limit, every figure a ratio taken in one run.

    longtake bench [--quick] [--device cpu|cuda] --out BENCH.json [--table BENCHMARKS.md]

1. parallel efficiency: one clip with 1 and with 2 workers (1 torch thread each on CPU)
2. engine overhead: render wall time / (sum of the pure model-prediction times of its windows / workers)
3. redundant compute: model evaluations per output frame vs the plan's minimum (L / S), and where the
   rest of the wall time goes (text encoding, fusion, scheduler steps, transfers and waiting, decoding)
4. seams of the default model: every weighting, FreeNoise on, naive windows (the model alone), and with its plan
5. driver memory: peak RSS rendering 10, 30 and 60 s (one process; the peak is reset between renders)
6. ffmpeg encoding speed in multiples of real time, at the default size and at 512x512
7. against diffusers' own AnimateDiffPipeline with FreeNoise in one process, on the tiny model
8. a projection of the step schedule to K = 1..64 workers on several nodes, fed with the times just
   measured, checked against the measured K = 1 and 2
9. Wan (tiny-wan): longtake's 21-latent-frame windows on 2 workers against diffusers' WanPipeline
   rendering the whole clip as one window, at 1, 2, 4 and 8 times the native length (81 to 669 frames):
   wall, denoising and decoding time, diffusers' peak memory, and how each grows with the length
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from longtake.tools import bench_watermark
from longtake.cluster.engine import RenderResult, prepare, run
from longtake.video import VideoWriter

logger = logging.getLogger(__name__)

TARGETS = {"parallel_efficiency": ">= 0.95", "overhead_ratio_1": "<= 1.05", "overhead_ratio_2": "<= 1.05",
           "seam_ratio": "<= 1.2", "projection_error_1": "<= 0.10", "projection_error_2": "<= 0.10",
           "projected_efficiency_64": ">= 0.92", "scaling_linear": "<= 1.10", "serve_share": "<= 2",
           "startup_s": "<= 6", "watermark_bit_accuracy_min": ">= 0.95", "watermark_psnr_db_min": ">= 38"}
STARTUP_SECONDS = 4  # the short render whose start-up `startup` measures


def plan_spec(job, device: str):
    """The workers' spec `longtake render` would use for this job on this device (one thread each on CPU)."""
    from longtake.cluster.runtime import worker_plan

    return worker_plan(job, gpus=1 if device == "cuda" else 0, cpus=1)[0]


def _pool(spec, workers: int):
    from longtake.actors.ray_pool import RayPool

    return RayPool(spec, workers)


def timed_render(pool, request: dict, on_frames=None) -> tuple[RenderResult, dict]:
    """Render once; return the result and the workers' pure compute times for it."""
    pool.stats()  # reset
    result = run(prepare(request), pool, progress=False, on_frames=on_frames)
    stats = pool.stats()
    predict = [t for s in stats for t in s["predict"]]
    decode = [t for s in stats for t in s["decode"]]
    return result, {"predict_sum": sum(predict), "predict_mean": float(np.mean(predict)),
                    "decode_sum": sum(decode), "decode_mean": float(np.mean(decode)) if decode else 0.0,
                    "predict_calls": len(predict)}


# ---------------------------------------------------------------- 0: start-up of a short CLI render

def startup(model: str, device: str, tmp: Path, workers: int | None = None) -> dict:
    """A short `longtake render` as a user runs it (a new process): the process's wall time and where it
    goes. `startup_s` is the wall time minus the engine's own: interpreter and imports, Ray starting, the
    workers starting and loading the model, and everything stopping. A short CPU job renders in its own
    process (no Ray: `runtime.local_reason`); `workers` asks for Ray workers, as `--workers` does. Run
    before any other Ray is up, so the render starts its own as a user's would."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "longtake", "render", "a red ball moving right on a blue background",
           "--seconds", str(STARTUP_SECONDS), "--model", model, "--device", device, "--out", str(tmp / "startup.mp4"),
           "--json", "-q", *(["--workers", str(workers)] if workers else [])]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:5])}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    t = result["timings"]
    parts = {"engine_s": result["wall_s"], "ray_start_s": t.get("ray_start_s", 0.0),
             "workers_start_s": t["workers_start_s"] - t.get("ray_start_s", 0.0), "stop_s": t["workers_stop_s"]}
    parts["interpreter_imports_and_rest_s"] = wall - sum(parts.values())
    return {"seconds": STARTUP_SECONDS, "process_wall_s": round(wall, 3), "startup_s": round(wall - result["wall_s"], 3),
            "parts": {k: round(v, 3) for k, v in parts.items()}, "workers": result["workers"],
            "ray": "ray_start_s" in t}


# ---------------------------------------------------------------- 1-3: scaling, overhead, redundancy

def _scaling_row(result: RenderResult, compute: dict, k: int) -> dict:
    t = result.timings
    ideal = compute["predict_sum"] / k
    transfers = t["denoise_s"] - t["fuse_s"] - t["scheduler_s"] - ideal
    return {"wall_s": result.wall_s, "ideal_s": round(ideal, 3), "overhead_ratio": result.wall_s / ideal,
            "frames_sha256": result.frames_sha256, "timings": t, "compute": compute, "schedule": result.schedule,
            "fractions": {"prediction": ideal / result.wall_s, "text_encoding": t["encode_s"] / result.wall_s,
                          "fusion": t["fuse_s"] / result.wall_s, "scheduler": t["scheduler_s"] / result.wall_s,
                          "transfers_and_waiting": max(transfers, 0.0) / result.wall_s,
                          "decode_and_encode": t["decode_s"] / result.wall_s},
            "windows": result.windows, "steps": result.steps, "frames": result.frames}


def scaling(spec, request: dict, tmp: Path) -> dict:
    """1 and 2 workers, with the request's schedule (the wavefront) and with the barrier; with 2 workers,
    the same render again with checkpoints at the farm's default k."""
    from longtake.cluster.checkpoint import Checkpointer, fingerprint

    out = {}
    for k in (1, 2):
        pool = _pool(spec, k)
        try:
            timed_render(pool, {**request, "seconds": 2, "steps": 1, "out": str(tmp / "warm.mp4")})  # warm up
            result, compute = timed_render(pool, {**request, "out": str(tmp / f"scale{k}.mp4")})
            out[k] = _scaling_row(result, compute, k)
            barrier, compute = timed_render(pool, {**request, "schedule": "barrier", "out": str(tmp / f"barrier{k}.mp4")})
            out[f"barrier_{k}"] = _scaling_row(barrier, compute, k)
            if k == 2:
                job = prepare({**request, "out": str(tmp / "ckpt.mp4")})
                ckpt = Checkpointer(tmp / "checkpoints", every=5, fingerprint=fingerprint(job, spec.dtype, spec.device))
                with_ckpt = run(job, pool, progress=False, checkpoint=ckpt)
                out["checkpoint"] = {"every": 5, "saved": with_ckpt.checkpoints_saved,
                                     "seconds_each": with_ckpt.checkpoint_s / max(1, with_ckpt.checkpoints_saved),
                                     "bytes_each": ckpt.paths()[0].stat().st_size,
                                     "slowdown": with_ckpt.wall_s / result.wall_s,
                                     "same_frames": with_ckpt.frames_sha256 == result.frames_sha256}
        finally:
            pool.shutdown()
    job = prepare({**request, "out": str(tmp / "x.mp4")})
    stride = job.window - job.overlap
    out["evals_per_frame"] = len(job.windows) * job.window / job.latent_frames
    out["evals_per_frame_min"] = job.window / stride
    out["parallel_efficiency"] = out[1]["wall_s"] / out[2]["wall_s"] / 2
    out["parallel_efficiency_barrier"] = out["barrier_1"]["wall_s"] / out["barrier_2"]["wall_s"] / 2
    # with a barrier at every step, W windows on 2 workers take ceil(W/2) rounds, not W/2: the best the
    # barrier can do with this plan (the wavefront has no such bound)
    out["plan_bound_2"] = (len(job.windows) / 2) / math.ceil(len(job.windows) / 2)
    # one window's prediction with 2 workers computing at once / with 1: what sharing the machine costs the
    # model itself (2 cores: the driver, Ray's own processes and the memory bus are shared), not the schedule
    out["compute_slowdown_2"] = out[2]["compute"]["predict_mean"] / out[1]["compute"]["predict_mean"]
    out["same_frames"] = len({out[k]["frames_sha256"] for k in (1, 2, "barrier_1", "barrier_2")}) == 1
    return out


def linear(spec, request: dict, tmp: Path, lengths=(10, 30, 60, 120)) -> dict:
    """Wall time per second of video for clips of several lengths, on 2 workers (one pool, warmed up):
    a schedule that scales keeps it flat. `scaling_linear` is the largest over the smallest."""
    pool = _pool(spec, 2)
    rows = {}
    try:
        timed_render(pool, {**request, "seconds": 2, "steps": 1, "out": str(tmp / "warm.mp4")})
        for seconds in lengths:
            job = prepare({**request, "seconds": seconds, "out": str(tmp / "linear.mp4")})
            result = run(job, pool, progress=False)
            rows[seconds] = {"wall_s": result.wall_s, "wall_per_second": result.wall_s / seconds,
                             "windows": result.windows, "evals_per_frame": len(job.windows) * job.window / job.latent_frames,
                             "wall_per_window_step": result.wall_s / (len(job.windows) * result.steps)}
    finally:
        pool.shutdown()
    per = [r["wall_per_second"] for r in rows.values()]
    per_window = [r["wall_per_window_step"] for r in rows.values()]
    # the plan's share: a short clip's edge windows evaluate more window frames per output frame
    return {"rows": rows, "scaling_linear": max(per) / min(per),
            "scaling_linear_per_window": max(per_window) / min(per_window)}


# ---------------------------------------------------------------- 3b: two jobs sharing `serve`

def _http(base: str, method: str, path: str, token: str, body: dict | None = None) -> dict:
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _until(base: str, token: str, job_id: str, done, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = _http(base, "GET", f"/v1/videos/{job_id}", token)
        if done(job):
            return job
        if job["status"] in ("failed", "cancelled", "deleted"):
            raise RuntimeError(f"serve bench: job {job_id} {job['status']}: {job.get('error')}")
        time.sleep(0.1)
    raise RuntimeError(f"serve bench: job {job_id} not there after {timeout_s:g} s")


def serve_share(model_path: str, request: dict, tmp: Path, short: float = 5, long: float = 60) -> dict:
    """`longtake serve` with 2 warm denoiser replicas: a `short`-second job alone, then the same job
    submitted while a `long`-second one renders. `serve_share` is its time from submission to done with
    the long job running over its time alone (fair sharing: about 2, a queue behind the long job's
    windows: far more)."""
    import socket

    from longtake.serve.deployments import start_server, stop_server
    from longtake.serve.limits import Limits

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token, base = "bench-token", f"http://127.0.0.1:{port}"
    started = start_server(model_path, str(tmp / "serve"), token, "127.0.0.1", port, 2, 2, Limits(), device="cpu")
    try:
        job = {k: v for k, v in request.items() if k not in ("model", "device", "out")}
        finished = lambda j: j["status"] == "done"

        def timed(seconds: float) -> float:
            t0 = time.monotonic()
            job_id = _http(base, "POST", "/v1/videos", token, {**job, "seconds": seconds})["id"]
            _until(base, token, job_id, finished)
            return time.monotonic() - t0

        timed(2)  # warm up: the replicas have their model, the manager its scheduler
        alone = timed(short)
        long_id = _http(base, "POST", "/v1/videos", token, {**job, "seconds": long})["id"]
        _until(base, token, long_id, lambda j: ((j.get("progress") or {}).get("window_steps_done") or 0) >= 10)
        shared = timed(short)
        long_job = _http(base, "GET", f"/v1/videos/{long_id}", token)
        still_running = long_job["status"] == "running"
        _http(base, "DELETE", f"/v1/videos/{long_id}", token)
    finally:
        stop_server(started)
    return {"short_seconds": short, "long_seconds": long, "short_alone_s": round(alone, 3),
            "short_with_long_s": round(shared, 3), "long_still_running": still_running,
            "serve_share": shared / alone}


# ---------------------------------------------------------------- 4: seams

def seams(spec, model: str, clips: int, seconds: float, tmp: Path, progress: bool) -> dict:
    from longtake.tools.evaluate import MOVING, eval_specs, render_frames
    from longtake.models.shapes import BACKGROUNDS
    from longtake.quality import object_track, seam_pairs, seam_ratio

    # the model alone (plan none): its own motion shows what fusion does; a planned path would join naive
    # windows too (one path, drawn for the whole clip); the default, planned, is its own row
    configs = {"pyramid": {}, "flat": {"weighting": "flat"}, "overlap-linear": {"weighting": "overlap-linear"},
               "pyramid+freenoise": {"noise": "freenoise"}, "naive": {"overlap": 0, "weighting": "flat"}}
    configs = {**{name: {**c, "plan": "none"} for name, c in configs.items()}, "pyramid+plan": {"plan": "auto"}}
    specs = [s for s in eval_specs(clips * 3) if s.motion in MOVING][:clips]
    pool = _pool(spec, 2)
    ratios: dict[str, list[float]] = {name: [] for name in configs}
    try:
        work = [(name, i, s) for name in configs for i, s in enumerate(specs)]
        for name, i, s in tqdm(work, desc="seams", unit="clip", disable=not progress):
            req = dict(prompt=s.caption, seconds=seconds, fps=8, seed=2000 + i, model=model,
                       out=str(tmp / "seam.mp4"), **configs[name])
            frames, job = render_frames(pool, req)
            ratios[name].append(seam_ratio(object_track(frames, BACKGROUNDS[s.background]),
                                           seam_pairs(job.windows, len(frames))))
    finally:
        pool.shutdown()
    return {name: float(np.nanmedian(v)) if not np.all(np.isnan(v)) else None for name, v in ratios.items()}


# ---------------------------------------------------------------- 5: memory

def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory(spec, request: dict, tmp: Path) -> dict:
    pool = _pool(spec, 2)
    out = {}
    try:
        timed_render(pool, {**request, "seconds": 2, "out": str(tmp / "warm.mp4")})
        for seconds in (10, 30, 60):
            if not _reset_peak():
                return {"error": "cannot reset the peak RSS (/proc/self/clear_refs)"}
            job = prepare({**request, "seconds": seconds, "out": str(tmp / "mem.mp4")})
            result = run(job, pool, progress=False)
            c, h, w = job.latent_shape
            out[seconds] = {"peak_rss_mb": round(_peak_mb(), 1), "frames": result.frames,
                            "latents_mb": round(c * job.latent_frames * h * w * 4 / 2**20, 2)}
    finally:
        pool.shutdown()
    out["rss_ratio_60_10"] = out[60]["peak_rss_mb"] / out[10]["peak_rss_mb"]
    return out


# ---------------------------------------------------------------- 6: encoding

def encoding(default_size: int, seconds: float, tmp: Path, fps: float = 8) -> dict:
    out = {}
    for size in (default_size, 512):
        n = int(seconds * fps)
        x = np.linspace(0, 255, size, dtype=np.float32)
        frames = [np.stack([np.broadcast_to((x + 7 * i) % 256, (size, size)),
                            np.broadcast_to(((x + 3 * i) % 256)[:, None], (size, size)),
                            np.full((size, size), (5 * i) % 256, np.float32)], axis=-1).astype(np.uint8)
                  for i in range(min(n, 64))]
        t0 = time.perf_counter()
        with VideoWriter(tmp / f"enc{size}.mp4", size, size, fps) as writer:
            for i in range(n):
                writer.write(frames[i % len(frames)])
        wall = time.perf_counter() - t0
        out[size] = {"frames": n, "wall_s": round(wall, 3), "realtime_x": (n / fps) / wall}
    return out


# ---------------------------------------------------------------- 7: against diffusers

def versus_diffusers(device: str, frames: int, steps: int, tmp: Path) -> dict:
    import torch
    from diffusers import AnimateDiffPipeline

    from longtake.pipelines.tiny import ensure_tiny_model

    path = str(ensure_tiny_model())
    request = dict(prompt="a red ball moving right", seconds=frames / 8, fps=8, steps=steps, guidance=7.5,
                   model=path, device=device, seed=0)
    job = prepare({**request, "out": str(tmp / "d.mp4")})
    threads = torch.get_num_threads()
    pipe = AnimateDiffPipeline.from_pretrained(path, use_safetensors=True)
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise(context_length=job.window, context_stride=4)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # the obvious way: one process, every core

    def diffusers_once(n: int, k: int) -> float:
        t0 = time.perf_counter()
        video = pipe(request["prompt"], num_frames=n, num_inference_steps=k, guidance_scale=7.5,
                     height=job.height, width=job.width, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(0)).frames[0]  # (F, H, W, 3) in [0, 1]
        with VideoWriter(tmp / "diffusers.mp4", job.width, job.height, 8) as writer:
            writer.write((np.asarray(video) * 255).round().astype(np.uint8))
        return time.perf_counter() - t0

    try:
        diffusers_once(job.window, 1)  # warm up
        diffusers_wall = diffusers_once(frames, steps)
    finally:
        torch.set_num_threads(threads)
    out = {"frames": frames, "steps": steps, "diffusers_wall_s": round(diffusers_wall, 3),
           "diffusers_threads": os.cpu_count() if device == "cpu" else None}
    spec = plan_spec(job, device)
    for k in (1, 2):
        pool = _pool(spec, k)
        try:
            timed_render(pool, {**request, "seconds": 2, "steps": 1, "out": str(tmp / "w.mp4")})
            result, _ = timed_render(pool, {**request, "out": str(tmp / f"lt{k}.mp4")})
        finally:
            pool.shutdown()
        out[f"longtake_{k}_wall_s"] = result.wall_s
        out[f"vs_diffusers_{k}"] = diffusers_wall / result.wall_s  # > 1: longtake is faster
    return out


# ---------------------------------------------------------------- 9: Wan, windows against one whole-clip window

WAN_MULTIPLES = (1, 2, 4, 8)  # clip length in native windows (tiny-wan: 21 latent frames = 81 frames)
WAN_QUICK_SIZE = 128


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc), so one render's leftovers do not hide the next one's peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _memory_mark(device: str) -> float | None:
    """Start a peak-memory measurement; returns the level it is measured from (MB), or None if it cannot be."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    _malloc_trim()
    return _peak_mb() if _reset_peak() else None  # just after the reset, the peak is the current RSS


def _memory_peak(device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_mb()


def wan_scaling(device: str, tmp: Path, quick: bool, progress: bool = False, *, multiples=WAN_MULTIPLES,
                size: int | None = None, steps: int | None = None, guidance: float = 5.0, workers: int = 2,
                in_process: bool = False, budget_s: float | None = None, model: str | None = None,
                diffusers_threads: int | None = None) -> dict:
    """tiny-wan at `multiples` x its native window: longtake's windows against diffusers' WanPipeline
    rendering the whole clip as one window, one run each.

    diffusers: one process, every core on CPU (or `diffusers_threads`), `latents=` the engine's initial
    noise; its wall covers the pipeline call (prompt, denoising, VAE decode, postprocessing) and writing
    the MP4, as longtake's wall does; `denoise_s` ends at its last step (a step-end callback), `decode_s`
    is the rest. Peak memory: this
    process's peak RSS above its level before the call (CUDA: torch's peak allocation above it).
    longtake: the same request on `workers` Ray workers (1 thread each on CPU; `in_process`: one worker in
    this process, for tests), with the model's default window and overlap; `compute_s` is the sum of the
    windows' predictions. A multiple whose whole-clip pipeline call is predicted (denoising ~ length^2,
    decoding ~ length, from the previous multiple) to take longer than `budget_s` is measured as one
    transformer forward of the whole-clip latents instead, and marked so; never extrapolated into a wall."""
    import diffusers

    from longtake.actors.pool import InProcessPool
    from longtake.actors.worker import WorkerSpec
    from longtake.pipelines.tiny import TINY_WAN, ensure_tiny_model

    path = model or str(ensure_tiny_model(TINY_WAN))
    size = size or (WAN_QUICK_SIZE if quick else 256)
    steps = steps or (2 if quick else 4)
    budget_s = budget_s if budget_s is not None else (120.0 if quick else 900.0)
    fps, prompt = 16, "a red ball moving right"

    def request(frames: int, out: str, **kw) -> dict:
        return {"prompt": prompt, "negative_prompt": "", "seconds": frames / fps, "fps": fps, "steps": steps,
                "guidance": guidance, "height": size, "width": size, "model": path, "device": device, "seed": 0,
                "out": str(tmp / out), **kw}

    base = prepare(request(1, "wan.mp4"))
    layout, native, shape = base.model.layout, base.window, base.latent_shape  # shape: (C, h, w)
    tokens_per_latent_frame = (shape[1] // 2) * (shape[2] // 2)  # the transformer patchifies 2x2
    cpu_threads = diffusers_threads or os.cpu_count() or 1
    whole = _WanWholeClip(path, device, base, prompt, size, guidance, fps, cpu_threads, tmp / "wan-diffusers.mp4")
    spec = plan_spec(base, device)
    pool = InProcessPool(WorkerSpec(path, device, spec.dtype)) if in_process else _pool(spec, workers)
    rows = []
    try:
        warm = layout.frames(2)  # load and run everything once on both sides before timing
        whole.pipeline(warm, 1)
        timed_render(pool, request(warm, "wan-warm.mp4", steps=1))
        for m in tqdm(multiples, desc="wan", unit="length", disable=not progress):
            frames = layout.frames(native * m)  # 4 (21 m - 1) + 1
            job = prepare(request(frames, f"wan-{m}.mp4"))
            row = {"multiple": m, "frames": frames, "latent_frames": job.latent_frames, "windows": len(job.windows),
                   "tokens_whole_clip": job.latent_frames * tokens_per_latent_frame}
            theirs = _wan_diffusers_columns(row, whole, steps, _wan_predicted_s(rows, m), budget_s)
            keep = len(job.windows) == 1 and theirs is not None  # one window: both sides render the same thing
            _wan_longtake_columns(row, pool, request(frames, f"wan-{m}.mp4"), theirs if keep else None)
            logger.info("wan %dx: %s", m, row)
            rows.append(row)
    finally:
        workers_used = pool.num_workers
        pool.shutdown()
    _wan_growth(rows)
    return {"model": TINY_WAN if model is None else path, "size": size, "steps": steps, "guidance": guidance,
            "fps": fps, "window": base.window, "overlap": base.overlap, "workers": workers_used,
            "pool": "in-process" if in_process else "Ray", "device": device,
            "diffusers_threads": cpu_threads if device == "cpu" else None, "diffusers": diffusers.__version__,
            "budget_s": budget_s, "rows": rows}


class _WanWholeClip:
    """diffusers' side of `wan_scaling`: one WanPipeline rendering a whole clip as one window, from the
    engine's initial noise."""

    def __init__(self, path: str, device: str, base, prompt: str, size: int, guidance: float, fps: int,
                 cpu_threads: int, out: Path):
        import torch
        from diffusers import WanPipeline

        self.device, self.prompt, self.size, self.guidance, self.fps = device, prompt, size, guidance, fps
        self.cpu_threads, self.out = cpu_threads, out
        self.layout, self.shape = base.model.layout, base.latent_shape  # shape: (C, h, w)
        pipe = WanPipeline.from_pretrained(path, use_safetensors=True)
        if device == "cuda":  # as longtake's workers: the transformer in bfloat16, the VAE in float32
            pipe = pipe.to("cuda")
            pipe.transformer.to(torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def threads(self):
        """On CPU, every core (or `cpu_threads`) while diffusers computes: the obvious way, one process."""
        import torch

        threads = torch.get_num_threads()
        if self.device == "cpu":
            torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def pipeline(self, frames: int, k: int) -> tuple[float, float, np.ndarray]:
        """(wall, end of the last step, uint8 frames) of one whole-clip pipeline call and its MP4."""
        import torch

        from longtake.core.windows import initial_noise

        latents = initial_noise(0, self.layout.latent_frames(frames), self.shape)
        marks = []

        def step_end(_pipe, i, t, kwargs):
            self.sync()
            marks.append(time.perf_counter())
            return kwargs

        with self.threads():
            t0 = time.perf_counter()
            with torch.inference_mode():
                video = self.pipe(self.prompt, negative_prompt="", num_frames=frames, height=self.size,
                                  width=self.size, num_inference_steps=k, guidance_scale=self.guidance,
                                  latents=latents, output_type="np",
                                  callback_on_step_end=step_end).frames[0]  # (F, H, W, 3) in [0, 1]
            video = (np.asarray(video) * 255).round().astype(np.uint8)
            with VideoWriter(self.out, self.size, self.size, self.fps) as writer:
                writer.write(video)
            wall = time.perf_counter() - t0
        return wall, marks[-1] - t0, video

    def forward(self, frames: int) -> float:
        """Seconds of one transformer forward (the conditional pass) over the whole clip's latents."""
        import torch

        from longtake.core.windows import initial_noise

        device = self.device
        with self.threads(), torch.inference_mode():
            text, _ = self.pipe.encode_prompt(self.prompt, do_classifier_free_guidance=False, max_sequence_length=512,
                                              device=torch.device(device))
            z = initial_noise(0, self.layout.latent_frames(frames), self.shape).to(device, self.pipe.transformer.dtype)
            timestep = torch.tensor([999.0], device=device)
            self.sync()
            t0 = time.perf_counter()
            self.pipe.transformer(hidden_states=z, timestep=timestep, encoder_hidden_states=text.to(z.dtype),
                                  return_dict=False)
            self.sync()
            return time.perf_counter() - t0


def _wan_predicted_s(rows: list[dict], m: int) -> float | None:
    """The seconds diffusers' whole-clip pipeline call is predicted to take at `m` x the native length, from
    the last length it ran at (denoising ~ length^2, decoding ~ length); None before the first."""
    full = [r for r in rows if r["diffusers_mode"] == "pipeline"]
    if not full:
        return None
    p = full[-1]
    g = m / p["multiple"]
    return p["diffusers_denoise_s"] * g * g + p["diffusers_decode_s"] * g


def _wan_diffusers_columns(row: dict, whole: _WanWholeClip, steps: int, predicted: float | None,
                           budget_s: float) -> np.ndarray | None:
    """diffusers' columns of a row: the whole-clip pipeline call, or one transformer pass when the call is
    predicted over the budget, and the peak memory of either. Returns the call's frames (None for a pass)."""
    theirs = None
    level = _memory_mark(whole.device)
    if predicted is None or predicted <= budget_s:
        wall, denoise, theirs = whole.pipeline(row["frames"], steps)
        row.update(diffusers_mode="pipeline", diffusers_wall_s=round(wall, 3),
                   diffusers_denoise_s=round(denoise, 3), diffusers_decode_s=round(wall - denoise, 3),
                   diffusers_forward_s=None, diffusers_frames=len(theirs))
    else:
        forward = whole.forward(row["frames"])
        row.update(diffusers_mode=f"transformer forward only: the pipeline was predicted to take "
                                  f"{predicted:.0f} s > {budget_s:g} s", diffusers_wall_s=None,
                   diffusers_denoise_s=None, diffusers_decode_s=None, diffusers_forward_s=round(forward, 3),
                   diffusers_frames=None)
    row["diffusers_peak_mb"] = None if level is None else round(_memory_peak(whole.device) - level, 1)
    return theirs


def _wan_longtake_columns(row: dict, pool, request: dict, theirs: np.ndarray | None) -> None:
    """longtake's columns of a row: one render of `request`; given diffusers' frames (one window: both
    sides render the same thing), the largest difference from them."""
    chunks = []
    result, compute = timed_render(pool, request,
                                   on_frames=(lambda first, f: chunks.append(f.copy())) if theirs is not None else None)
    ours = np.concatenate(chunks) if theirs is not None else None
    row.update(longtake_wall_s=round(result.wall_s, 3), longtake_denoise_s=result.timings["denoise_s"],
               longtake_decode_s=result.timings["decode_s"], longtake_compute_s=round(compute["predict_sum"], 3),
               longtake_predict_calls=compute["predict_calls"], longtake_frames=result.frames,
               frames_max_diff=None if ours is None or ours.shape != theirs.shape
               else int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max()),
               vs_diffusers=None if row["diffusers_wall_s"] is None
               else row["diffusers_wall_s"] / result.wall_s)


def _wan_growth(rows: list[dict]) -> None:
    """Each row's wall and denoising times over the first row's (None where a side did not run)."""
    first = rows[0]
    for row in rows:
        for side, key in (("diffusers", "wall_s"), ("longtake", "wall_s"), ("diffusers", "denoise_s"),
                          ("longtake", "denoise_s")):
            now, then = row[f"{side}_{key}"], first[f"{side}_{key}"]
            name = f"growth_{side}" + ("" if key == "wall_s" else "_denoise")
            row[name] = None if now is None or not then else now / then


# ---------------------------------------------------------------- 8: projection

def project(m: dict, k: int, windows: int, chunks: int, steps: int, frames: int, workers_per_node: int,
            bandwidth_gbps: float, window_bytes: float, schedule: str = "wavefront") -> float:
    """Projected wall time of a render on k workers (nodes of `workers_per_node`, the driver on node 0).

    A window-step costs a worker `window_s + transfer_s` (prediction, and what the worker waits for its
    input and to return the output) and the driver `driver_s` of its own CPU (submitting, receiving,
    fusing, stepping: one thread, so a resource of its own); windows sent off the driver's node cross the
    network twice.
    wavefront   no rounds: the W x steps window-steps on k workers, bounded by the longest chain (one
                window-step per step), the driver's time and the network, whichever is slowest
    barrier     per step: ceil(W / k) rounds (or the driver's sending and receiving, or the network), then
                the whole clip's fusion and scheduler step on the driver while every worker waits
    decoding: ceil(chunks / k) rounds, or ffmpeg's encoding, whichever is slower."""
    task = m["window_s"] + m["transfer_s"]
    remote = windows * max(0, k - workers_per_node) / k  # window-steps per step sent off the driver's node
    net = remote * 2 * window_bytes / (bandwidth_gbps * 1e9 / 8)
    if schedule == "wavefront":
        calls = windows * steps
        denoise = max(math.ceil(calls / k) * task, steps * task, calls * m["driver_s"], steps * net)
    else:
        fuse_step = windows * m["fuse_step_s"]
        sending = windows * (m["driver_s"] - m["fuse_step_s"])
        denoise = steps * (fuse_step + max(math.ceil(windows / k) * task, sending, net))
    decode = max(math.ceil(chunks / k) * m["decode_chunk_s"], frames / m["encode_fps"])
    return m["encode_s"] + denoise + decode


def projection(scale: dict, encode_fps: float, latent_bytes_per_frame: float, window: int,
               workers_per_node: int, bandwidth_gbps: float, long_frames: int, stride: int) -> dict:
    """The model of `project` fed with the 1-worker render's times (per window-step), checked against the
    measured 1 and 2 workers of both schedules (with each run's own window time), then run for a long clip
    on 1 to 64 workers."""
    one = scale[1]
    t, c = one["timings"], one["compute"]
    windows, steps, frames = one["windows"], one["steps"], one["frames"]
    chunks = math.ceil(frames / window)
    calls = windows * steps
    m = {"window_s": c["predict_mean"], "driver_s": t["driver_s"] / calls,
         "fuse_step_s": (t["fuse_s"] + t["scheduler_s"]) / calls,
         "transfer_s": max(0.0, t["denoise_s"] - c["predict_sum"]) / calls,
         "decode_chunk_s": c["decode_mean"], "encode_fps": encode_fps, "encode_s": t["encode_s"]}
    wb = latent_bytes_per_frame * window
    err = {}
    for schedule, name in (("wavefront", ""), ("barrier", "_barrier")):
        for k in (1, 2):
            run_k = scale[k if not name else f"barrier_{k}"]
            # each run's own window time: two workers on this machine's 2 cores slow each other's windows
            # (`compute_slowdown_2`), which separate GPUs do not; the check is of the schedule's model
            m_k = {**m, "window_s": run_k["compute"]["predict_mean"]}
            projected = project(m_k, k, windows, chunks, steps, frames, workers_per_node, bandwidth_gbps, wb, schedule)
            measured = run_k["wall_s"]
            err[f"projection_error_{k}{name}"] = abs(projected - measured) / measured
    long_windows = math.ceil(max(0, long_frames - window) / stride) + 1
    long_chunks = math.ceil(long_frames / window)
    eff = {}
    # what if: the same measured costs with a 1 s window (a real model's order on a GPU), the driver's,
    # the transfers' and the encoder's time unchanged: how much of the shortfall is this small model's
    for name, model in (("", m), ("_window_1s", {**m, "window_s": 1.0})):
        for schedule in ("wavefront", "barrier"):
            base = project(model, 1, long_windows, long_chunks, steps, long_frames, workers_per_node, bandwidth_gbps,
                           wb, schedule)
            eff[schedule + name] = {k: base / (k * project(model, k, long_windows, long_chunks, steps, long_frames,
                                                           workers_per_node, bandwidth_gbps, wb, schedule))
                                    for k in (1, 2, 4, 8, 16, 32, 64)}
    # the workers one driver keeps busy: a window-step's worker time over its driver time
    return {"model": m, **err, "long_frames": long_frames, "long_windows": long_windows,
            "workers_per_node": workers_per_node, "bandwidth_gbps": bandwidth_gbps,
            "efficiency": eff["wavefront"], "efficiency_barrier": eff["barrier"],
            "efficiency_window_1s": eff["wavefront_window_1s"], "efficiency_barrier_window_1s": eff["barrier_window_1s"],
            "driver_bound_workers": (m["window_s"] + m["transfer_s"]) / m["driver_s"]}


# ---------------------------------------------------------------- the whole run

def bench(quick: bool = True, device: str = "cpu", model: str = "default", progress: bool = True,
          workers_per_node: int = 8, bandwidth_gbps: float = 10.0) -> dict:
    from longtake.actors.ray_boot import start_ray, stop_ray

    t0 = time.time()
    seconds = 10 if quick else 30
    with tempfile.TemporaryDirectory() as d:
        start = startup(model, device, Path(d))  # first: no Ray is up yet
        start_ray_path = startup(model, device, Path(d), workers=2)
    started = start_ray(num_cpus=max(2, os.cpu_count() or 1))
    job = prepare({"prompt": "a red ball moving right on a blue background", "seconds": seconds, "model": model,
                   "device": device, "out": "x.mp4"})
    spec = plan_spec(job, device)
    request = {"prompt": "a red ball moving right on a blue background", "seconds": seconds, "fps": 8,
               "model": model, "device": device, "seed": 0}
    figures = {"startup_s": start["startup_s"], "startup_s_ray": start_ray_path["startup_s"]}
    details = {"startup": start, "startup_ray": start_ray_path}
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            bar = tqdm(total=8, desc="bench", unit="part", disable=not progress)
            scale = scaling(spec, request, tmp)
            bar.update()
            figures.update(_scaling_figures(scale))
            details["scaling"] = scale
            lin = linear(spec, request, tmp)
            details["linear"] = lin
            figures["scaling_linear"] = lin["scaling_linear"]
            figures["scaling_linear_per_window"] = lin["scaling_linear_per_window"]
            if device == "cpu":
                share = serve_share(job.model.path, request, tmp)
                details["serve"] = share
                figures["serve_share"] = share["serve_share"]
            if device == "cpu":
                s = seams(spec, model, 3 if quick else 8, 6 if quick else 8, tmp, progress)
                figures.update(seam_ratio=s["pyramid"], seam_ratio_naive=s["naive"],
                               **{f"seam_ratio_{k}": v for k, v in s.items() if k not in ("pyramid", "naive")})
                details["seams"] = s
            bar.update()
            mem = memory(spec, {**request, "steps": 2}, tmp)
            details["memory"] = mem
            figures["rss_ratio_60_10"] = mem.get("rss_ratio_60_10")
            bar.update()
            enc = encoding(job.width, 30 if quick else 60, tmp)
            details["encoding"] = enc
            figures["encode_realtime_x"] = enc[job.width]["realtime_x"]
            figures["encode_realtime_x_512"] = enc[512]["realtime_x"]
            bar.update()
            vs = versus_diffusers(device, 64 if quick else 128, 10 if quick else 25, tmp)
            details["vs_diffusers"] = vs
            figures.update(vs_diffusers_1=vs["vs_diffusers_1"], vs_diffusers_2=vs["vs_diffusers_2"])
            bar.update()
            wan = wan_scaling(device, tmp, quick, progress)
            details["wan"] = wan
            figures.update(_wan_figures(wan))
            bar.update()
            c, h, w = job.latent_shape
            proj = projection(scale, enc[job.width]["frames"] / enc[job.width]["wall_s"], c * h * w * 4, job.window,
                              workers_per_node, bandwidth_gbps, long_frames=8 * 600, stride=job.window - job.overlap)
            details["projection"] = proj
            figures.update(_projection_figures(proj))
            bar.update()
            marks = bench_watermark.measure(tmp / "watermark")
            details["watermark"] = {"longtake": marks, "candidates": bench_watermark.candidates()}
            figures.update(_watermark_figures(marks))
            bar.update()
            bar.close()
    finally:
        if started:
            stop_ray()
    return {"figures": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()},
            "settings": _settings(quick, device, model, seconds, job, t0), "details": details}


def _scaling_figures(scale: dict) -> dict:
    """The figures of parts 1-3 (scaling, overhead, redundancy, checkpoints) from `scaling`."""
    return dict(parallel_efficiency=scale["parallel_efficiency"], overhead_ratio_1=scale[1]["overhead_ratio"],
                overhead_ratio_2=scale[2]["overhead_ratio"], compute_slowdown_2=scale["compute_slowdown_2"],
                parallel_efficiency_barrier=scale["parallel_efficiency_barrier"],
                overhead_ratio_1_barrier=scale["barrier_1"]["overhead_ratio"],
                overhead_ratio_2_barrier=scale["barrier_2"]["overhead_ratio"],
                plan_bound_2=scale["plan_bound_2"], evals_per_frame=scale["evals_per_frame"],
                evals_per_frame_min=scale["evals_per_frame_min"],
                checkpoint_s_each=scale["checkpoint"]["seconds_each"],
                checkpoint_slowdown_k5=scale["checkpoint"]["slowdown"])


def _wan_figures(wan: dict) -> dict:
    """The figures of part 9 from `wan_scaling`: at 8x the native length."""
    by = {r["multiple"]: r for r in wan["rows"]}
    return dict(wan_vs_diffusers_8x=by[8]["vs_diffusers"], wan_growth_8x_diffusers=by[8]["growth_diffusers"],
                wan_growth_8x_longtake=by[8]["growth_longtake"])


def _projection_figures(proj: dict) -> dict:
    """The figures of part 8 from `projection`: at 64 workers, and its errors against the measured runs."""
    return dict(projected_efficiency_64=proj["efficiency"][64],
                projected_efficiency_64_barrier=proj["efficiency_barrier"][64],
                projected_efficiency_64_window_1s=proj["efficiency_window_1s"][64],
                projected_efficiency_64_barrier_window_1s=proj["efficiency_barrier_window_1s"][64],
                driver_bound_workers=proj["driver_bound_workers"],
                **{k: v for k, v in proj.items() if k.startswith("projection_error")})


def _watermark_figures(marks: dict) -> dict:
    """The watermark's worst bit accuracy and PSNR over sizes and attacks, from `bench_watermark.measure`."""
    rows = [r for by_size in marks.values() for r in by_size.values()]
    return dict(watermark_bit_accuracy_min=min(min(r["bit_accuracy"].values()) for r in rows),
                watermark_psnr_db_min=min(r["psnr_db"] for r in rows))


def _settings(quick: bool, device: str, model: str, seconds: float, job, t0: float) -> dict:
    """The run's settings and machine, for the table's header."""
    import torch

    return {"quick": quick, "device": device, "model": model, "clip_seconds": seconds, "fps": 8,
            "steps": job.steps, "window": job.window, "overlap": job.overlap, "size": job.width,
            "threads_per_worker": 1, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "wall_s": round(time.time() - t0, 1)}


def table(result: dict, command: str) -> str:
    """BENCHMARKS.md from a `bench` result: the figures against their targets, then how to read them."""
    f, s, d = result["figures"], result["settings"], result["details"]
    fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["# Benchmarks", "",
             f"Produced by `{command}` on {s['machine']}, {s['cpus']} CPUs, torch {s['torch']}, device {s['device']}, "
             f"{s['date']} ({s['wall_s']:.0f} s). Model `{s['model']}`, {s['clip_seconds']} s at {s['fps']} fps, "
             f"{s['steps']} steps, window {s['window']}, overlap {s['overlap']}, {s['size']}x{s['size']}, "
             f"{s['threads_per_worker']} torch thread per worker. Every ratio comes from this one run.", "",
             "| key | what | value | target | note |", "|---|---|---|---|---|"]
    for key, what, note in _table_rows(s, d):
        target = TARGETS.get(key, "")
        lines.append(f"| `{key}` | {what} | {fmt(f.get(key))} | {target} | {note} |")
    fr = d["scaling"][1]["fractions"]
    lines += ["", "Where the 1-worker wall time goes: " + ", ".join(f"{k} {v:.1%}" for k, v in fr.items()) + ".",
              "", "Projected efficiency by workers (10-min clip), wavefront: "
              + ", ".join(f"{k}: {v:.2f}" for k, v in d["projection"]["efficiency"].items())
              + "; barrier: " + ", ".join(f"{k}: {v:.2f}" for k, v in d["projection"]["efficiency_barrier"].items())
              + "."]
    lines += ["", BENCH_READING + ("GPU figures: not measured in this run (no GPU)." if s["device"] == "cpu" else "")]
    if "wan" in d:
        lines += ["", *wan_table(d["wan"])]
    if "watermark" in d:
        lines += ["", *bench_watermark.section(d["watermark"])]
    return "\n".join(lines) + "\n"


def _table_rows(s: dict, d: dict) -> list[tuple[str, str, str]]:
    """The table's rows: (figure key, what it measures, a note with the measurements behind it)."""
    sc = d["scaling"]
    return [
        ("parallel_efficiency", "speed-up 1 -> 2 workers / 2 (wavefront)",
         f"{sc[1]['wall_s']:.1f} s -> {sc[2]['wall_s']:.1f} s, same frames (both schedules): {sc['same_frames']}"),
        ("overhead_ratio_1", "wall / (sum of window predictions / 1)", f"ideal {sc[1]['ideal_s']:.1f} s"),
        ("overhead_ratio_2", "wall / (sum of window predictions / 2)", f"ideal {sc[2]['ideal_s']:.1f} s"),
        ("compute_slowdown_2", "one window's prediction with 2 workers computing / with 1",
         f"{sc[1]['compute']['predict_mean'] * 1e3:.0f} ms -> {sc[2]['compute']['predict_mean'] * 1e3:.0f} ms"),
        ("parallel_efficiency_barrier", "... the barrier schedule, same run (the reference)",
         f"{sc['barrier_1']['wall_s']:.1f} s -> {sc['barrier_2']['wall_s']:.1f} s"),
        ("overhead_ratio_1_barrier", "... barrier, 1 worker", f"ideal {sc['barrier_1']['ideal_s']:.1f} s"),
        ("overhead_ratio_2_barrier", "... barrier, 2 workers", f"ideal {sc['barrier_2']['ideal_s']:.1f} s"),
        ("plan_bound_2", "the barrier's best on 2 workers: (W/2) / ceil(W/2) rounds per step",
         f"{sc[1]['windows']} windows per step"),
        ("scaling_linear", "wall per second of video, largest / smallest, 2 workers", ", ".join(
            f"{k} s: {v['wall_per_second']:.3f}" for k, v in d["linear"]["rows"].items())),
        ("scaling_linear_per_window", "... wall per window prediction, largest / smallest", "evals per frame " + ", ".join(
            f"{k} s: {v['evals_per_frame']:.2f}" for k, v in d["linear"]["rows"].items())),
        ("serve_share", "`serve`, 2 replicas: a 5 s job's time with a 60 s job rendering / alone",
         "n/a" if "serve" not in d else f"{d['serve']['short_alone_s']:.1f} s -> {d['serve']['short_with_long_s']:.1f} s"
                                        f", the 60 s job still rendering: {d['serve']['long_still_running']}"),
        ("evals_per_frame", "window frames evaluated per output frame, per step", f"{sc[1]['windows']} windows"),
        ("evals_per_frame_min", "the plan's minimum, L / S", ""),
        ("seam_ratio", "seam continuity, pyramid weighting, the model alone (plan none)", "median over moving clips"),
        ("seam_ratio_flat", "... flat weighting", ""),
        ("seam_ratio_overlap-linear", "... overlap-linear weighting", ""),
        ("seam_ratio_pyramid+freenoise", "... FreeNoise noise", ""),
        ("seam_ratio_naive", "naive windows (no overlap, no fusion)", ""),
        ("seam_ratio_pyramid+plan", "... pyramid, with the motion plan (the default render)", ""),
        ("rss_ratio_60_10", "peak driver RSS, 60 s / 10 s", "; ".join(
            f"{k} s: {v['peak_rss_mb']:.0f} MB (latents {v['latents_mb']} MB)" for k, v in d["memory"].items()
            if isinstance(v, dict))),
        ("encode_realtime_x", f"ffmpeg encode, x real time, {s['size']}x{s['size']}", ""),
        ("encode_realtime_x_512", "ffmpeg encode, x real time, 512x512", ""),
        ("vs_diffusers_1", "diffusers AnimateDiff+FreeNoise wall / longtake 1 worker", f"diffusers {d['vs_diffusers']['diffusers_wall_s']:.1f} s on {d['vs_diffusers']['diffusers_threads']} threads"),
        ("vs_diffusers_2", "diffusers wall / longtake 2 workers", f"longtake {d['vs_diffusers']['longtake_1_wall_s']:.1f} s / {d['vs_diffusers']['longtake_2_wall_s']:.1f} s"),
        ("checkpoint_s_each", "seconds per checkpoint (write, fsync, rename)",
         f"{d['scaling']['checkpoint']['bytes_each'] / 1e6:.2f} MB each, {d['scaling']['checkpoint']['saved']} saved"),
        ("checkpoint_slowdown_k5", "wall with checkpoints every 5 steps / without (2 workers)",
         f"same frames: {d['scaling']['checkpoint']['same_frames']}"),
        ("projected_efficiency_64", f"projection, 64 workers ({d['projection']['workers_per_node']}/node, "
                                    f"{d['projection']['bandwidth_gbps']:g} Gb/s), 10-min clip, wavefront", ""),
        ("projected_efficiency_64_barrier", "... barrier", ""),
        ("projected_efficiency_64_window_1s", "what if: the same measured costs, a 1 s window, wavefront",
         "not a measurement: how much of the shortfall is this model's 60 ms window"),
        ("projected_efficiency_64_barrier_window_1s", "... barrier", ""),
        ("driver_bound_workers", "workers one driver keeps busy: a window-step's worker time / driver time",
         f"{d['projection']['model']['window_s'] * 1e3:.0f} ms + {d['projection']['model']['transfer_s'] * 1e3:.1f} ms"
         f" / {d['projection']['model']['driver_s'] * 1e3:.2f} ms"),
        ("projection_error_1", "|projected - measured| / measured, 1 worker", ""),
        ("projection_error_2", "... 2 workers", ""),
        ("projection_error_1_barrier", "... barrier, 1 worker", ""),
        ("projection_error_2_barrier", "... barrier, 2 workers", ""),
        ("startup_s", f"a {d['startup']['seconds']} s `longtake render` in a new process: its wall time minus the "
                      "engine's" + (" (in-process: a short CPU job)" if not d["startup"]["ray"] else ""),
         _startup_note(d["startup"])),
        ("startup_s_ray", "... with `--workers 2` (Ray)", _startup_note(d["startup_ray"])),
        ("watermark_bit_accuracy_min", "watermark: lowest bit accuracy, 256 and 512 px, every attack",
         "see the watermark table below"),
        ("watermark_psnr_db_min", "watermark: lowest PSNR against the unmarked frames", ""),
    ]


# how to read the table (its closing paragraph)
BENCH_READING = ("Reading it: the wavefront (the default) starts a window's next step as soon as its neighbours "
                 "have finished this one, so no worker waits at the end of a step; the barrier (`--schedule barrier`, "
                 "the reference, same frames) waits for every window of a step, so an odd W caps its 2-worker "
                 "efficiency at `plan_bound_2`. `compute_slowdown_2` is what two workers computing at once cost "
                 "each other on this machine (shared cores and memory), which no schedule removes. The projection "
                 "counts the driver as one thread: `driver_bound_workers` is how many workers it keeps busy with "
                 "this model's windows (a real model's window takes seconds, not milliseconds, so many more); at 64 "
                 "workers a 10-minute clip of this model is bound by it and by ffmpeg encoding every frame after the "
                 "last step, which the `_window_1s` rows show by rerunning the projection with a 1 s window and every "
                 "other cost as measured. A short clip pays more per second (`scaling_linear`): its edge windows "
                 "evaluate more frames per output frame (`scaling_linear_per_window` takes that out) and a job's fixed "
                 "costs are spread over fewer seconds. "
                 "`vs_diffusers_*` above 1 means longtake is faster. Seam ratios are medians over a few clips "
                 "(noisy at --quick). ")


def _startup_note(start: dict) -> str:
    return f"{start['process_wall_s']:.1f} s in all: " + ", ".join(
        f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in start["parts"].items())


def wan_table(w: dict) -> list[str]:
    """The Markdown section of `wan_scaling`'s result: a table per clip length and a reading of it."""
    num = lambda v, f="{:.1f}": "n/a" if v is None else f.format(v)
    rows = w["rows"]
    threads = f"{w['diffusers_threads']} threads" if w["diffusers_threads"] else w["device"]
    out = ["## Wan: windows against one whole-clip window (tiny-wan)", "",
           f"`{w['model']}` at {w['size']}x{w['size']}, {w['fps']} fps, {w['steps']} steps, guidance {w['guidance']:g} "
           f"(two transformer passes per step), one run per length. longtake: windows of {w['window']} latent frames, "
           f"overlap {w['overlap']}, on {w['workers']} {w['pool']} workers (1 torch thread each on CPU); diffusers: "
           f"`WanPipeline` rendering the whole clip as one window in one process ({threads}), from the same initial "
           "latents. Walls include writing the MP4; (denoise) is the time to the end of the last step.", "",
           "| x native | frames | latent frames (tokens) | windows | diffusers s (denoise) | diffusers peak MB "
           "| longtake s (denoise) | windows' compute s | diffusers / longtake | growth diffusers (denoise) "
           "| growth longtake (denoise) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["diffusers_mode"] == "pipeline":
            theirs = f"{r['diffusers_wall_s']:.1f} ({r['diffusers_denoise_s']:.1f})"
        else:
            theirs = f"not run whole: one transformer pass {r['diffusers_forward_s']:.2f} s ({r['diffusers_mode']})"
        out.append(f"| {r['multiple']}x | {r['frames']} | {r['latent_frames']} ({r['tokens_whole_clip']}) "
                   f"| {r['windows']} | {theirs} | {num(r['diffusers_peak_mb'], '{:.0f}')} "
                   f"| {r['longtake_wall_s']:.1f} ({r['longtake_denoise_s']:.1f}) | {r['longtake_compute_s']:.1f} "
                   f"| {num(r['vs_diffusers'], '{:.2f}')} "
                   f"| {num(r['growth_diffusers'])} ({num(r['growth_diffusers_denoise'])}) "
                   f"| {num(r['growth_longtake'])} ({num(r['growth_longtake_denoise'])}) |")
    first, last = rows[0], rows[-1]
    g = last["multiple"] / first["multiple"]
    reading = (f"Reading it: from {first['multiple']}x to {last['multiple']}x the clip is {g:g} times longer. ")
    if last["growth_diffusers_denoise"] is not None:
        reading += (f"One window over the whole clip attends over all its tokens at once ({first['tokens_whole_clip']} "
                    f"-> {last['tokens_whole_clip']}): diffusers' denoising grew "
                    f"{last['growth_diffusers_denoise']:.1f}x (quadratic: {g * g:g}x), longtake's "
                    f"{last['growth_longtake_denoise']:.1f}x with its windows ({first['windows']} -> {last['windows']}, "
                    f"linear). ")
        if first["diffusers_decode_s"] and first["longtake_decode_s"]:
            theirs = last["diffusers_decode_s"] / first["diffusers_decode_s"]
            ours = last["longtake_decode_s"] / first["longtake_decode_s"]
            reading += (f"Decoding (VAE, postprocessing, MP4) grew {theirs:.1f}x in diffusers (its whole-clip "
                        f"`vae.decode` in diffusers {w.get('diffusers', '?')} appends each latent frame's output with "
                        f"`torch.cat`, copying all it decoded so far) and {ours:.1f}x in longtake (streamed, on one "
                        "worker)")
            reading += ("; here decoding takes most of diffusers' wall time. "
                        if last["diffusers_decode_s"] > last["diffusers_denoise_s"] else ". ")
    else:
        reading += f"diffusers' whole-clip pipeline was not run at {last['multiple']}x ({last['diffusers_mode']}). "
    same = [r["frames_max_diff"] for r in rows if r["frames_max_diff"] is not None]
    if same:
        reading += (f"With one window ({first['multiple']}x) both render the same frames: they differ by at most "
                    f"{max(same)} uint8 level(s). ")
    reading += "`diffusers / longtake` above 1 means longtake is faster."
    return out + ["", reading]


def write(result: dict, out_json: str, out_md: str | None, command: str) -> None:
    """The JSON file; with `out_md`, the table written there, what the file had from its first Scale section
    on kept at its end (`bench --simulate` writes those sections, bench_scale.write; notes on them follow)."""
    Path(out_json).write_text(json.dumps(result, indent=2, default=str))
    if out_md:
        old = Path(out_md).read_text() if Path(out_md).is_file() else ""
        kept = old[old.index(SCALE_MARK):] if SCALE_MARK in old else ""
        Path(out_md).write_text("\n\n".join(part for part in (table(result, command).rstrip("\n"), kept) if part)
                                .rstrip("\n") + "\n")


SCALE_MARK = "<!-- scale:"  # where `bench --simulate`'s sections begin in BENCHMARKS.md
