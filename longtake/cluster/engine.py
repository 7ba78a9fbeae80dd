"""The engine: a request becomes one MP4, rendered by overlapping windows fused at every step.

    prepare(request)  -> Job        validate against the model's configs and the video writer's size rule,
                                    open and check the media inputs (`inputs.py`), draw a pose sequence
                                    into skeleton frames (`longtake/pose.py`) (the bundled model without
                                    one: its motion plan, `models/planner.py`), read a Wan-Animate model's
                                    reference photo, face, background and mask (an IP-Adapter model's:
                                    its reference photo, the image prompt); no Ray, no weights
    run(job, pool)    -> RenderResult, in four numbered steps, each a function below:
        1. `conditioning`: the key prompts encoded once (one encoder) with the per-latent-frame schedule
           and a reference photo, put once (`pool.put`: each worker fetches it once and keeps it by its
           hash until the job ends); the per-frame conditioning (a pose's or a plan's control frames, a
           Wan-Animate model's face, background and mask) stays here: each window's prediction carries its
           own slice of it (`window_conditioning`)
        2. `initial_latents`: noise from (seed, latent frame index), the known frames' latents (encoded once,
           `inputs.known_latents`) pinned in it; video to video and a bridge start from their input noised
           to `strength`, the first steps skipped; or the newest valid checkpoint
        3. `denoise` (`sampler.py`): a window predicts its next step alone as soon as the frames it covers
           have reached that step (the wavefront; `schedule="barrier"`: when every frame has); each frame
           range is fused in window order and stepped by its own scheduler when all its windows have
           predicted, then its known frames are set to their latents (clean context); a loop's windows wrap
           around the end; a checkpoint of the coherent step (the newest every range has reached) every k
           steps
        4. `deliver`: decoded on the workers (window-length chunks, or one ordered streamed session for a
           causal 3D VAE), the frames stream in order through the sink chain (`delivery.py`: frames_sha256,
           the label on the first seconds of the new frames, the watermark on the new frames, the MP4 with
           its AIGC metadata and integrity code, the contact sheet): an extended clip's frames (passed
           through as read), the new frames (the frame rule's surplus, Wan's 4k+1, dropped), a lead-into
           clip's frames
        `Watch` holds the stop checks (cancelled, paused, shutdown: at least every second, even while the
        workers hang) and the progress reports: {phase, step (steps completed), steps, window_steps_done,
        window_steps_total, frames_done, frames, eta_s} per window and decoded chunk, then once with phase
        "done" and the final numbers

Frame counts (one name each):
    new_frames       frames made: round(seconds * fps), or a redrawn video's length
    frames           frames denoised: the new frames and the contexts of extend / lead_into around them
    latent_frames    the latent frames they are in (a causal VAE packs 4 frames in one: 1 + (frames - 1) / 4)
    rendered_frames  frames the latents decode to: `frames`, or a few more for a frame rule (dropped)
    output_frames    frames in the MP4: the new frames and the input clips passed through

The engine is family-blind: geometry comes from the model's `LatentLayout`, conditioning is the backend's
(the engine passes it along unread). The pool (tickets: `submit` / `poll` / `cancel`) is an in-process
worker (reference), Ray actors or serve's denoisers; all give identical frames, with either schedule.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from longtake.actors.pool import WAIT_S, Pool
from longtake.actors.worker import WindowConditioning
from longtake.cluster.checkpoint import Checkpointer, CheckpointState, scheduler_state
from longtake.cluster.delivery import Delivery
from longtake.cluster.inputs import (Inputs, KnownLatents, clip_frames, known_latents, reference_image, resolve_inputs,
                                     source_latents)
from longtake.cluster.sampler import THREADS, Sampler
from longtake.pipelines import ModelInfo, inspect_model, load_scheduler
from longtake.core.frames import as_indexed, update_digest
from longtake.core.windows import (
    PromptKey,
    conditioning_frames,
    initial_noise,
    plan_loop,
    plan_windows,
    private_noise,
    prompt_schedule,
    window_weights,
)
from longtake.request import PLANNED_BRIDGE_STRENGTH, RenderRequest, RequestError, parse_request
from longtake.label import Layout, LabelError
from longtake.label import layout as layout_label
from longtake.media import load_image, probe_media, video_chunks
from longtake.models import planner
from longtake.pose import pose_frames, reference_person
from longtake.provenance import Provenance

logger = logging.getLogger(__name__)

DISCARD = ("cancelled", "lost")  # stop reasons after which no checkpoint is saved
SAMPLER_THREADS = THREADS  # threads for the range steps on the driver (sampler.py)
COLLECT_S = 0.002  # how long the loop waits for a range step when the pool has nothing back
QUEUED_PER_WORKER = 2  # window inputs built ahead per worker (the pool's depth): the rest wait in the sampler, unbuilt
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
    controlled: bool = False  # it has control frames (drawn, or, prepared without pixels, to be drawn)
    control_scale: float = 1.0
    # a model animating a reference photo (Wan-Animate): reference (H, W, 3), face (frames, S, S, 3), background
    # (frames, H, W, 3), mask (frames, H, W) uint8; the reference travels with the job's conditioning, the
    # others (PER_FRAME) as each window's own slice, as the pose does
    media: dict = field(default_factory=dict, repr=False, compare=False)
    cp_mode: str = ""  # a group of request.cp workers per window: how it attends ('ulysses' or 'ring'; '': cp 1)

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
    cp: int = 1  # workers per window (a context-parallel group); `workers` counts every member
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
    height, width, window, overlap = _geometry(request, model)
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
    label = _label(request, width, height)
    keys = [PromptKey(k.at, k.prompt) for k in request.timeline] if request.timeline is not None \
        else [PromptKey(0.0, request.prompt)]
    media = _animation_media(request, model, frames, width, height, pixels)  # animating a reference: checked first
    if model.options.get("ip_adapter"):  # an IP-Adapter's image prompt: the reference photo (pinned at frame 0 too)
        media = _image_prompt(request)
    control, controlled = _control(request, model, inputs, keys, frames, width, height, pixels)
    if controlled and inputs.before is not None and inputs.after is not None and request.strength is None:
        # the plan says where the object goes, so more of the crossfade (its look) is kept
        inputs = replace(inputs, strength=PLANNED_BRIDGE_STRENGTH,
                         hashes={**inputs.hashes, "bridge": PLANNED_BRIDGE_STRENGTH})
    windows = (plan_loop if request.loop else plan_windows)(latent_frames, window, overlap)
    cp_mode = _context_parallel(request, model, sorted({e - s for s, e in windows}), height, width)
    return Job(request=request, model=model, frames=frames, height=height, width=width,
               steps=request.steps or model.default_steps, guidance=guidance,
               guidance_2=request.guidance_2 if request.guidance_2 is not None else guidance, window=window,
               overlap=overlap, windows=windows,
               keys=keys, noise=request.noise or model.default_noise, inputs=inputs, loop=request.loop,
               label=label, control=control, controlled=controlled,
               control_scale=request.control_scale if request.control_scale is not None else 1.0, media=media,
               cp_mode=cp_mode)


def _geometry(request: RenderRequest, model: ModelInfo) -> tuple[int, int, int, int]:
    """(height, width, window, overlap) of a request on its model (the model's defaults for what it leaves
    out), checked against the model's size rule and temporal limit."""
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
    return height, width, window, overlap


def _context_parallel(request: RenderRequest, model: ModelInfo, lengths: list[int], height: int, width: int) -> str:
    """The group's way of attending (pipelines/parallel.py): 'ulysses' or 'ring' ('' for cp 1). Raises
    RequestError naming cp or cp_mode when the model cannot shard its windows (of these lengths) so."""
    if request.cp == 1:
        return ""
    from longtake.pipelines.parallel import check_family, check_frames, check_tokens, resolve_mode, window_tokens

    check_family(model, request.cp)
    mode = resolve_mode(request.cp_mode, request.cp, model.cp_heads)
    private = model.options.get("private_frames", 0)  # carried through the transformer with the window's own
    whole_frames = model.options.get("cp_whole_frames", False)
    for length in lengths:
        if whole_frames:
            check_frames(length + private, request.cp, length)
        check_tokens(window_tokens(length + private, height, width, model.layout.spatial, model.patch), request.cp,
                     length)
    return mode


def _label(request: RenderRequest, width: int, height: int) -> Layout | None:
    """The visible label's layout (None: label "none"); RequestError when its text does not fit the frame."""
    if request.label == "none":
        return None
    try:
        return layout_label(request.label_text, request.label_position, width, height)
    except LabelError as e:
        raise RequestError(e.field, e.value, e.expected) from None


def _control(request: RenderRequest, model: ModelInfo, inputs: Inputs, keys: list[PromptKey], frames: int,
             width: int, height: int, pixels: bool) -> tuple[np.ndarray | None, bool]:
    """(control frames, whether there are: without pixels, whether there would be): a pose's skeleton
    frames, checked and drawn before any work; else the bundled model's motion plan (not for a video redrawn
    below strength 1: its frames say where things are). control_scale without either is refused."""
    control, controlled = None, False
    if request.pose is not None:
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
    elif request.plan == "auto" and model.options.get("planner") and not inputs.redraws:
        if pixels:
            control = planner.plan(clip_keys(keys, inputs.ctx_before, request.fps), frames, request.fps, width,
                                   height, request.seed, request.loop,
                                   tuple((p.frame, p.pixels) for p in inputs.pinned))  # None: nothing to plan from
            controlled = control is not None
        else:  # known frames may show no object: only their pixels tell (the run checks again)
            controlled = planner.plannable(keys, request.loop, bool(inputs.pinned))
    control = as_indexed(control)  # drawn frames travel as palette indices (core/frames.py)
    if not controlled and request.control_scale is not None:
        raise RequestError("control_scale", request.control_scale,
                           "no value without pose or a motion plan (the bundled model's, for prompts that name a "
                           "shape and a motion, or known frames that show the object)")
    return control, controlled


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


def _noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 noised to timestep t's level as the scheduler defines it (add_noise; flow matching: scale_noise)."""
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(x0, noise, t)
    return scheduler.scale_noise(x0, t, noise)


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
    scheduler, steps = job_scheduler(job, checkpoint)
    watch = Watch(job, steps, cancelled, on_progress, checkpoint)
    timings: dict[str, float] = {}

    # 1. conditioning: the key prompts encoded once, with the per-latent-frame schedule and a reference
    #    photo (the backend's object, unread here), put once for the workers to fetch and keep
    cond = pool.put(conditioning(job, pool, watch.tick))
    try:
        # 2. initial latents from (seed, latent frame), the known frames' latents pinned in them; video to
        #    video and a bridge start part way (SDEdit-style); or a checkpoint's latents and scheduler states
        start, sampler = begin(job, pool, scheduler, steps, watch, checkpoint)
        timings["encode_s"] = time.perf_counter() - t0
        # 3. denoise: each window predicts its next step as soon as its frames are there (the sampler's
        #    wavefront), its prediction fused and stepped per frame range as it arrives; checkpoints
        denoise(job, pool, cond, sampler, watch, checkpoint, progress, timings)
        # 4. deliver: decoded on the workers, the frames stream in order through the sink chain into the MP4
        #    (the sampler's scheduler states let go first, and their memory given back: only the latents are
        #    decoded)
        z = sampler.release()
        trim_heap()
        delivery = deliver(job, pool, z, watch, provenance, on_frames, progress, timings)
    finally:
        _release(pool, cond)
    watch.report("done", watch.total, delivery.frames_written, eta_s=0.0)  # the final numbers, unthrottled
    return _result(job, pool, sampler, start, delivery, checkpoint, timings, time.perf_counter() - t0)


def trim_heap() -> None:
    """Give the memory the process freed back to the system (glibc keeps a freed heap for reuse: after a
    studio-size denoising, gigabytes the decode never uses). Linux with glibc only; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to give back this way
        pass


def _release(pool: Pool, cond) -> None:
    """The workers drop the job's conditioning: advice, which never fails the job nor hides why it stopped."""
    try:
        pool.release(cond)
    except Exception as e:
        logger.warning("could not tell the workers to drop the job's conditioning: %s: %s", type(e).__name__, e)


class Watch:
    """A job's stop checks and progress reports. `stop(phase)` raises Cancelled when `cancelled()` says
    stop (a paused job first saves the coherent step, unless the reason is in DISCARD); `tick()` is that
    check while the job waits on its workers; `report(...)` checks, then tells `on_progress`."""

    def __init__(self, job: Job, steps: int, cancelled, on_progress, checkpoint: Checkpointer | None):
        self.job, self.steps, self.cancelled, self.on_progress, self.checkpoint = (job, steps, cancelled,
                                                                                   on_progress, checkpoint)
        self.total = steps * len(job.windows)  # window predictions of the whole job
        self.sampler, self.first_step, self.started, self.pool = None, 0, time.perf_counter(), None

    def begin(self, sampler: Sampler, first_step: int, pool: Pool | None = None) -> None:
        """The denoising starts: steps before `first_step` were not computed here (a checkpoint's); `pool`:
        whose workers the progress shows."""
        self.sampler, self.first_step, self.started = sampler, first_step, time.perf_counter()
        self.pool = pool

    def tick(self) -> None:
        self.stop("denoise" if self.sampler is not None and not self.sampler.done else "prepare")

    def stop(self, phase: str) -> None:
        reason = self.cancelled() if self.cancelled is not None else None
        if not reason:
            return
        reason = reason if isinstance(reason, str) else "cancelled"
        step = self.sampler.coherent_step if self.sampler is not None else 0  # every range has reached it
        if self.checkpoint is not None and phase == "denoise" and step > self.first_step and reason not in DISCARD:
            self.checkpoint.save(step, *self.sampler.state(step))
            logger.info("stopped (%s) at step %d of %d; checkpoint saved", reason, step, self.steps)
        raise Cancelled(f"job {reason} during {phase}", reason, step)

    def report(self, phase: str, window_steps_done: int, frames_done: int = 0, eta_s: float | None = None) -> None:
        if phase != "done":
            self.stop(phase)
        if self.on_progress is None:
            return
        computed = window_steps_done - self.first_step * len(self.job.windows)  # here, not from a checkpoint
        if phase == "denoise" and computed > 0:
            eta_s = round((time.perf_counter() - self.started) / computed * (self.total - window_steps_done), 1)
        progress = {"phase": phase, "step": self.sampler.coherent_step, "steps": self.steps,
                    "window_steps_done": window_steps_done, "window_steps_total": self.total,
                    "frames_done": frames_done, "frames": self.job.output_frames, "eta_s": eta_s,
                    # the window x step grid: each window's steps predicted, the windows predicting now
                    "windows": list(self.sampler.next_step),
                    "running": [w for w, sent in enumerate(self.sampler.dispatched) if sent]}
        workers = getattr(self.pool, "workers", None)  # (a pool that knows its workers: pool.WorkerBook)
        if workers is not None:
            progress["workers"] = workers()
        self.on_progress(progress)


def job_scheduler(job: Job, checkpoint: Checkpointer | None):
    """The model's scheduler set for the job's steps, and how many it iterates (PNDM: one more, its warm-up,
    as diffusers' pipelines iterate). With a checkpointer, a state no checkpoint could store fails now."""
    scheduler = load_scheduler(job.model.path)
    scheduler.set_timesteps(job.steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # as the pipelines do: step i is timesteps[i]
    if checkpoint is not None:
        scheduler_state(scheduler)
    return scheduler, len(scheduler.timesteps)


def conditioning(job: Job, pool: Pool, tick=None):
    """1. The job's conditioning, encoded once (one encoder): the key prompts with the per-latent-frame
    schedule, then attached, for the workers to take each window's own range of: a pose's (or a plan's)
    control frames and scale; a Wan-Animate model's media (or an IP-Adapter's image prompt) with the mode,
    the seed and a hash of them all (what a worker keys what it derives from them by)."""
    req, layout = job.request, job.model.layout
    schedule = prompt_schedule(job.clip_keys, job.latent_frames, req.fps / layout.temporal, loop=job.loop)
    encoded = pool.encode([k.prompt for k in job.keys], req.negative_prompt, schedule, tick=tick)
    if job.control is not None:
        encoded.control_scale = job.control_scale
    if job.media:
        key = hashlib.sha256(req.animate_mode.encode())
        for name, a in sorted(job.media.items()) + ([("pose", job.control)] if job.control is not None else []):
            key.update(name.encode())
            update_digest(key, a)
        encoded.media = {**{name: torch.from_numpy(a) for name, a in job.media.items() if name not in PER_FRAME},
                         "mode": req.animate_mode, "seed": req.seed, "key": key.hexdigest()}
    return encoded


PER_FRAME = ("face", "background", "mask")  # media with a frame per output frame (Wan-Animate's): sliced per window


def window_conditioning(job: Job, cond, start: int, end: int) -> WindowConditioning:
    """What a window's prediction carries: the job's conditioning (held by the workers) and its own frames
    of each per-frame clip (`conditioning_frames`: a view when they are consecutive, no copy)."""
    clips = {"control": job.control} if job.control is not None else {}
    clips.update((name, a) for name, a in job.media.items() if name in PER_FRAME)
    frames = {}
    for name, a in clips.items():
        index = conditioning_frames(start, end, len(a), job.model.layout.temporal)
        consecutive = index == list(range(index[0], index[0] + len(index)))
        frames[name] = a[index[0]:index[0] + len(index)] if consecutive else a[index]
    return WindowConditioning(cond, frames)


@dataclass
class Start:
    """Where the denoising starts: the latents, the first step to compute, the known frames' latents, each
    window's private frames (a family's own state: sampler.py), and the checkpoint resumed from, if any."""

    z: torch.Tensor  # (1, C, latent_frames, h, w)
    first_step: int = 0
    pin: KnownLatents | None = None
    private: list[torch.Tensor] | None = None
    resumed: CheckpointState | None = None


def begin(job: Job, pool: Pool, scheduler, steps: int, watch: Watch,
          checkpoint: Checkpointer | None) -> tuple["Start", Sampler]:
    """2. Where the denoising starts (`initial_latents`) and the sampler that runs it from there."""
    start = initial_latents(job, pool, scheduler, steps, checkpoint, watch.tick)
    weights = window_weights(job.windows, job.request.weighting, job.latent_frames if job.loop else 0)
    sampler = Sampler(start.z, scheduler, job.windows, weights, steps, start.first_step, job.request.seed,
                      loop=job.loop, schedule=job.request.schedule, pin=start.pin,
                      snapshots=checkpoint is not None, private=start.private,
                      restore=start.resumed.schedulers if start.resumed is not None else None,
                      threads=SAMPLER_THREADS)
    start.z = None  # the sampler holds its own copy, per frame range
    watch.begin(sampler, start.first_step, pool)
    return start, sampler


def initial_latents(job: Job, pool: Pool, scheduler, steps: int, checkpoint: Checkpointer | None,
                    tick=None) -> Start:
    """2. The initial latents: noise from (seed, latent frame) (`initial_noise`), or the newest valid
    checkpoint's latents; without one, video to video (the input's latents) and a bridge (its contexts'
    crossfade) are noised to the level of the last `strength` of the schedule and the first steps skipped,
    as diffusers' img2img pipelines do; the known frames are then set to their latents."""
    req = job.request
    sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    z = initial_noise(req.seed, job.latent_frames, job.latent_shape, job.noise, job.window, job.overlap)  # (1, C, F, h, w)
    start = Start(z * sigma, pin=known_latents(job, pool, tick))  # pin: None without known frames
    start.resumed = checkpoint.load_latest() if checkpoint is not None else None
    if start.resumed is not None:
        start.z, start.first_step = start.resumed.z, start.resumed.step
        logger.info("resumed from checkpoint %s: %d of %d steps done", start.resumed.path.name, start.first_step,
                    job.steps)
    else:
        _skip_to_strength(job, pool, scheduler, steps, start, tick)
        if start.pin is not None:
            start.pin(start.z)
    if job.model.options.get("private_frames"):
        count = job.model.options["private_frames"]
        if start.resumed is not None:
            start.private = list(start.resumed.private.split(1, 0))
        else:
            start.private = [private_noise(req.seed, w, count, job.latent_shape) * sigma
                             for w in range(len(job.windows))]
    return start


def _skip_to_strength(job: Job, pool: Pool, scheduler, steps: int, start: Start, tick=None) -> None:
    """Video to video, or a bridge: `start.z` becomes x0 (the input's latents, or the contexts' crossfade)
    noised to the first of the last `strength` of the steps, and `start.first_step` that step."""
    inputs = job.inputs
    if inputs.strength >= 1:
        return
    if inputs.source is not None:
        x0, mode = source_latents(job, pool, tick), "video to video"
    elif start.pin is not None:  # a bridge (inputs.py)
        x0, mode = start.pin.crossfade(start.z), "bridge"
    else:
        return
    first = job.steps - int(job.steps * inputs.strength)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first)
    if first == job.steps:
        first = steps  # strength 0: x0 itself, no step
    sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    start.z = x0 if first == steps else _noised(scheduler, x0, start.z / sigma, scheduler.timesteps[first:first + 1])
    start.first_step = first
    logger.info("%s: strength %g, %d of %d steps", mode, inputs.strength, steps - first, steps)


def denoise(job: Job, pool: Pool, cond, sampler: Sampler, watch: Watch, checkpoint: Checkpointer | None,
            progress: bool, timings: dict) -> None:
    """3. The denoising loop: the windows the sampler says are ready go to the pool (the lowest step first,
    QUEUED_PER_WORKER per worker at most), their predictions are fused and stepped as they come back
    (`sampler.add`, on the sampler's threads: the loop collects those steps between the pool's results,
    `sampler.collect`); a checkpoint of the newest
    coherent step every k steps (after a stop check: a cancelled or deleted job writes nothing more). Windows
    still running when it stops are cancelled."""
    plan, steps = job.windows, watch.steps
    window_steps_done = watch.first_step * len(plan)
    bar = _bar(watch.total, "denoise", "win", progress, initial=window_steps_done)  # the rate: computed work
    running: dict[int, int] = {}  # ticket -> window
    saved_at = watch.first_step
    driver_t0 = time.thread_time()  # the driver's own CPU time: submitting, receiving, fusing, stepping
    try:
        while not sampler.done:
            # only as many windows as the workers can start next: a ready window's input (19 MB at Wan 720p) is
            # built when it is submitted, so a long clip's step-0 windows do not all wait in the pool at once
            room = QUEUED_PER_WORKER * max(1, pool.num_workers) - pool.outstanding
            for w in sampler.ready(max(0, room)):
                x, t = sampler.window_input(w)
                step = sampler.next_step[w]
                ticket = pool.submit("predict", (x, t, window_conditioning(job, cond, *plan[w]), *plan[w],
                                                 job.guidances), key=(step, w),
                                     label=f"window {w + 1} of {len(plan)} at step {step + 1} of {steps}")
                running[ticket] = w
            # while range steps run on the sampler's threads, the pool is only looked at: their windows may be
            # the next to run
            finished = pool.poll(0.0 if sampler.advancing else WAIT_S)
            if not finished and not pool.outstanding and not sampler.advancing:
                raise RuntimeError(f"the pool returned nothing with {len(running)} windows running")
            for ticket, pred in finished:
                sampler.add(running.pop(ticket), pred)
            collected = sampler.collect(0.0 if finished or not sampler.advancing else COLLECT_S)
            window_steps_done += len(finished)
            bar.update(len(finished))
            bar.set_postfix_str(f"step {sampler.coherent_step}/{steps}, {len(plan)} windows, {sampler.schedule}")
            watch.stop("denoise")  # (also while a window is still running and nothing came back)
            if checkpoint is not None and sampler.coherent_step > saved_at:
                saved_at = sampler.coherent_step
                if checkpoint.due(saved_at, steps):
                    checkpoint.save(saved_at, *sampler.state(saved_at))
            if finished or collected:  # (a step collected: the coherent step may have advanced)
                watch.report("denoise", window_steps_done)
    finally:
        sampler.close()
        if running:  # stopped early: cancelled, or a window failed
            pool.cancel(list(running))
    bar.close()
    timings.update(fuse_s=sampler.fuse_s, scheduler_s=sampler.scheduler_s, driver_s=time.thread_time() - driver_t0,
                   denoise_s=time.perf_counter() - watch.started)


def deliver(job: Job, pool: Pool, z: torch.Tensor, watch: Watch, provenance: Provenance, on_frames,
            progress: bool, timings: dict) -> Delivery:
    """4. Decode on the workers, deliver in order: an extended clip's frames as read, the new frames (the
    denoised clip without its contexts; the frame rule's surplus, e.g. Wan's 4k+1, dropped at the end), a
    lead-into clip's frames; each chunk through the sink chain (delivery.py) into the MP4. The decode stream
    is closed however it ends (the surplus, an error, a stop)."""
    t0, req, inputs = time.perf_counter(), job.request, job.inputs
    stop = lambda: watch.stop("decode")  # noqa: E731
    if job.model.streamed_decode:  # causal 3D VAE: one session, latent frame after latent frame
        decoded = pool.stream("decode_stream", (z, DECODE_CHUNK), tick=stop)
    else:  # a per-frame VAE: window-length chunks, any worker
        chunks = [(s, min(s + job.window, job.latent_frames)) for s in range(0, job.latent_frames, job.window)]
        decoded = pool.imap("decode", ((z[:, :, s:e].clone(),) for s, e in chunks), tick=stop)  # (cut as sent)
    bar = _bar(job.output_frames, "decode", "frame", progress)
    keep = (inputs.ctx_before, inputs.ctx_before + job.new_frames)  # the new frames, in the denoised clip
    try:
        with Delivery(job, provenance, on_frames) as delivery:
            def send(frames: np.ndarray, new: bool) -> None:  # (n, H, W, 3) uint8
                delivery.write(frames, new)
                bar.update(len(frames))
                watch.report("decode", watch.total, delivery.frames_written)

            if inputs.before is not None and inputs.include:  # extend: the input's frames, as read
                for frames in video_chunks("extend", inputs.before.path, req.fps, job.width, job.height):
                    send(frames, new=False)
            decoded_frames = 0  # frames of the denoised clip decoded so far
            for frames in decoded:  # (n, H, W, 3)
                lo, hi = max(keep[0] - decoded_frames, 0), min(keep[1] - decoded_frames, len(frames))
                decoded_frames += len(frames)
                if hi > lo:
                    send(frames[lo:hi], new=True)
                if decoded_frames >= keep[1]:
                    break  # only a context already read, or the frame rule's surplus, is left
            if inputs.after is not None and inputs.include:  # lead_into: its frames close the output
                for frames in video_chunks("lead_into", inputs.after.path, req.fps, job.width, job.height):
                    send(frames, new=False)
    finally:
        decoded.close()
    bar.close()
    timings["decode_s"] = time.perf_counter() - t0
    return delivery


def _result(job: Job, pool: Pool, sampler: Sampler, start: Start, delivery: Delivery,
            checkpoint: Checkpointer | None, timings: dict, wall_s: float) -> RenderResult:
    """The render's summary. `window` and `overlap` are the windows as planned (a short clip's one window is
    the clip), in output frames."""
    req, plan, layout = job.request, job.windows, job.model.layout
    longest = min(layout.frames(max(e - s for s, e in plan)), job.frames)
    shared = min((a[1] - b[0] for a, b in zip(plan, plan[1:])), default=0)  # what every two neighbours share
    saved = checkpoint.saved if checkpoint is not None else []
    return RenderResult(
        out=req.out, frames=delivery.frames_written, fps=req.fps,
        seconds=req.seconds if req.seconds is not None else round(job.new_frames / req.fps, 4),
        width=job.width, height=job.height, window=longest, overlap=shared * layout.temporal, windows=len(plan),
        workers=pool.num_workers * req.cp, cp=req.cp, steps=job.steps, model_evaluations=sampler.steps * len(plan),
        wall_s=round(wall_s, 3), frames_sha256=delivery.frames_sha256, delivered_sha256=delivery.delivered_sha256,
        produce_id=delivery.produce_id, label=req.label, labelled_frames=delivery.labelled, model=req.model,
        seed=req.seed, weighting=req.weighting, noise=job.noise, schedule=sampler.schedule, preview=req.preview,
        input_frames=job.inputs.passthrough, loop=job.loop,
        driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        resumed_from_step=start.resumed.step if start.resumed is not None else 0,
        checkpoints_saved=len(saved), checkpoint_s=round(sum(saved), 3),
        timings={k: round(v, 4) for k, v in timings.items()})
