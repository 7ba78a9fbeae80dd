"""`longtake bench --simulate PRESET`: studio scale on one box, every figure a ratio taken in one run.

    longtake bench --simulate wan-14b-720p [--workers 1,8,16,32] [--seconds 600] [--steps 10]
                   [--predict-s S] [--kill 2] [--out benchmarks/scale-wan-14b-720p.json] [--table BENCHMARKS.md]
                   [--json]

A local multi-node Ray cluster (`ray_boot.local_cluster`: a head without CPUs where the drivers run, and one
node of WORKERS_PER_NODE logical CPUs, with its own object store, per WORKERS_PER_NODE workers) renders one
long clip of a simulated model (`pipelines/sim.py`: the real model's tensor sizes, its compute time slept)
once for each worker count N, each run a fresh driver process (its CPU time and peak memory its own):

- efficiency: the denoising's ideal time (window-steps x the simulated time of one / N) over its wall time;
  N = 1 runs without the simulated time (`predict_s` 0: the frames do not depend on it), and its efficiency
  is derived: one window-step's time / (it + the run's wall time per window-step);
- bytes between the driver and the workers per window-step, by kind (the pool's `Traffic`: latents,
  predictions, the job's conditioning, counted once for each worker that fetches it, and the windows'
  media slices), against the window's latent bytes; the largest media slice one call carried;
- the driver's CPU per window-step (its process, Ray's threads included, over the denoising) and its peak
  RSS against the clip's latent bytes; every process's CPU on this machine per window-step and the cores'
  busy share (the cores must not be what the run measures);
- the object stores' peak use (sampled every POLL_S);
- the same denoised latents for every N (`same_frames`; the frames are one deterministic decode of them);
- with `--kill K`: the largest N once more, K workers killed a third of the way in: the same latents;
- the largest N's run decodes and encodes the clip (720p H.264, real ffmpeg): time to the first frame and
  the decode-and-encode rate, reported apart from the denoising (compressed time makes them look larger).

Everything runs on this one machine: `memory_needed` says what a run needs (the driver's peak, about 8 x the
clip's latents, and each simulated worker's share), and the command shortens the default clip to what fits, or
refuses a --seconds that does not, before anything starts.

Every compressed figure has its projection to real (uncompressed, H100) time beside it: the wall time
beyond the ideal is overhead that does not shrink with the model's time, so
efficiency_real = ideal x c / (ideal x c + wall - ideal) with c the preset's compression.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

WORKERS_PER_NODE = 8  # simulated workers per simulated node (one logical CPU each)
STORE_MB = 1536  # each worker node's object store
HEAD_STORE_MB = 4096  # the head's (the drivers': window inputs, the job's conditioning, a decode's latents)
POLL_S = 0.5
HEAP_POLL_S = 0.2  # the driver's anonymous memory, sampled
KILL_AT = 1 / 3  # the share of the window-steps after which `--kill` kills its workers
DEFAULTS = {"seconds": 600.0, "steps": 10, "workers": (1, 8, 16, 32), "kill": 2}
ANIMATE_SECONDS = 30.0  # an animating preset's default: the driver holds its media whole (720p pose as palette
# indices, background, mask and face frames: about 5 MB a frame, 2.5 GB for 30 s at 16 fps)


# what a run needs in memory, from the 300 s run of BENCHMARKS.md (Scale): the driver's peak about 8 x the clip's
# latents (scheduler state 4 x, the rest allocator and the object store's pages), and each simulated worker with its
# share of the object stores and its node's Ray processes about 0.42 GB
DRIVER_CLIP_X = 8.0
WORKER_BYTES = 0.42e9
BASE_BYTES = 0.5e9
MEMORY_SHARE = 0.95  # of this machine's memory a run may plan on (where Ray starts killing workers)
SHORTEST_S = 30.0  # the shortest clip the default is shortened to (a machine that holds less: fewer workers)


def clip_latent_bytes(preset: str, seconds: float, **overrides) -> int:
    """Float32 bytes of a clip's latents at the preset's size (its model's latent layout)."""
    from longtake.pipelines.sim import sim_config, sim_layout

    c = sim_config(preset, **overrides)
    layout = sim_layout(c)
    channels, h, w = layout.latent_shape(c["height"], c["width"])
    return 4 * channels * layout.latent_frames(round(seconds * c["fps"])) * h * w


def _media_bytes_per_second(preset: str, **overrides) -> float:
    """An animating preset's media the driver holds per second of clip: pose (palette indices) and mask at 1
    byte a pixel, background at 3, the face frames at 3 (core/frames.py, engine._animation_media)."""
    from longtake.pipelines.sim import sim_config

    c = sim_config(preset, **overrides)
    return c["fps"] * (5 * c["height"] * c["width"] + 3 * c["face_size"] ** 2) if c["animate"] else 0.0


def memory_needed(preset: str, seconds: float, workers: int, **overrides) -> float:
    """About what a run of `workers` simulated workers on a `seconds` clip needs on this machine, in bytes."""
    return (DRIVER_CLIP_X * clip_latent_bytes(preset, seconds, **overrides) + WORKER_BYTES * workers + BASE_BYTES
            + seconds * _media_bytes_per_second(preset, **overrides))


def seconds_that_fit(preset: str, workers: int, memory: float, **overrides) -> float:
    """The longest clip (whole seconds, 0 if none) whose run `memory_needed` says fits in `memory` bytes
    (`memory_needed` grows by the same bytes every second of clip)."""
    fixed = memory_needed(preset, 0.0, workers, **overrides)
    per_second = (memory_needed(preset, 100.0, workers, **overrides) - fixed) / 100.0
    return max(0.0, math.floor((memory - fixed) / per_second))


def default_seconds(preset: str) -> float:
    from longtake.pipelines.sim import PRESETS

    return ANIMATE_SECONDS if PRESETS[preset]["animate"] else DEFAULTS["seconds"]


def _request(model: str, seconds: float, steps: int, out: str) -> dict:
    """The bench's request (at the model's frame rate); an animating model's media (2 s, looped) are those
    `animate_media` wrote beside it."""
    fps = json.loads((Path(model) / "sim.json").read_text())["fps"]  # the real model's frame rate
    request = {"model": model, "prompt": "a long take through a city at night", "seconds": seconds, "steps": steps,
               "fps": fps, "seed": 7, "out": out, "label": "none"}
    media = Path(model) / "media"
    if media.is_dir():
        request.update(pose=str(media / "pose.json"), reference=str(media / "photo.png"), face=str(media / "face.mp4"),
                       background=str(media / "background.mp4"), mask=str(media / "mask.mp4"), pose_loop=True,
                       animate_mode="replace")
    return request


def animate_media(directory: Path, width: int, height: int, face: int, fps: float, seconds: float = 2) -> None:
    """An animating model's media at its real sizes: a walking skeleton's keypoints, a photo, face frames at
    the motion encoder's size, background and mask frames at the output size (`seconds` long, looped)."""
    import numpy as np
    from PIL import Image

    from longtake.video import VideoWriter

    directory.mkdir(parents=True, exist_ok=True)
    n = round(seconds * fps)
    poses = []
    for i in range(n):
        x = width * (0.3 + 0.4 * i / max(1, n - 1))
        points = {0: (x, 0.15), 1: (x, 0.25), 2: (x - 40, 0.28), 5: (x + 40, 0.28), 8: (x - 25, 0.55),
                  11: (x + 25, 0.55), 10: (x - 25 - 10 * (i % 2), 0.9), 13: (x + 25 + 10 * (i % 2), 0.9)}
        flat = [0.0] * 54
        for k, (px, py) in points.items():
            flat[k * 3: k * 3 + 3] = [px, py * height, 1.0]
        poses.append({"people": [{"pose_keypoints_2d": flat}]})
    (directory / "pose.json").write_text(json.dumps({"fps": fps, "width": width, "height": height, "frames": poses}))
    rng = np.random.default_rng(0)
    photo = np.zeros((height, width, 3), np.uint8)
    photo[height // 8:-height // 8, width * 2 // 5:width * 3 // 5] = (220, 40, 40)
    Image.fromarray(photo).save(directory / "photo.png")
    clips = {"face": rng.integers(0, 255, (n, face, face, 3), np.uint8),
             "background": np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8)[None, None, :, None],
                                           (n, height, width, 3)),
             "mask": np.zeros((n, height, width, 3), np.uint8)}
    clips["mask"][:, height // 8:-height // 8, width * 2 // 5:width * 3 // 5] = 255
    for name, frames in clips.items():
        with VideoWriter(directory / f"{name}.mp4", frames.shape[2], frames.shape[1], fps) as writer:
            writer.write(np.ascontiguousarray(frames))


# ---------------------------------------------------------------------------------------------------- one run


def one_run(address: str, model: str, workers: int, seconds: float, steps: int, out: str, decode: bool,
            kill: int) -> dict:
    """One driver's render on the cluster at `address` (a child process of `simulate`): its figures."""
    from longtake.actors import ray_boot
    from longtake.actors.ray_pool import RayPool
    from longtake.cluster.engine import (Watch, begin, conditioning, deliver, denoise, job_scheduler, prepare,
                                         trim_heap)
    from longtake.provenance import Provenance
    from longtake.cluster.runtime import worker_plan

    ray_boot.start_ray(address=address)
    heap = _HeapPeak()
    job = prepare(_request(model, seconds, steps, out))
    spec, _ = worker_plan(job, gpus=0, cpus=1)
    t_pool = time.perf_counter()
    pool = RayPool(spec, workers)
    pool_s = time.perf_counter() - t_pool
    total = steps * len(job.windows)
    killed: list[int] = []

    def on_progress(p: dict) -> None:  # the driver's own thread: killing here races nothing in the pool
        if kill and not killed and p["phase"] == "denoise" and p["window_steps_done"] >= KILL_AT * total:
            import ray

            for a in range(kill):
                ray.kill(pool.actors[a], no_restart=True)
                killed.append(a)

    # engine.run's steps, the denoised latents hashed between 3 and 4: what every N must agree on; the CPU
    # figures are the denoising's (3)
    t0 = time.perf_counter()
    scheduler, n_steps = job_scheduler(job, None)
    watch, timings = Watch(job, n_steps, None, on_progress, None), {}
    cond = pool.put(conditioning(job, pool))
    try:
        _, sampler = begin(job, pool, scheduler, n_steps, watch, None)
        setup_s = time.perf_counter() - t0
        cpu0, machine0 = _cpu(), psutil.cpu_times()
        denoise(job, pool, cond, sampler, watch, None, False, timings)
        denoise_cpu, machine = _cpu() - cpu0, psutil.cpu_times()
        z = sampler.release()  # as engine.run: the scheduler states let go (and their memory) before the decode
        trim_heap()
        heap_decoding = _rss_anon()  # what the driver holds into the decode: the latents and its own code
        latents_sha256 = hashlib.sha256(z.contiguous().numpy().data).hexdigest()  # no copy of the clip
        first_frame: list[float] = []
        first = lambda *a: first_frame or first_frame.append(time.perf_counter() - t0)  # noqa: E731
        delivery, decode_error = None, None
        if decode:
            try:  # a failed decode (memory) keeps the denoising's figures, and says why
                delivery = deliver(job, pool, z, watch, Provenance.local(), first, False, timings)
            except Exception as e:
                decode_error = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        pool.release(cond)
    busy = sum(getattr(machine, f) - getattr(machine0, f) for f in ("user", "system", "nice"))
    figures = {
        "workers": workers, "killed": len(killed), "pool_start_s": round(pool_s, 2),
        "denoise_s": round(timings["denoise_s"], 3), "window_steps": total, "windows": len(job.windows),
        "latents_sha256": latents_sha256, "driver_cpu_s": round(denoise_cpu, 3),
        "driver_loop_cpu_s": round(timings["driver_s"], 3), "fuse_s": round(timings["fuse_s"], 3),
        "scheduler_s": round(timings["scheduler_s"], 3),
        "machine_cpu_s": round(busy, 2), "setup_s": round(setup_s, 2),
        "machine_busy": round(busy / (timings["denoise_s"] * psutil.cpu_count()), 3),
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "driver_peak_heap_bytes": heap.stop(), "driver_heap_decoding_bytes": heap_decoding,
        "traffic": pool.traffic.summary(),
        "window_media": sorted([*window, n] for window, n in pool.traffic.window_media.items()),
        "largest_media_call_bytes": max(pool.traffic.window_media.values(),
                                                                           default=0),
        "retries": pool.retries, "job_conditioning_bytes": cond.nbytes,
    }
    if decode_error is not None:
        figures["decode_error"] = decode_error
    if delivery is not None:
        figures.update(frames_sha256=delivery.frames_sha256, frames=delivery.frames_written,
                       decode_s=round(timings["decode_s"], 3), first_frame_s=round(first_frame[0], 3))
    pool.shutdown()
    return figures


class _HeapPeak:
    """The peak of this process's anonymous memory (RssAnon: its heap, without the object store's shared pages
    that its RSS also counts once it has read or written them), sampled every HEAP_POLL_S."""

    def __init__(self):
        self.peak, self._done = _rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(HEAP_POLL_S):
            self.peak = max(self.peak, _rss_anon())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss_anon())


def _rss_anon() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------------- the bench


def simulate(preset: str, workers=DEFAULTS["workers"], seconds: float = DEFAULTS["seconds"],
             steps: int = DEFAULTS["steps"], predict_s: float | None = None, kill: int = DEFAULTS["kill"],
             tmp: Path | None = None, progress=None, deliver: bool = True, per_node: int = WORKERS_PER_NODE,
             **sizes) -> dict:
    """The bench (module docstring): its result as a dict (`figures` holds the headline numbers).
    `per_node`: workers per simulated node; `sizes`: sim fields overridden (a test's reduced size)."""
    from longtake.actors import ray_boot
    from longtake.cluster.engine import prepare
    from longtake.pipelines.sim import PRESETS, build_sim, sim_config, window_latent_bytes
    from longtake.pipelines import inspect_model

    if preset not in PRESETS:
        raise ValueError(f"--simulate: got {preset!r}, expected one of {', '.join(PRESETS)}")
    say = progress or (lambda message: None)
    workers = sorted(set(workers))
    tmp = Path(tmp or tempfile.mkdtemp(prefix="longtake-scale-"))
    overrides = dict(sizes, **({"predict_s": predict_s} if predict_s is not None else {}))
    timed = build_sim(tmp / "timed", preset, **overrides)
    timeless = build_sim(tmp / "timeless", preset, **{**overrides, "predict_s": 0})
    config = sim_config(preset, **overrides)
    if config["animate"]:
        for model in (timed, timeless):
            animate_media(model / "media", config["width"], config["height"], config["face_size"], config["fps"])
    info = inspect_model(str(timed))
    job = prepare(_request(str(timed), seconds, steps, str(tmp / "probe.mp4")))
    passes = 2 if job.guidance > 1 else 1
    step_s = config["predict_s"] * passes / 2  # one window-step's simulated time
    c, h, w = job.latent_shape
    clip_bytes = 4 * c * job.latent_frames * h * w
    window_bytes = window_latent_bytes(info)
    nodes = max(1, math.ceil(max(workers) / per_node))
    runs = []
    say(f"{preset}: {seconds:g} s, {steps} steps, {len(job.windows)} windows; {nodes} nodes of {per_node} workers")
    with ray_boot.local_cluster(nodes, per_node, STORE_MB, HEAD_STORE_MB) as cluster:
        plan = [(n, False, 0) for n in workers if n != max(workers)] + [(max(workers), True, 0)]
        if kill:
            plan.append((max(workers), False, min(kill, max(workers) - 1)))
        for n, deliver_this, k in plan:
            model = timeless if n == 1 and len(workers) > 1 else timed
            say(f"  {n} worker{'s' * (n != 1)}" + (f", {k} killed" if k else "")
                + (", delivered" if deliver_this else ""))
            figures = _child(cluster, dict(address=cluster.address, model=str(model), workers=n, seconds=seconds,
                                           steps=steps, out=str(tmp / f"scale-{n}.mp4"),
                                           decode=deliver_this and deliver, kill=k))
            figures["timed"] = model == timed
            runs.append(figures)
    result = _summary(preset, config, step_s, window_bytes, clip_bytes, runs, seconds, steps, job)
    result.update(nodes=nodes, workers_per_node=per_node, conditioning_bytes=_conditioning_bytes(job))
    return result


def _child(cluster, args: dict) -> dict:
    """One run in a fresh driver process, the object stores sampled meanwhile."""
    from longtake.actors import ray_boot

    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(POLL_S):
            used = ray_boot.object_store_used(cluster)
            peak[0] = max(peak[0], used or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "longtake.tools.bench_scale", json.dumps(args)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the {args['workers']}-worker run failed:\n{proc.stderr[-4000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["object_store_peak_bytes"] = peak[0]
    return figures


def _summary(preset: str, config: dict, step_s: float, window_bytes: int, clip_bytes: int, runs: list[dict],
             seconds: float, steps: int, job) -> dict:
    compression = config["real_predict_s"] / config["predict_s"] if config["predict_s"] > 0 else math.inf
    efficiency, real = {}, {}
    for r in runs:
        r["bytes_per_window_step"] = {k: round(v / r["window_steps"]) for k, v in r["traffic"]["bytes"].items()}
        r["driver_ms_per_window_step"] = round(1000 * r["driver_cpu_s"] / r["window_steps"], 2)
        r["machine_cpu_ms_per_window_step"] = round(1000 * r["machine_cpu_s"] / r["window_steps"], 2)
        if r["killed"]:
            continue
        ideal = r["window_steps"] * step_s / r["workers"]
        if r["timed"]:
            r["ideal_s"] = round(ideal, 3)
            efficiency[str(r["workers"])] = round(ideal / r["denoise_s"], 4)
            overhead = max(0.0, r["denoise_s"] - ideal)
            real[str(r["workers"])] = round(ideal * compression / (ideal * compression + overhead), 4)
        else:  # time-free: the wall time per window-step is all overhead (module docstring)
            per_step = r["denoise_s"] / r["window_steps"]
            efficiency[str(r["workers"])] = round(step_s / (step_s + per_step), 4)
            real[str(r["workers"])] = round(step_s * compression / (step_s * compression + per_step), 4)
    largest = max((r for r in runs if not r["killed"] and r["timed"]), key=lambda r: r["workers"])
    moved = sum(largest["bytes_per_window_step"].get(k, 0) for k in ("latents", "predictions", "conditioning", "media"))
    hashes = {r["latents_sha256"] for r in runs}
    delivered = next((r for r in runs if r.get("frames_sha256")), None)
    slice_bytes = max(media_slices(job).values(), default=0)
    return {
        "preset": preset, "seconds": seconds, "steps": steps, "fps": job.request.fps,
        "size": f"{job.width}x{job.height}", "windows": len(job.windows), "latent_frames": job.latent_frames,
        "window_step_s": step_s, "compression": round(compression, 3), "real_predict_s": config["real_predict_s"],
        "window_latent_bytes": window_bytes, "clip_latent_bytes": clip_bytes,
        "window_media_slice_bytes": slice_bytes,
        "figures": {
            "efficiency": efficiency,
            "efficiency_uncompressed": real,
            "bytes_per_window_step_ratio": round(moved / window_bytes, 3),
            "driver_ms_per_window_step": largest["driver_ms_per_window_step"],
            "driver_rss_ratio": round(largest["driver_peak_rss_bytes"] / clip_bytes, 3),
            "driver_heap_ratio": round(largest.get("driver_peak_heap_bytes", 0) / clip_bytes, 3),
            "same_frames": len(hashes) == 1,
            "largest_media_call_bytes": largest["largest_media_call_bytes"],
            "machine_busy": largest["machine_busy"],
            "time_to_first_frame_s": delivered and delivered["first_frame_s"],
            "decode_encode_fps": delivered and round(delivered["frames"] / delivered["decode_s"], 2),
            "decode_error": next((r["decode_error"] for r in runs if r.get("decode_error")), None),
        },
        "runs": runs,
    }


def media_slices(job) -> dict[tuple[int, int], int]:
    """Each window's own media slice (pose or plan frames, face, background, mask), in bytes."""
    from longtake.actors.pool import nbytes
    from longtake.cluster.engine import window_conditioning

    return {(s, e): nbytes(window_conditioning(job, None, s, e).frames) for s, e in job.windows}


def _conditioning_bytes(job) -> dict:
    """What one predict call carried before the data path fixes (the job's whole conditioning, pose and
    media of the whole clip included: main at 8d6b70f) and what it carries now (its own slice; the job's
    conditioning once per worker)."""
    from longtake.actors.pool import nbytes

    import numpy as np

    # (before: the control frames as RGB, uint8; they are held and sent as palette indices now: core/frames.py)
    whole_clip = sum(int(np.prod(a.shape)) if a is job.control else nbytes(a)
                     for a in [job.control, *job.media.values()] if a is not None)
    return {"whole_clip_media": whole_clip, "largest_slice": max(media_slices(job).values(), default=0)}


TARGETS = {"efficiency_32": ">= 0.90", "efficiency_8": ">= 0.95", "bytes_per_window_step_ratio": "<= 3 (+ the slice)"}
EARLIER = Path("benchmarks/bench-quick.json")  # `longtake bench --quick`'s projection, set beside the measurement


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def table_lines(result: dict, command: str) -> list[str]:
    """The Scale section of BENCHMARKS.md for one preset (between its markers, `write`)."""
    f, runs = result["figures"], result["runs"]
    earlier = {}
    if EARLIER.is_file():
        earlier = json.loads(EARLIER.read_text())["details"].get("projection", {}).get("efficiency_window_1s", {})
    out = [f"## Scale: {result['preset']}, a simulated cluster at the real model's sizes", "",
           f"`{command}`: {result['size']}, {result['seconds']:g} s at {result['fps']:g} fps "
           f"({result['latent_frames']} "
           f"latent frames, {result['windows']} windows), {result['steps']} steps; a window-step sleeps "
           f"{result['window_step_s']:g} s ({result['real_predict_s']:g} s on one H100, compressed "
           f"{result['compression']:g}x). A window's latents: {_mb(result['window_latent_bytes'])}; the clip's: "
           f"{_mb(result['clip_latent_bytes'])}. One local Ray cluster: a head without CPUs (the drivers) and nodes of "
           f"{WORKERS_PER_NODE} workers, each node its own object store. Machine: {os.cpu_count()} cores.", "",
           "| workers | denoise (s) | ideal (s) | efficiency | at H100 speed | earlier projection | driver CPU / "
           "window-step | all CPU / window-step | cores busy | bytes / window-step: latents, predictions, "
           "conditioning, media | object store peak | driver peak RSS / clip latents | driver peak heap / clip "
           "latents |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        n = str(r["workers"])
        name = n + (f", {r['killed']} killed" if r["killed"] else "") + ("" if r["timed"] else " (time-free)")
        b = r["bytes_per_window_step"]
        moved = ", ".join(_mb(b.get(k, 0)) for k in ("latents", "predictions", "conditioning", "media"))
        eff = "" if r["killed"] else f"{f['efficiency'][n]:.3f}" + ("" if r["timed"] else " (derived)")
        real = "" if r["killed"] else f"{f['efficiency_uncompressed'][n]:.3f}"
        out.append(f"| {name} | {r['denoise_s']:.1f} | {r.get('ideal_s', '')} | {eff} | {real} | "
                   f"{format(earlier[n], '.3f') if n in earlier and not r['killed'] else ''} | "
                   f"{r['driver_ms_per_window_step']:.1f} ms | "
                   f"{r['machine_cpu_ms_per_window_step']:.1f} ms | {r['machine_busy']:.0%} | {moved} | "
                   f"{_mb(r['object_store_peak_bytes'])} | "
                   f"{r['driver_peak_rss_bytes'] / result['clip_latent_bytes']:.2f} | "
                   f"{r.get('driver_peak_heap_bytes', 0) / result['clip_latent_bytes']:.2f} |")
    out += ["", f"Headline (`--json`): bytes per window-step / a window's latents at the largest count "
                f"**{f['bytes_per_window_step_ratio']}** (target <= 3, plus the window's own media slice, "
                f"{_mb(result['window_media_slice_bytes'])} at most); the largest media one call carried "
                f"{_mb(f['largest_media_call_bytes'])}; driver {f['driver_ms_per_window_step']} ms CPU per "
                f"window-step; driver peak RSS / clip latents {f['driver_rss_ratio']} (its heap alone, without the "
                f"object store's pages it touched: {f['driver_heap_ratio']}); the same denoised latents for "
                f"every worker count and after the kills: **{f['same_frames']}**. "
                + (f"Decoding and encoding (720p H.264, after the last step): {f['decode_encode_fps']} frames/s; "
                   f"the first frame {f['time_to_first_frame_s']} s after the start." if not f["decode_error"]
                   else f"The decode failed: {f['decode_error']}"),
            "", f"The data path (#33): before its fixes (8d6b70f) every window call carried the job's whole "
                f"conditioning: {_mb(_held(result))} (text and reference) and "
                f"{_mb(result['conditioning_bytes']['whole_clip_media'])} of the whole clip's per-frame media; now a "
                f"call carries its latents and its own media slice ({_mb(result['window_media_slice_bytes'])} at "
                f"most), and a worker fetches the job's conditioning once, on its first window of the job.",
            "", "Reading it: efficiency is the ideal denoising time (window-steps x the simulated window-step / "
                "workers) over the wall time; \"at H100 speed\" keeps the measured overhead and multiplies the "
                "compute by the compression (module docstring of tools/bench_scale.py): compression overweights "
                "every cost that is not the model, so the compressed column is the conservative one. \"Earlier "
                "projection\" is `longtake bench --quick`'s model of the schedule fed with the bundled model's "
                "costs and a 1 s window (benchmarks/bench-quick.json). The 1-worker row is time-free (its window-steps "
                f"do not sleep: {_one_worker_h(result):.1f} hours otherwise) and its efficiency derived from its wall "
                "time per window-step. CPU per window-step counts every process on this machine (driver, workers, "
                "raylets, and Ray's background work, which dominates at a low rate of window-steps); \"cores "
                "busy\" near 100% would mean this machine's cores, not the schedule, set the wall time."]
    return out


def _held(result: dict) -> int:
    return max((r["job_conditioning_bytes"] for r in result["runs"]), default=0)


def _one_worker_h(result: dict) -> float:
    return result["windows"] * result["steps"] * result["window_step_s"] / 3600


def write(result: dict, out_json: str, out_md: str | None, command: str) -> None:
    """The JSON file; with `out_md`, the preset's Scale section in that Markdown file replaced (or appended)."""
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=2))
    if not out_md:
        return
    begin, end = f"<!-- scale:{result['preset']}:begin -->", f"<!-- scale:{result['preset']}:end -->"
    section = "\n".join([begin, *table_lines(result, command), end])
    path = Path(out_md)
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str]) -> None:
    """`python -m longtake.tools.bench_scale ARGS_JSON`: one run (`one_run`), its figures on stdout."""
    print(json.dumps(one_run(**json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
