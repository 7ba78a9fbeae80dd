"""The engine: a request becomes one MP4, rendered by overlapping windows fused at every step.

    prepare(request)  -> Job        validate against the model's configs; no Ray, no weights
    run(job, pool)    -> RenderResult
        1. encode the key prompts once (one worker); put the conditioning in the object store
        2. initial latents from (seed, frame index)
        3. for each step: every window predicts alone -> fuse in window order -> scheduler step
        4. decode window by window on the workers; stream frames in order into ffmpeg

The pool is an in-process worker (reference) or Ray actors; both give identical frames.
"""

from __future__ import annotations

import inspect
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from longtake.actors.pool import Pool
from longtake.actors.worker import Conditioning
from longtake.pipelines import ModelInfo, inspect_model, load_scheduler
from longtake.pipelines.windows import (
    PromptKey,
    fuse,
    frame_seed,
    initial_noise,
    plan_windows,
    prompt_schedule,
    window_weights,
)
from longtake.request import RenderRequest, RequestError, parse_request
from longtake.video import VideoWriter, contact_sheet, preview_indices

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A request resolved against its model: every number the loop needs."""

    request: RenderRequest
    model: ModelInfo
    frames: int  # output frames = latent frames * temporal compression
    height: int
    width: int
    steps: int
    guidance: float
    window: int  # latent frames
    overlap: int  # latent frames
    windows: list[tuple[int, int]]  # latent-frame windows
    keys: list[PromptKey]

    @property
    def latent_frames(self) -> int:
        return self.frames // self.model.temporal_compression

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.model.vae_scale_factor
        return (self.model.latent_channels, self.height // f, self.width // f)  # (C, h, w)


@dataclass
class RenderResult:
    out: str
    frames: int
    fps: float
    seconds: float
    width: int
    height: int
    window: int  # output frames
    overlap: int  # output frames
    windows: int
    workers: int
    steps: int
    model_evaluations: int  # window predictions (each includes classifier-free guidance)
    wall_s: float
    frames_sha256: str
    model: str
    seed: int
    weighting: str
    noise: str
    preview: str | None = None
    driver_peak_rss_mb: float = 0.0  # this process's peak resident memory (workers excluded)

    def to_dict(self) -> dict:
        return asdict(self)


def prepare(request: RenderRequest | dict) -> Job:
    """Check a request against its model and plan the windows. Raises RequestError."""
    request = parse_request(request)
    model = inspect_model(request.model)
    factor = model.vae_scale_factor
    height = request.height or model.default_size
    width = request.width or model.default_size
    for field, value in (("height", height), ("width", width)):
        if value % factor or (value // factor) % 2 and factor == 1:
            raise RequestError(field, value, f"a multiple of {factor} (the model's VAE factor)")
    window = request.window or model.native_window
    if window > model.max_window:
        raise RequestError("window", window, f"at most {model.max_window} frames (the model's temporal limit)")
    overlap = request.overlap if request.overlap is not None else window // 4
    if overlap >= window:
        raise RequestError("overlap", overlap, f"0 <= overlap < window ({window})")
    frames = request.num_frames
    if frames % model.temporal_compression:
        raise RequestError("seconds", request.seconds, f"seconds * fps a multiple of {model.temporal_compression}")
    if request.timeline is not None:
        keys = [PromptKey(k.at, k.prompt) for k in request.timeline]
    else:
        keys = [PromptKey(0.0, request.prompt)]
    return Job(
        request=request,
        model=model,
        frames=frames,
        height=height,
        width=width,
        steps=request.steps or model.default_steps,
        guidance=request.guidance if request.guidance is not None else model.default_guidance,
        window=window,
        overlap=overlap,
        windows=plan_windows(frames // model.temporal_compression, window, overlap),
        keys=keys,
    )


def _step_kwargs(scheduler, seed: int, step: int) -> dict:
    """eta=0 for DDIM-like schedulers (as diffusers' pipelines); a per-step generator for stochastic
    ones, seeded from (seed, step) so the noise never depends on the workers."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(frame_seed(seed, -1_000_000 - step))
    return kwargs


def _bar(total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    """A progress bar on stderr (every 10 s when stderr is not a terminal)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 10)


class Cancelled(Exception):
    """The job was cancelled while it ran; nothing was written."""


def run(job: Job, pool: Pool, progress: bool = True, on_frames=None, on_progress=None, cancelled=None) -> RenderResult:
    """Render a prepared job on a pool. Writes the MP4 (and preview) atomically.

    Optional hooks: `on_frames(first_index, frames)` sees every decoded uint8 chunk in order;
    `on_progress(dict)` gets {phase, step, steps, windows_done, windows_total, frames_done, frames, eta_s}
    after every window and decoded chunk; `cancelled()` is polled as often, and True stops the job
    with `Cancelled` (no output left behind)."""
    t0 = time.perf_counter()
    req, plan = job.request, job.windows
    latent_frames = job.latent_frames

    # 1. conditioning: key embeddings once, per-frame schedule, one object for every task
    keys, negative = pool.call("encode", [k.prompt for k in job.keys], req.negative_prompt)
    a, b, alpha = prompt_schedule(job.keys, latent_frames, req.fps / job.model.temporal_compression)
    cond = pool.put(Conditioning(keys, negative, a, b, alpha))

    # 2. initial latents from (seed, frame)
    scheduler = load_scheduler(job.model.path)
    scheduler.set_timesteps(job.steps)
    z = initial_noise(req.seed, latent_frames, job.latent_shape, req.noise, job.window, job.overlap)  # (1, C, F, h, w)
    z = z * scheduler.init_noise_sigma
    weights = window_weights(plan, req.weighting)

    total = job.steps * len(plan)
    started = time.perf_counter()

    def report(phase: str, step: int, windows_done: int, frames_done: int = 0) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled(f"job cancelled during {phase}")
        if on_progress is not None:
            elapsed = time.perf_counter() - started
            eta = elapsed / windows_done * (total - windows_done) if windows_done and phase == "denoise" else None
            on_progress({"phase": phase, "step": step, "steps": job.steps, "windows_done": windows_done,
                         "windows_total": total, "frames_done": frames_done, "frames": job.frames,
                         "eta_s": None if eta is None else round(eta, 1)})

    # 3. denoise: predict every window, fuse in window order, one scheduler step
    bar = _bar(total, "denoise", "win", progress)
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(z, t)  # (1, C, F, h, w)
        tasks = [(model_in[:, :, s:e].clone(), t, cond, s, e, job.guidance) for s, e in plan]
        bar.set_postfix_str(f"step {i + 1}/{job.steps}, {len(plan)} windows")
        preds = []
        for pred in pool.imap("predict", tasks):
            preds.append(pred)
            bar.update()
            report("denoise", i + 1, i * len(plan) + len(preds))
        fused = fuse(preds, plan, weights, latent_frames)  # (1, C, F, h, w)
        z = scheduler.step(fused, t, z, **_step_kwargs(scheduler, req.seed, i)).prev_sample
    bar.close()

    # 4. decode in window-length chunks on the workers; frames stream in order into ffmpeg
    chunks = [(s, min(s + job.window, latent_frames)) for s in range(0, latent_frames, job.window)]
    sampled = set(preview_indices(job.frames)) if req.preview else set()
    previews: list[tuple[int, np.ndarray]] = []
    bar = _bar(job.frames, "decode", "frame", progress)
    with VideoWriter(req.out, job.width, job.height, req.fps) as writer:
        first = 0
        for frames in pool.imap("decode", [(z[:, :, s:e].clone(),) for s, e in chunks]):  # (n, H, W, 3)
            writer.write(frames)
            if on_frames is not None:
                on_frames(first, frames)
            previews += [(first + k, frames[k].copy()) for k in range(len(frames)) if first + k in sampled]
            first += len(frames)
            bar.update(len(frames))
            report("decode", job.steps, total, first)
    bar.close()
    if req.preview:
        contact_sheet(previews, req.preview)

    return RenderResult(
        out=req.out,
        frames=writer.frames_written,
        fps=req.fps,
        seconds=req.seconds,
        width=job.width,
        height=job.height,
        window=job.window * job.model.temporal_compression,
        overlap=job.overlap * job.model.temporal_compression,
        windows=len(plan),
        workers=pool.num_workers,
        steps=job.steps,
        model_evaluations=job.steps * len(plan),
        wall_s=round(time.perf_counter() - t0, 3),
        frames_sha256=writer.sha256,
        model=req.model,
        seed=req.seed,
        weighting=req.weighting,
        noise=req.noise,
        preview=req.preview,
        driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
