"""Starting the workers: Ray (local, or joining a cluster) and the actor pool for a job.

`render(request)` is the public Python API: prepare (no Ray), start or join Ray, run, clean up.
Only what longtake started is stopped: actors always, Ray itself only if this call started it.

A short job on the CPU renders in this process, without Ray, unless told otherwise (`local_reason`):
Ray's start and stop and a worker process per core loading the model cost a few seconds, more than a
second CPU worker saves on a job that small. Same frames either way (one torch thread per worker).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from longtake.actors import ray_boot
from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.engine import Job, RenderResult, prepare, run
from longtake.pipelines import ROLES
from longtake.request import RenderRequest, RequestError

logger = logging.getLogger(__name__)


def worker_plan(job: Job, gpus: float, cpus: float) -> tuple[WorkerSpec, int]:
    """Device, thread count and pool slots for a job on a cluster with these resources: a slot is one
    worker, or with cp > 1 a group of cp workers that predicts each window together."""
    req = job.request
    device = req.device if req.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    # families with a large text encoder encode on one encoder worker: predictors do not load it
    roles = ("predict", "decode") if job.model.separate_encoder else ROLES
    group = {"cp": req.cp, "cp_mode": job.cp_mode}
    if device == "cuda":
        workers = req.workers or int(gpus)
        return WorkerSpec(job.model.path, "cuda", job.model.cuda_dtype, roles=roles, **group), \
            max(1, workers // req.cp)
    workers = req.workers or max(1, int(cpus))
    # One torch thread per worker: CPU kernels may round differently with other thread counts,
    # and the frames must not depend on how many workers there are.
    return WorkerSpec(job.model.path, "cpu", "float32", threads=1, roles=roles, **group), max(1, workers // req.cp)


# The rule of `local_reason`, one place: at most this many window predictions, of a model whose
# weights are at most this size (the bundled default: 10 MB, about 60 ms a window on one core; a real
# model's window takes seconds on a CPU, where a second worker pays for Ray at once)
LOCAL_MAX_WINDOW_STEPS = 200
LOCAL_MAX_MODEL_MB = 64


def model_mb(path: str) -> float:
    """Size of a model directory's safetensors weights, in MB."""
    total = 0
    for directory, _, files in os.walk(path, followlinks=True):
        total += sum(os.path.getsize(os.path.join(directory, f)) for f in files if f.endswith(".safetensors"))
    return total / 1e6


def local_reason(job: Job, address: str | None = None) -> str | None:
    """Why this job renders in this process by default (None: on Ray): on the CPU, no cluster named (no
    `address`, no RAY_ADDRESS), no worker count asked for, and a small job of a small model."""
    req = job.request
    if address or os.environ.get("RAY_ADDRESS") or req.workers is not None or req.cp > 1:
        return None
    if req.device == "cuda" or req.device == "auto" and _cuda():
        return None
    window_steps = len(job.windows) * job.steps
    if window_steps > LOCAL_MAX_WINDOW_STEPS:
        return None
    size = model_mb(job.model.path)
    if size > LOCAL_MAX_MODEL_MB:
        return None
    return (f"a short job on the CPU ({window_steps} window predictions, a {size:.0f} MB model): rendering in "
            "this process; --workers N renders on Ray")


def check_in_process(job: Job) -> None:
    """A job rendered in this process (--in-process) has one worker: no group. Raises RequestError."""
    if job.request.cp > 1:
        raise RequestError("cp", job.request.cp, "1 in this process (--in-process): a group of workers runs on Ray")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_ray_pool(job: Job, address: str | None = None, timings: dict | None = None):
    """Start (or join) Ray and build a pool for the job. Returns (pool, ray_started_here); `timings`, if
    given, gets `ray_start_s`."""
    from longtake.actors.ray_pool import RayPool

    want = job.request.workers or max(os.cpu_count() or 1, job.request.cp)
    t0 = time.perf_counter()
    started = ray_boot.start_ray(address, num_cpus=max(os.cpu_count() or 1, want))
    if timings is not None:
        timings["ray_start_s"] = round(time.perf_counter() - t0, 3)
    resources = ray_boot.cluster_resources()
    spec, slots = worker_plan(job, resources.get("GPU", 0), resources.get("CPU", 1))
    workers = slots * spec.cp
    if spec.device == "cuda" and resources.get("GPU", 0) < workers:
        raise RuntimeError(f"{workers} GPU workers asked for, the cluster has {resources.get('GPU', 0):g} GPUs")
    try:
        return RayPool(spec, slots), started
    except BaseException:
        if started:
            ray_boot.stop_ray()
        raise


def render(request: RenderRequest | dict | Job, pool=None, progress: bool = False, address: str | None = None,
           in_process: bool | None = None, on_frames=None, provenance=None) -> RenderResult:
    """Render a request (or a job `prepare` made: its media inputs are not opened again) to an MP4; returns
    the summary. Bad input raises RequestError before anything starts. Give `pool` to reuse workers across
    renders (it is left running). `in_process`: True, one worker in this process; False, Ray; None (the
    default), in this process when `local_reason` says so. `provenance`: see `engine.run` (default: the CLI's
    key, `provenance.Provenance.local`)."""
    job = request if isinstance(request, Job) else prepare(request)
    if pool is not None:
        return run(job, pool, progress, on_frames, provenance=provenance)
    if in_process is None:
        reason = local_reason(job, address)
        if reason:
            logger.info(reason)
        in_process = reason is not None
    started, t0, around = False, time.perf_counter(), {}
    if in_process:
        check_in_process(job)
        spec, _ = worker_plan(job, gpus=0, cpus=1)
        pool = InProcessPool(replace(spec, roles=ROLES))  # the one worker does everything
    else:
        pool, started = make_ray_pool(job, address, around)
    around["workers_start_s"] = round(time.perf_counter() - t0, 3)
    try:
        result = run(job, pool, progress, on_frames, provenance=provenance)
    finally:
        t1 = time.perf_counter()
        pool.shutdown()
        if started:
            ray_boot.stop_ray()
    # what a render costs around the engine: Ray starting (ray_start_s), then the workers with their model
    # (workers_start_s includes ray_start_s), and both stopping
    result.timings.update(around, workers_stop_s=round(time.perf_counter() - t1, 3))
    return result
