"""The engine: a request becomes one MP4, rendered by overlapping windows fused at every step.

    prepare(request)  -> Job        validate against the model's configs and the video writer's size rule,
                                    open and check the media inputs (`inputs.py`), draw a pose sequence
                                    into skeleton frames (`longtake/pose.py`) (the bundled model without
                                    one: its motion plan, `models/planner.py`), read a Wan-Animate model's
                                    reference photo, face, background and mask (an IP-Adapter model's:
                                    its reference photo, the image prompt); no Ray, no weights
    run(job, pool)    -> RenderResult
        1. encode the key prompts once (one encoder); the backend's conditioning goes in the object store,
           with a pose's control frames (each window's prediction takes its own range of them) and a
           Wan-Animate model's media (`cond.media`: its reference photo, face, background and mask);
           the known frames' latents once (a worker's `encode_frames`)
        2. initial latents from (seed, latent frame index); video to video: the input's latents (encoded
           chunk by chunk as it streams) noised to `strength`, the first steps skipped
        3. denoise (`sampler.py`): a window predicts its next step alone as soon as the frames it covers
           have reached that step (the wavefront; `schedule="barrier"`: when every frame has); each
           frame range is fused in window order and stepped by its own scheduler when all its windows
           have predicted, then its known frames are set to their latents (clean context); a loop's
           windows wrap around the end (with a checkpointer: resume from the newest valid checkpoint;
           save one of the coherent step, the newest every range has reached, every k steps)
        4. decode: window-length chunks on any worker (per-frame VAEs), or one ordered streamed session
           (causal 3D VAEs); frames stream in order into ffmpeg, the surplus of the model's frame rule
           (Wan: 4k+1) dropped at the end, so the MP4 has exactly round(seconds * fps) new frames, after
           an extended clip's frames and before a lead-into clip's (passed through as read);
           frames_sha256 is taken on them as generated, then the visible label (`label.py`) is drawn on the
           first seconds of the new frames (after an extended clip's) and the invisible watermark (`watermark.py`) on the new frames; the finished MP4
           is remuxed with its AIGC metadata and integrity code, and C2PA-signed when configured
           (`provenance.py`)
        progress: {phase, step (steps completed), steps, window_steps_done, window_steps_total, frames_done,
        frames, eta_s} per window and decoded chunk, then once with phase "done" and the final numbers

The engine is family-blind: geometry comes from the model's `LatentLayout`, conditioning is the backend's
(the engine passes it along unread). The pool (tickets: `submit` / `poll` / `cancel`) is an in-process
worker (reference), Ray actors or serve's denoisers; all give identical frames, with either schedule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from longtake.actors.pool import WAIT_S, Pool
from longtake.cluster.checkpoint import Checkpointer, scheduler_state
from longtake.cluster.sampler import Sampler
from longtake.cluster.inputs import Inputs, clip_frames, latent_index, reference_image, resolve_inputs
from longtake.pipelines import ModelInfo, inspect_model, load_scheduler, weights_identity
from longtake.core.windows import (
    PromptKey,
    initial_noise,
    plan_loop,
    plan_windows,
    private_noise,
    prompt_schedule,
    window_weights,
)
from longtake.request import PLANNED_BRIDGE_STRENGTH, RenderRequest, RequestError, parse_request
from longtake.label import Layout, LabelError, labelled_span
from longtake.label import layout as layout_label
from longtake.media import load_image, probe_media, video_chunks
from longtake.models import planner
from longtake.pose import pose_frames, reference_person
from longtake.provenance import Provenance
from longtake.watermark import Embedder, payload_of
from longtake.video import VideoWriter, contact_sheet, preview_indices

logger = logging.getLogger(__name__)

DISCARD = ("cancelled", "lost")  # stop reasons after which no checkpoint is saved
DECODE_CHUNK = 4  # latent frames per streamed decode chunk (16 frames for Wan)


@dataclass(frozen=True)
class Job:
    """A request resolved against its model: every number the loop needs."""

    request: RenderRequest
    model: ModelInfo
    frames: int  # frames denoised: the new ones (round(seconds * fps)) and the contexts of extend / lead_into
    height: int
    width: int
    steps: int
    guidance: float
    guidance_2: float  # the low-noise expert's (two-expert models); equals guidance otherwise
    window: int  # latent frames
    overlap: int  # latent frames
    windows: list[tuple[int, int]]  # latent-frame windows
    keys: list[PromptKey]
    noise: str  # the request's initial-noise mode, else the model's default
    inputs: Inputs = Inputs()  # known frames (image, keyframes, extend, lead_into) and passed-through clips
    loop: bool = False  # circular windows: the last frame flows into the first
    label: Layout | None = None  # the visible label on the output's opening frames (None: label "none")
    control: np.ndarray | None = field(default=None, repr=False, compare=False)  # (frames, H, W, 3) uint8 pose frames
    control_scale: float = 1.0
    # a model animating a reference photo (Wan-Animate): reference (H, W, 3), face (frames, S, S, 3), background
    # (frames, H, W, 3), mask (frames, H, W) uint8; attached to the conditioning with the pose
    media: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def new_frames(self) -> int:
        """Frames made and written (round(seconds * fps)): the denoised clip without its contexts."""
        return self.frames - self.inputs.ctx_before - self.inputs.ctx_after

    @property
    def output_frames(self) -> int:
        """Frames in the MP4: the input clips passed through, and the new frames."""
        return self.new_frames + self.inputs.passthrough

    @property
    def clip_keys(self) -> list[PromptKey]:
        """The prompt keys in the denoised clip's frames (what the text schedule and the plan follow)."""
        return clip_keys(self.keys, self.inputs.ctx_before, self.request.fps)

    @property
    def guidances(self) -> tuple[float, ...]:
        """One guidance scale per expert of the model."""
        return (self.guidance, self.guidance_2)[: self.model.experts]

    @property
    def latent_frames(self) -> int:
        return self.model.layout.latent_frames(self.frames)

    @property
    def rendered_frames(self) -> int:
        """Frames the latents decode to: `frames`, or a few more for a frame rule (dropped at the end)."""
        return self.model.layout.frames(self.latent_frames)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.model.layout.latent_shape(self.height, self.width)  # (C, h, w)


@dataclass
class RenderResult:
    out: str
    frames: int
    fps: float
    seconds: float
    width: int
    height: int
    window: int  # output frames (a window of L latent frames decodes to layout.frames(L))
    overlap: int  # output frames
    windows: int
    workers: int
    steps: int
    model_evaluations: int  # window predictions (each includes classifier-free guidance)
    wall_s: float
    frames_sha256: str  # the frames as generated (before the label): the same request and seed, the same hash
    model: str
    seed: int
    weighting: str
    noise: str
    delivered_sha256: str = ""  # the frames written to the MP4, label included
    produce_id: str = ""  # the AIGC ProduceID in the MP4's metadata
    label: str = "start"  # the visible label: start, always or none
    labelled_frames: int = 0
    schedule: str = "wavefront"  # what ran: the request's, or the barrier for a scheduler that needs it
    preview: str | None = None
    input_frames: int = 0  # frames of `frames` copied from extend / lead_into
    loop: bool = False
    driver_peak_rss_mb: float = 0.0  # this process's peak resident memory (workers excluded)
    resumed_from_step: int = 0  # steps taken from a checkpoint instead of computed
    checkpoints_saved: int = 0
    checkpoint_s: float = 0.0  # total seconds spent writing checkpoints
    timings: dict = field(default_factory=dict)  # seconds per phase: encode, denoise (fuse, scheduler and the
    # driver thread's CPU time in it: driver_s), decode

    def to_dict(self) -> dict:
        return asdict(self)


def clip_keys(keys: list[PromptKey], ctx_before: int, fps: float) -> list[PromptKey]:
    """Prompt keys moved into the denoised clip's time: a timeline counts in the new frames, which begin
    after an extended clip's context (`ctx_before` frames)."""
    shift = ctx_before / fps
    return [PromptKey(k.at + shift, k.prompt) for k in keys] if shift else keys


def prepare(request: RenderRequest | dict, pixels: bool = True) -> Job:
    """Check a request against its model and plan the windows. Raises RequestError. `pixels=False` (a
    server checking a request before it queues it): every check, with the videos probed from their packets,
    not decoded, and no pose or plan drawn; the Job has the frame counts, windows and cost of the real one,
    but no control frames, media or known pixels (it is not run)."""
    request = parse_request(request)
    model = inspect_model(request.model)
    if model.options.get("planner"):  # the bundled model's motion plan (models/planner.py)
        planner.check(model.options["planner"], request.model)
    height = request.height or model.default_height
    width = request.width or model.default_width
    for name, value in (("height", height), ("width", width)):
        model.layout.check_size(name, value)
    unit = "latent frames" if model.layout.temporal > 1 else "frames"
    window = request.window or model.native_window
    if window > model.max_window:
        raise RequestError("window", window, f"at most {model.max_window} {unit} (the model's temporal limit)")
    overlap = request.overlap if request.overlap is not None else window // 4
    if overlap >= window:
        raise RequestError("overlap", overlap, f"0 <= overlap < window ({window} {unit})")
    layout = model.layout
    inputs = resolve_inputs(request, height, width, layout.frames(window), layout.causal, layout.temporal,
                            pin_reference=model.options.get("reference") != "condition", pixels=pixels)
    frames = inputs.ctx_before + inputs.new + inputs.ctx_after
    latent_frames = layout.latent_frames(frames)
    if request.loop and latent_frames < 2:
        raise RequestError("seconds", request.seconds, f"at least {layout.frames(2)} frames at {request.fps:g} fps "
                                                       f"for a loop")
    if request.guidance_2 is not None and model.experts < 2:
        raise RequestError("guidance_2", request.guidance_2, "no value: it is for models with two experts (Wan 2.2 "
                                                             "A14B), this one has one")
    guidance = request.guidance if request.guidance is not None else model.default_guidance
    label = None
    if request.label != "none":
        try:
            label = layout_label(request.label_text, request.label_position, width, height)
        except LabelError as e:
            raise RequestError(e.field, e.value, e.expected) from None
    if request.timeline is not None:
        keys = [PromptKey(k.at, k.prompt) for k in request.timeline]
    else:
        keys = [PromptKey(0.0, request.prompt)]
    media = _animation_media(request, model, frames, width, height, pixels)  # animating a reference: checked first
    if model.options.get("ip_adapter"):  # an IP-Adapter's image prompt: the reference photo (pinned at frame 0 too)
        media = _image_prompt(request)
    control, controlled = None, False  # the control frames; whether there are (or, without pixels, would be)
    if request.pose is not None:  # pose-driven: the skeleton frames, checked and drawn before any work
        if not model.options.get("pose"):
            raise RequestError("pose", request.pose, "a model with a pose ControlNet (an AnimateDiffControlNetPipeline "
                                                     "directory) or a Wan-Animate model (WanAnimatePipeline); this one "
                                                     "is neither")
        reference = None
        if request.reference_pose is not None and request.retarget != "none":
            reference = reference_person("reference_pose", request.reference_pose, width, height)
        control = pose_frames("pose", request.pose, frames, request.fps, width, height, request.pose_loop, reference,
                              pixels)
        controlled = True
    elif request.plan == "auto" and model.options.get("planner") and not inputs.redraws:  # the bundled model
        if pixels:
            control = planner.plan(clip_keys(keys, inputs.ctx_before, request.fps), frames, request.fps, width,
                                   height, request.seed, request.loop,
                                   tuple((p.frame, p.pixels) for p in inputs.pinned))  # None: nothing to plan from
            controlled = control is not None
        else:  # known frames may show no object: only their pixels tell (the run checks again)
            controlled = planner.plannable(keys, request.loop, bool(inputs.pinned))
    if controlled and inputs.before is not None and inputs.after is not None and request.strength is None:
        # the plan says where the object goes, so more of the crossfade (its look) is kept
        inputs = replace(inputs, strength=PLANNED_BRIDGE_STRENGTH,
                         hashes={**inputs.hashes, "bridge": PLANNED_BRIDGE_STRENGTH})
    if not controlled and request.control_scale is not None:  # no pose, and no plan to scale
        raise RequestError("control_scale", request.control_scale,
                           "no value without pose or a motion plan (the bundled model's, for prompts that name a "
                           "shape and a motion, or known frames that show the object)")
    return Job(
        request=request,
        model=model,
        frames=frames,
        height=height,
        width=width,
        steps=request.steps or model.default_steps,
        guidance=guidance,
        guidance_2=request.guidance_2 if request.guidance_2 is not None else guidance,
        window=window,
        overlap=overlap,
        windows=(plan_loop if request.loop else plan_windows)(latent_frames, window, overlap),
        keys=keys,
        noise=request.noise or model.default_noise,
        inputs=inputs,
        loop=request.loop,
        label=label,
        control=control,
        control_scale=request.control_scale if request.control_scale is not None else 1.0,
        media=media,
    )


def _image_prompt(request: RenderRequest) -> dict:
    """A model with an IP-Adapter (ModelInfo.options "ip_adapter", AnimateDiff): the request's reference photo
    as read (its own size, RGB) is the image prompt, attached to the conditioning as a Wan-Animate model's
    media is; the workers' CLIP image processor scales and crops it as diffusers' pipelines do. RequestError
    naming `reference` without one (an IP-Adapter, once loaded, needs an image)."""
    if request.reference is None:
        raise RequestError("reference", None, "a photo: this model has an IP-Adapter (ip_adapter/), whose image "
                                              "prompt is the reference photo (pinned at frame 0 too)")
    size = probe_media("reference", request.reference)
    return {"reference": load_image("reference", request.reference, size["width"], size["height"])}


def _animation_media(request: RenderRequest, model: ModelInfo, frames: int, width: int, height: int,
                     pixels: bool = True) -> dict:
    """The media of a model that animates a reference photo with a pose (ModelInfo.options "reference" ==
    "condition": Wan-Animate): the reference photo (fitted inside the output size and padded), the face video
    (at the model's face size) and, to replace a character, the background video and the mask (grayscale),
    each as long as the clip (pose_loop repeats them too). Every other model refuses these fields. Checked and
    read before any weights load; RequestError names the field. `pixels=False`: the videos' lengths checked
    from their packets, not read (no face, background or mask in the result)."""
    animating = model.options.get("reference") == "condition"
    modes = model.options.get("modes", ["animate"])
    if not animating:
        for name in ("face", "background", "mask"):
            if getattr(request, name) is not None:
                raise RequestError(name, getattr(request, name), "a Wan-Animate model (WanAnimatePipeline); this "
                                                                 "one takes no face, background or mask video")
        if request.animate_mode != "animate":
            raise RequestError("animate_mode", request.animate_mode, "'animate' (replace is for Wan-Animate models)")
        return {}
    if request.animate_mode not in modes:
        raise RequestError("animate_mode", request.animate_mode, f"one of {', '.join(modes)}")
    if model.options.get("pose_required") and request.pose is None:
        raise RequestError("pose", None, "a pose video or keypoint JSON file (this model animates the reference "
                                         "photo with a pose)")
    if request.reference is None:
        raise RequestError("reference", None, "a photo of the character to animate (this model's reference image)")
    if request.control_scale is not None:
        raise RequestError("control_scale", request.control_scale, "no value (it scales a ControlNet; this model "
                                                                   "has none)")
    media = {"reference": reference_image("reference", request.reference, width, height)}
    if request.face is not None:
        size = model.options["face_size"]
        media["face"] = clip_frames("face", request.face, frames, request.fps, size, size, request.pose_loop,
                                    pixels=pixels)
    if request.animate_mode == "replace":
        media["background"] = clip_frames("background", request.background, frames, request.fps, width, height,
                                          request.pose_loop, pixels=pixels)
        media["mask"] = clip_frames("mask", request.mask, frames, request.fps, width, height, request.pose_loop,
                                    gray=True, pixels=pixels)
    return {name: a for name, a in media.items() if a is not None}


def fingerprint(job: Job, dtype: str, device: str) -> str:
    """What a job's latents depend on: a checkpoint is only reused for the same fingerprint. That includes
    the model's weights (`weights_identity`: paths, sizes and times of its files) and the dtype and device
    the workers run in (the pool's WorkerSpec.dtype / .device): a job paused on a GPU in float16 never
    resumes from those latents on a CPU in float32. (Not the output path, the preview or the worker count:
    they do not change the latents.)"""
    req = job.request
    data = {"model": job.model.path, "weights": weights_identity(job.model.path), "dtype": dtype,
            "device": device, "frames": job.frames, "size": [job.height, job.width], "steps": job.steps,
            "guidance": job.guidance, "windows": job.windows, "seed": req.seed, "noise": job.noise,
            "weighting": req.weighting, "keys": [[k.at, k.prompt] for k in job.keys],
            "negative": req.negative_prompt, "fps": req.fps}
    if job.inputs.pinned or job.loop or job.inputs.source is not None:  # the inputs (file hashes) and where they sit
        data["inputs"] = {"hashes": job.inputs.hashes, "pinned": [[p.source, p.frame, len(p.pixels)]
                                                                  for p in job.inputs.pinned], "loop": job.loop}
    if job.model.experts > 1:
        data["guidance_2"] = job.guidance_2
    if job.control is not None:  # the pose as drawn (retargeting and resampling included)
        data["pose"] = {"sha256": hashlib.sha256(job.control.tobytes()).hexdigest(), "scale": job.control_scale}
    if job.media:  # the reference photo, face, background and mask as read (resized), and the mode
        data["media"] = {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
                         for name, a in sorted(job.media.items())}
        data["animate_mode"] = req.animate_mode
    if job.model.options.get("private_frames"):  # the windows' own frames are in the checkpoint too
        data["private_frames"] = job.model.options["private_frames"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 noised to timestep t's level as the scheduler defines it (add_noise; flow matching: scale_noise)."""
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(x0, noise, t)
    return scheduler.scale_noise(x0, t, noise)


def _source_latents(job: Job, pool: Pool, tick=None) -> torch.Tensor:
    """Video to video: the input's latents (1, C, F, h, w), encoded chunk by chunk on the workers as the
    frames stream from ffmpeg (never the whole video as pixels). Chunks are one window of frames; a causal
    VAE (Wan) encodes frame 0 alone, then 4m frames at a time after the frame before them (whose latent is
    dropped): each chunk restarts the VAE's cache, an approximation of one whole-clip encode."""
    src, layout, req = job.inputs.source, job.model.layout, job.request
    size = max(1, layout.frames(job.window) - (1 if layout.causal else 0))
    parts, buffer, prev, left = [], [], None, job.frames
    first = True

    def flush(group: list, prefix) -> None:
        frames = np.stack(([prefix] if prefix is not None else []) + group)
        latents = pool.call("encode_frames", frames, tick=tick)  # (1, C, n, h, w)
        parts.append(latents[:, :, 1:] if prefix is not None else latents)

    for chunk in video_chunks("video", src.path, req.fps, job.width, job.height, chunk=size):
        for frame in chunk[:left]:
            buffer.append(frame)
            left -= 1
            if len(buffer) == (1 if first and layout.causal else size):
                flush(buffer, prev)
                prev, buffer, first = (buffer[-1] if layout.causal else None), [], False
        if left <= 0:
            break
    if buffer:  # the last group, padded with its last frame to whole latent frames (a causal VAE drops a rest)
        flush(buffer + [buffer[-1]] * (-len(buffer) % layout.temporal if prev is not None else 0), prev)
    return torch.cat(parts, 2)[:, :, : job.latent_frames]


class KnownLatents:
    """The latents of a job's known frames: `pin(z, start, end)` sets those in z's frames [start, end), in
    place, to the known latents themselves (clean, at every step: a clean context, which the bundled model
    follows much more closely than RePaint-style context noised to each step's level; the note of issue 15
    has the figures); `crossfade(z)` is a clip whose every frame is known or interpolated between the known
    frames around it (held before the first and after the last): a bridge's start (inputs.py)."""

    def __init__(self, index: torch.Tensor, known: torch.Tensor):
        self.index, self.known = index, known  # (k,) sorted latent frames, (1, C, k, h, w)

    def __call__(self, z: torch.Tensor, start: int = 0, end: int | None = None) -> None:
        inside = (self.index >= start) & (self.index < (z.shape[2] if end is None else end))
        if bool(inside.any()):
            z[:, :, self.index[inside]] = self.known[:, :, inside].to(z.dtype)

    def crossfade(self, z: torch.Tensor) -> torch.Tensor:
        frames = z.shape[2]
        at = torch.arange(frames, dtype=torch.float64)
        index = self.index.to(torch.float64)
        hi = torch.searchsorted(index, at).clamp(max=len(index) - 1)  # first known frame at or after each frame
        lo = torch.where(index[hi] > at, (hi - 1).clamp(min=0), hi)  # last known frame at or before it
        span = index[hi] - index[lo]
        weight = torch.where(span > 0, (at - index[lo]) / span.clamp(min=1), torch.zeros_like(at))
        weight = weight.to(z.dtype).view(1, 1, frames, 1, 1)
        known = self.known.to(z.dtype)
        return (1 - weight) * known[:, :, lo] + weight * known[:, :, hi]


def _known_latents(job: Job, pool: Pool, tick=None) -> KnownLatents | None:
    """The latents of a job's known frames (`KnownLatents`), encoded once, on a worker; None when nothing is
    known."""
    if not job.inputs.pinned:
        return None
    layout, latent_frames = job.model.layout, job.latent_frames
    at: dict[int, torch.Tensor] = {}  # latent frame -> known latent (a later pin wins)
    for p in job.inputs.pinned:
        latents = pool.call("encode_frames", p.pixels, tick=tick)  # (1, C, n, h, w)
        first = latent_index(p.frame, layout.temporal, layout.causal)
        for k in range(min(latents.shape[2], latent_frames - first)):
            at[first + k] = latents[:, :, k]
    index = torch.tensor(sorted(at))
    known = torch.stack([at[f] for f in sorted(at)], 2)  # (1, C, k, h, w)
    logger.info("%d latent frames known (%s)", len(index), ", ".join(p.source for p in job.inputs.pinned))
    return KnownLatents(index, known)


def _bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0) -> tqdm:
    """A progress bar on stderr (every 10 s when stderr is not a terminal). `initial`: work already done
    (steps from a checkpoint): shown, but not counted in the rate and the ETA."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 10)


class Cancelled(Exception):
    """The job was stopped while it ran (cancelled, paused, or the runner is stopping); no output was
    written. `reason` is what `cancelled()` returned; `step` how many steps were done."""

    def __init__(self, message: str, reason: str = "cancelled", step: int = 0):
        super().__init__(message)
        self.reason = reason
        self.step = step


def run(job: Job, pool: Pool, progress: bool = True, on_frames=None, on_progress=None, cancelled=None,
        checkpoint: Checkpointer | None = None, provenance: Provenance | None = None) -> RenderResult:
    """Render a prepared job on a pool. Writes the MP4 (and preview) atomically.

    Optional hooks: `on_frames(first_index, frames)` sees every decoded uint8 chunk in order;
    `on_progress(dict)` gets {phase, step, steps, window_steps_done, window_steps_total, frames_done, frames,
    eta_s} after every window prediction (phase "denoise") and decoded chunk ("decode"), and once more when
    the MP4 is written ("done", the final numbers). `step` counts the steps completed (what a checkpoint
    saves: 0 while the first step's windows run); `window_steps_*` count window predictions (windows x
    steps, those taken from a checkpoint included); `eta_s` is measured on the work computed in this run.
    `cancelled()` is polled as often, and at least every WAIT_S seconds while the job waits on its workers
    (not after "done"); a truthy value (a reason such as "cancelled" or "paused") stops the job with
    `Cancelled` (no output left behind).
    `checkpoint`: resume from its newest valid checkpoint, save one every k steps and after the last
    step, and one of the current step when stopped (so a paused job loses at most one step), unless the
    reason is in DISCARD (a cancelled job's checkpoints are deleted; a job whose lease was lost is another
    runner's now).
    `provenance`: who produced the video and the key of its AIGC metadata (default: `Provenance.local()`,
    the CLI's key); the new frames carry an invisible watermark naming the job (`watermark.py`), and the
    visible label is the request's (`job.label`), drawn on the frames written and the preview; `on_frames`
    sees the frames as generated, without either."""
    t0 = time.perf_counter()
    provenance = provenance or Provenance.local()
    req, plan = job.request, job.windows
    latent_frames = job.latent_frames

    timings = {}
    sampler = None  # (made in step 2)

    def stop_check(phase: str) -> None:
        """Raise Cancelled when `cancelled()` says stop; a paused (not discarded) job saves the coherent step."""
        reason = cancelled() if cancelled is not None else None
        if not reason:
            return
        reason = reason if isinstance(reason, str) else "cancelled"
        step_now = sampler.coherent_step if sampler is not None else 0  # every range has reached it
        if checkpoint is not None and phase == "denoise" and sampler is not None and step_now > first_step \
                and reason not in DISCARD:
            checkpoint.save(step_now, *sampler.state(step_now))
            logger.info("stopped (%s) at step %d of %d; checkpoint saved", reason, step_now, steps)
        raise Cancelled(f"job {reason} during {phase}", reason, step_now)

    def tick() -> None:  # while the job waits on its workers
        stop_check("denoise" if sampler is not None and not sampler.done else "prepare")

    scheduler = load_scheduler(job.model.path)
    scheduler.set_timesteps(job.steps)
    steps = len(scheduler.timesteps)  # job.steps (PNDM: one more, its warm-up), as diffusers' pipelines iterate
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # as the pipelines do: step i is timesteps[i]
    if checkpoint is not None:
        scheduler_state(scheduler)  # state a checkpoint could not store fails now, before any work

    # 1. conditioning: the key prompts once, with the per-latent-frame schedule; the backend's object, unread
    schedule = prompt_schedule(job.clip_keys, latent_frames, req.fps / job.model.layout.temporal, loop=job.loop)
    first_step = 0
    encoded = pool.encode([k.prompt for k in job.keys], req.negative_prompt, schedule, tick=tick)
    if job.control is not None:  # the pose frames travel with the conditioning: once per worker
        encoded.control, encoded.control_scale = torch.from_numpy(job.control), job.control_scale
    if job.media:  # a reference photo and its videos (Wan-Animate; an IP-Adapter's image prompt) travel the same
        # way, with the mode, the seed
        # and a hash of them all (what a worker keys the conditioning it derives from them by)
        key = hashlib.sha256(req.animate_mode.encode())
        for name, a in sorted(job.media.items()) + ([("pose", job.control)] if job.control is not None else []):
            key.update(name.encode() + np.ascontiguousarray(a).tobytes())
        encoded.media = {**{name: torch.from_numpy(a) for name, a in job.media.items()},
                         "mode": req.animate_mode, "seed": req.seed, "key": key.hexdigest()}
    cond = pool.put(encoded)

    # 2. initial latents from (seed, frame)
    z = initial_noise(req.seed, latent_frames, job.latent_shape, job.noise, job.window, job.overlap)  # (1, C, F, h, w)
    z = z * getattr(scheduler, "init_noise_sigma", 1.0)
    weights = window_weights(plan, req.weighting, latent_frames if job.loop else 0)
    pin = _known_latents(job, pool, tick)  # None without known frames
    resumed = checkpoint.load_latest() if checkpoint is not None else None
    if resumed is not None:
        z, first_step = resumed.z, resumed.step
        logger.info("resumed from checkpoint %s: %d of %d steps done", resumed.path.name, first_step, job.steps)
    else:
        x0 = None  # what the first steps are skipped for (SDEdit-style): the input video, or a bridge's crossfade
        if job.inputs.strength < 1 and job.inputs.source is not None:
            x0, mode = _source_latents(job, pool, tick), "video to video"
        elif job.inputs.strength < 1 and pin is not None:  # a bridge (inputs.py)
            x0, mode = pin.crossfade(z), "bridge"
        if x0 is not None:
            first_step = job.steps - int(job.steps * job.inputs.strength)  # as diffusers' img2img pipelines
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(first_step)
            if first_step == job.steps:
                first_step = steps  # strength 0: x0 itself, no step
            z = x0 if first_step == steps else _noised(scheduler, x0, z / getattr(scheduler, "init_noise_sigma", 1.0),
                                                       scheduler.timesteps[first_step:first_step + 1])
            logger.info("%s: strength %g, %d of %d steps", mode, job.inputs.strength, steps - first_step, steps)
        if pin is not None:
            pin(z)
    private = None  # each window's private frames (a family's own state through the steps: sampler.py)
    if job.model.options.get("private_frames"):
        count = job.model.options["private_frames"]
        if resumed is not None:
            private = list(resumed.private.split(1, 0))
        else:
            sigma = getattr(scheduler, "init_noise_sigma", 1.0)
            private = [private_noise(req.seed, w, count, job.latent_shape) * sigma for w in range(len(plan))]
    sampler = Sampler(z, scheduler, plan, weights, steps, first_step, req.seed, loop=job.loop,
                      schedule=req.schedule, pin=pin, snapshots=checkpoint is not None,
                      restore=resumed.schedulers if resumed is not None else None, private=private)

    total = steps * len(plan)
    started = time.perf_counter()
    timings["encode_s"] = started - t0

    def progress_dict(phase: str, window_steps_done: int, frames_done: int, eta_s) -> dict:
        return {"phase": phase, "step": sampler.coherent_step, "steps": steps,
                "window_steps_done": window_steps_done, "window_steps_total": total, "frames_done": frames_done,
                "frames": job.output_frames, "eta_s": eta_s}

    def report(phase: str, window_steps_done: int, frames_done: int = 0) -> None:
        stop_check(phase)
        if on_progress is not None:
            elapsed = time.perf_counter() - started
            done = window_steps_done - first_step * len(plan)  # computed in this run (not from a checkpoint)
            eta = elapsed / done * (total - window_steps_done) if done > 0 and phase == "denoise" else None
            on_progress(progress_dict(phase, window_steps_done, frames_done, None if eta is None else round(eta, 1)))

    # 3. denoise: a window runs its next step as soon as its frames are there (the sampler says when), its
    # prediction is fused and stepped per frame range as it arrives
    bar = _bar(total, "denoise", "win", progress, initial=first_step * len(plan))  # the rate counts computed work
    done = first_step * len(plan)
    running: dict[int, int] = {}  # ticket -> window
    saved_at = first_step
    driver_t0 = time.thread_time()  # the driver's own CPU time: submitting, receiving, fusing, stepping
    try:
        while not sampler.done:
            for w in sampler.ready():
                x, t = sampler.window_input(w)
                s, e = plan[w]
                step = sampler.next_step[w]
                ticket = pool.submit("predict", (x, t, cond, s, e, job.guidances), key=(step, w),
                                     label=f"window {w + 1} of {len(plan)} at step {step + 1} of {steps}")
                running[ticket] = w
            finished = pool.poll(WAIT_S)
            if not finished:
                if not pool.outstanding:
                    raise RuntimeError(f"the pool returned nothing with {len(running)} windows running")
                stop_check("denoise")  # a window is still running: is the job to stop meanwhile?
                continue
            for ticket, pred in finished:
                sampler.add(running.pop(ticket), pred)
                done += 1
                bar.update()
            bar.set_postfix_str(f"step {sampler.coherent_step}/{steps}, {len(plan)} windows, {sampler.schedule}")
            stop_check("denoise")  # before a checkpoint: a cancelled or deleted job writes nothing more
            if checkpoint is not None and sampler.coherent_step > saved_at:
                saved_at = sampler.coherent_step
                if checkpoint.due(saved_at, steps):
                    checkpoint.save(saved_at, *sampler.state(saved_at))
            report("denoise", done)
    finally:
        if running:  # stopped early: cancelled, or a window failed
            pool.cancel(list(running))
    z = sampler.z
    timings["fuse_s"], timings["scheduler_s"] = sampler.fuse_s, sampler.scheduler_s
    timings["driver_s"] = time.thread_time() - driver_t0
    bar.close()
    decode_start = time.perf_counter()
    timings["denoise_s"] = decode_start - started

    # 4. decode on the workers; frames stream in order into ffmpeg, the frame rule's surplus dropped at the end
    if job.model.streamed_decode:  # causal 3D VAE: one session, latent frame after latent frame
        decoded = pool.stream("decode_stream", (z, DECODE_CHUNK), tick=lambda: stop_check("decode"))
    else:  # a per-frame VAE: window-length chunks, any worker
        chunks = [(s, min(s + job.window, latent_frames)) for s in range(0, latent_frames, job.window)]
        decoded = pool.imap("decode", [(z[:, :, s:e].clone(),) for s, e in chunks], tick=lambda: stop_check("decode"))
    sampled = set(preview_indices(job.output_frames)) if req.preview else set()
    previews: list[tuple[int, np.ndarray]] = []
    bar = _bar(job.output_frames, "decode", "frame", progress)
    inputs = job.inputs
    keep = (inputs.ctx_before, inputs.ctx_before + job.new_frames)  # the new frames, in the denoised clip
    generated = hashlib.sha256()  # frames_sha256: the frames before the watermark and the label
    produce_id = provenance.produce_id_for(req.model_dump(mode="json"))
    marker = Embedder(payload_of(produce_id), job.width, job.height)  # the new frames' invisible watermark
    # the visible label: on the first seconds of the new frames, wherever they are in the file (after an
    # extended clip's), or on every frame
    first_new = inputs.before.frames if inputs.before is not None else 0
    span = labelled_span(req.label, req.fps, first_new, job.new_frames, job.output_frames) \
        if job.label is not None else (0, 0)
    label_info = {"mode": req.label, "text": req.label_text, "position": req.label_position, "frames": span}

    def tags(stream_sha256: str) -> dict[str, str]:
        return provenance.tags(request=req.model_dump(mode="json"), frames_sha256=generated.hexdigest(),
                               delivered_sha256=writer.sha256, stream_sha256=stream_sha256, label=label_info)

    sign = (lambda src, dst: provenance.sign(src, dst, Path(req.out).name)) if provenance.c2pa else None
    try:
        with VideoWriter(req.out, job.width, job.height, req.fps, tags=tags, sign=sign) as writer:
            def emit(frames: np.ndarray, new: bool = True) -> None:  # (n, H, W, 3), the output's next frames
                first = writer.frames_written
                generated.update(np.ascontiguousarray(frames))
                if on_frames is not None:
                    on_frames(first, frames)
                lo, hi = max(span[0] - first, 0), min(span[1] - first, len(frames))
                if hi > lo:  # the label first: the watermark is then measured on what is written
                    frames = frames.copy()
                    job.label.draw(frames[lo:hi])
                if new:  # frames made here (an input clip's frames keep whatever mark they carry)
                    frames = marker.mark(frames)
                writer.write(frames)
                previews.extend((first + k, frames[k].copy()) for k in range(len(frames)) if first + k in sampled)
                bar.update(len(frames))
                report("decode", total, writer.frames_written)

            if inputs.before is not None:  # extend: the input's frames, as read, then the new ones
                for frames in video_chunks("extend", inputs.before.path, req.fps, job.width, job.height):
                    emit(frames, new=False)
            done = 0  # frames of the denoised clip decoded so far
            for frames in decoded:  # (n, H, W, 3)
                lo, hi = max(keep[0] - done, 0), min(keep[1] - done, len(frames))
                done += len(frames)
                if hi > lo:
                    emit(frames[lo:hi])
                if done >= keep[1]:
                    break  # only a context already read, or the frame rule's surplus, is left
            if inputs.after is not None:  # lead_into: its frames close the output
                for frames in video_chunks("lead_into", inputs.after.path, req.fps, job.width, job.height):
                    emit(frames, new=False)
    finally:
        decoded.close()  # stops a stream still decoding (the surplus, or after an error or a stop)
    bar.close()
    if req.preview:
        contact_sheet(previews, req.preview)
    timings["decode_s"] = time.perf_counter() - decode_start
    if on_progress is not None:  # the final numbers, whatever a caller's throttling dropped before
        on_progress(progress_dict("done", total, writer.frames_written, 0.0))
    # the windows as planned (a short clip's one window is the clip), in output frames
    longest = min(job.model.layout.frames(max(e - s for s, e in plan)), job.frames)
    shared = min((a[1] - b[0] for a, b in zip(plan, plan[1:])), default=0)  # what every two neighbours share

    return RenderResult(
        out=req.out,
        frames=writer.frames_written,
        fps=req.fps,
        seconds=req.seconds if req.seconds is not None else round(job.new_frames / req.fps, 4),
        width=job.width,
        height=job.height,
        window=longest,
        overlap=shared * job.model.layout.temporal,
        windows=len(plan),
        workers=pool.num_workers,
        steps=job.steps,
        model_evaluations=steps * len(plan),
        wall_s=round(time.perf_counter() - t0, 3),
        frames_sha256=generated.hexdigest(),
        delivered_sha256=writer.sha256,
        produce_id=produce_id,
        label=req.label,
        labelled_frames=span[1] - span[0],
        model=req.model,
        seed=req.seed,
        weighting=req.weighting,
        noise=job.noise,
        schedule=sampler.schedule,
        preview=req.preview,
        input_frames=job.inputs.passthrough,
        loop=job.loop,
        driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        resumed_from_step=resumed.step if resumed is not None else 0,
        checkpoints_saved=len(checkpoint.saved) if checkpoint is not None else 0,
        checkpoint_s=round(sum(checkpoint.saved), 3) if checkpoint is not None else 0.0,
        timings={k: round(v, 4) for k, v in timings.items()},
    )
