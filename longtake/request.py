"""The render request: one typed, validated object at the edge of longtake.

Every field has a default and a docstring. Invalid input raises `RequestError`, whose message
names the field, the value it got and what was expected, e.g.
`seconds: got -1.0, expected a number > 0`. Nothing here touches Ray or a model.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longtake.core import NOISE_MODES, SCHEDULES, WEIGHTINGS  # the core's names (torch-free), the request's choices

DEVICES = ("auto", "cpu", "cuda")
PLAN_MODES = ("auto", "none")  # a motion plan where the model has a planner and the job allows it (models/planner.py)
RETARGET_MODES = ("reference", "none")  # the driving skeleton onto the reference pose, or as drawn (longtake.pose)
ANIMATE_MODES = ("animate", "replace")  # Wan-Animate: the character in a new clip, or redrawn into a background
MAX_CONTROL_SCALE = 5.0
# the visible label (longtake.label, which imports no torch either, holds them with the font)
from longtake.label import DEFAULT_POSITION as LABEL_POSITION  # noqa: E402
from longtake.label import DEFAULT_TEXT as LABEL_TEXT  # noqa: E402
from longtake.label import MAX_TEXT as LABEL_MAX_TEXT  # noqa: E402
from longtake.label import MODES as LABEL_MODES  # noqa: E402
from longtake.label import POSITIONS as LABEL_POSITIONS  # noqa: E402
from longtake.label import LabelError, check_text  # noqa: E402

# accepted spellings of a field besides its name: {alias: field}
ALIASES = {"negative": "negative_prompt"}

MAX_SECONDS = 3600.0
DEFAULT_SECONDS = 10.0
DEFAULT_STRENGTH = 0.6  # video to video: how much of the input is redrawn
DEFAULT_BRIDGE_STRENGTH = 0.9  # a bridge: how much of the crossfade between its two contexts is redrawn
PLANNED_BRIDGE_STRENGTH = 0.7  # ... when a motion plan draws where the object goes (less of the look redrawn)
MAX_FPS = 120.0
MAX_FRAMES = 100_000
SIDE_RANGE = (8, 4096)  # height and width, pixels (a model's own rules come on top)
STEPS_RANGE = (1, 1000)
MAX_GUIDANCE = 50.0
MAX_WORKERS = 1024
MAX_CP = 8  # the largest context-parallel group: one node's GPUs (attention collectives want NVLink, not a network)
CP_MODES = ("auto", "ulysses", "ring")  # how a group attends across its workers (pipelines/parallel.py)
MAX_SEED = 2**63 - 1
MAX_CONTEXT_SECONDS = 60.0


# every single-field rule above as JSON Schema keywords: the served OpenAPI schema documents these (and a
# server's tighter limits); tests/test_request.py checks each bound against the validators
FIELD_BOUNDS = {
    "prompt": {"pattern": r"\S"},
    "negative_prompt": {},
    "seconds": {"exclusiveMinimum": 0, "maximum": MAX_SECONDS},
    "fps": {"exclusiveMinimum": 0, "maximum": MAX_FPS},
    "height": {"minimum": SIDE_RANGE[0], "maximum": SIDE_RANGE[1]},
    "width": {"minimum": SIDE_RANGE[0], "maximum": SIDE_RANGE[1]},
    "steps": {"minimum": STEPS_RANGE[0], "maximum": STEPS_RANGE[1]},
    "guidance": {"exclusiveMinimum": 0, "maximum": MAX_GUIDANCE},
    "guidance_2": {"exclusiveMinimum": 0, "maximum": MAX_GUIDANCE},
    "seed": {"minimum": 0, "maximum": MAX_SEED},
    "window": {"minimum": 1},
    "overlap": {"minimum": 0},
    "workers": {"minimum": 1, "maximum": MAX_WORKERS},
    "cp": {"minimum": 1, "maximum": MAX_CP},
    "strength": {"minimum": 0, "maximum": 1},
    "context": {"exclusiveMinimum": 0, "maximum": MAX_CONTEXT_SECONDS},
    "label_text": {"pattern": "^[^\n]*\\S[^\n]*$", "maxLength": LABEL_MAX_TEXT},
    "control_scale": {"exclusiveMinimum": 0, "maximum": MAX_CONTROL_SCALE},
}


class RequestError(ValueError):
    """Bad user input: names the field, the value and what was expected."""

    def __init__(self, field: str, value: Any, expected: str):
        self.field, self.value, self.expected = field, value, expected
        super().__init__(f"{field}: got {value!r}, expected {expected}")


def check_cp(value: int) -> int:
    """A context-parallel group's size (a request's `cp`, a server's `--cp`). Raises RequestError naming cp."""
    if not 1 <= value <= MAX_CP:
        raise RequestError("cp", value, f"an integer from 1 to {MAX_CP} (a group's workers share one node)")
    return value


class TimelineKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: float = Field(description="Time in seconds at which this prompt is fully reached.")
    prompt: str = Field(description="Text prompt at this time.")


class Keyframe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="An image file (over HTTP: a file id from POST /v1/files).")
    at: float = Field(description="Time in seconds, in the new frames, at which the image is pinned.")


# the request fields that name media files, and the kind of file each takes: paths on the CLI, the Python
# API and the farm; file ids over HTTP (keyframes: the `image` of each)
MEDIA_KINDS = {"image": "image", "keyframes": "image", "extend": "video", "lead_into": "video", "video": "video",
               "pose": "video", "reference": "image", "face": "video", "background": "video", "mask": "video"}
MEDIA_FIELDS = tuple(MEDIA_KINDS)


class RenderRequest(BaseModel):
    """What to render. Fields left as None take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="Text prompt for the whole clip (or give a timeline).")
    timeline: list[TimelineKey] | None = Field(
        None, description="Prompt keys [{at: seconds, prompt: text}], interpolated per frame."
    )
    negative_prompt: str = Field("", validation_alias=AliasChoices("negative_prompt", "negative"),
                                 description="Negative prompt for classifier-free guidance ('negative' is accepted "
                                 "as an alias).")
    seconds: float | None = Field(None, description=f"Clip length in seconds (default {DEFAULT_SECONDS:g}; with a "
                                  "video: the video's length).")
    fps: float = Field(8.0, description="Frames per second of the output.")
    height: int | None = Field(None, description="Output height in pixels (multiple of the model's factor).")
    width: int | None = Field(None, description="Output width in pixels (multiple of the model's factor).")
    steps: int | None = Field(None, description="Denoising steps.")
    guidance: float | None = Field(None, description="Classifier-free guidance scale (1 = off).")
    guidance_2: float | None = Field(None, description="Guidance of the low-noise expert of a two-expert model "
                                     "(Wan 2.2 A14B) (default: guidance).")
    seed: int = Field(0, description="Random seed; the same seed gives the same frames.")
    window: int | None = Field(None, description="Window length in the model's latent frames (frames for AnimateDiff; "
                               "Wan: 21 = 81 frames) (default: the model's native length).")
    overlap: int | None = Field(None, description="Latent frames shared by consecutive windows (default: window // 4).")
    weighting: Literal[WEIGHTINGS] = Field(
        "pyramid", description="Taper used to fuse overlapping window predictions."
    )
    schedule: Literal[SCHEDULES] = Field(
        "wavefront", description="When a window runs its next step: as soon as its neighbours have finished "
        "this one (wavefront), or after every window has (barrier, the reference). Same frames either way.",
    )
    noise: Literal[NOISE_MODES] | None = Field(
        None, description="Initial noise: independent per frame, FreeNoise-style shuffled windows, or correlated "
        "across frames (AR(1), rho 0.9) (default: the model's, else independent).",
    )
    workers: int | None = Field(None, description="Worker count (default: one per GPU, else one per CPU core).")
    cp: int = Field(1, description="Workers that predict one window together (context parallelism: each holds "
                    "1/cp of the window's tokens; Wan families). Windows are dealt to groups of cp workers, so "
                    "`workers` is a multiple of it.")
    cp_mode: Literal[CP_MODES] = Field("auto", description="How a group attends across its workers: ulysses (the "
                                       "heads divide by cp), ring (any cp), or auto (ulysses when the heads allow).")
    model: str = Field("default", description="A diffusers model directory (AnimateDiff or Wan), 'default' (the "
                       "bundled model), 'tiny', 'tiny-pose' (with a pose ControlNet), 'tiny-pose-ip' (and an "
                       "IP-Adapter), 'tiny-wan' or 'tiny-wan-animate'.")
    device: Literal[DEVICES] = Field("auto", description="Where workers run.")
    image: str | None = Field(None, description="An image the clip starts from: pinned at frame 0 (a path; over "
                              "HTTP a file id from POST /v1/files).")
    keyframes: list[Keyframe] | None = Field(None, description="Images pinned at times [{image, at: seconds}].")
    extend: str | None = Field(None, description="A video to continue: the output is this video, then `seconds` "
                               "new seconds conditioned on its last `context` seconds.")
    lead_into: str | None = Field(None, description="A video to lead into: the output ends with it, the new frames "
                                  "conditioned on its first `context` seconds (with extend: a bridge).")
    include_inputs: bool = Field(True, description="With extend / lead_into: the output holds their frames around "
                                 "the new ones (true), or only the new frames (false: a story's shots).")
    context: float | None = Field(None, description="Seconds of extend / lead_into that condition the new frames "
                                  f"(default: one window, or all of a shorter input; at most {MAX_CONTEXT_SECONDS:g}).")
    video: str | None = Field(None, description="A video to redraw (video to video, SDEdit-style): the output has "
                              "its frames (resampled to fps, scaled and centre-cropped to the output size), each "
                              "noised to `strength` and denoised with the prompt.")
    strength: float | None = Field(None, description=f"With a video: how much is redrawn, from 0 (the input back) to 1 "
                                   f"(text to video, the input only sets the length) (default {DEFAULT_STRENGTH:g}). "
                                   "With a bridge (extend and lead_into): how much of the crossfade between the two "
                                   "contexts the new frames start from is redrawn, from 0 (the crossfade) to 1 "
                                   f"(from noise alone) (default {DEFAULT_BRIDGE_STRENGTH:g}; "
                                   f"{PLANNED_BRIDGE_STRENGTH:g} where the bundled model's motion plan draws the "
                                   "bridge).")
    loop: bool = Field(False, description="A seamless loop: the windows wrap around the clip's end, so its last "
                       "frame flows into its first.")
    pose: str | None = Field(None, description="A pose sequence that drives the motion: a video of skeleton frames "
                             "(as OpenPose or DWPose tools draw them) or an OpenPose keypoint JSON file (BODY_25 or "
                             "COCO-18, hands and face optional) drawn at the output size; resampled to fps (over HTTP: "
                             "a video's file id). Needs a model with a pose ControlNet, or a Wan-Animate model.")
    pose_loop: bool = Field(False, description="Repeat a pose sequence (and Wan-Animate's face, background and "
                            "mask videos) shorter than the clip (else it is an error).")
    reference: str | None = Field(None, description="The look the pose animates: a photo pinned at frame 0, as "
                                  "`image` is; for a Wan-Animate model the character photo it animates (required; "
                                  "fitted inside the output size and padded with black, not pinned) (over HTTP: a "
                                  "file id).")
    face: str | None = Field(None, description="For Wan-Animate: a video of the performer's face (crops, one per "
                             "frame) that drives the expression, read at fps and scaled to the model's face size "
                             "(512 px); without it the model sees a blank face (its unguided input) and the "
                             "expression is its own (over HTTP: a file id).")
    animate_mode: Literal[ANIMATE_MODES] = Field("animate", description="For Wan-Animate: animate the reference in a "
                                                 "new clip (animate), or replace the figure in `background` where "
                                                 "`mask` is white by the reference (replace; both videos required).")
    background: str | None = Field(None, description="With animate_mode replace: the video the character is redrawn "
                                   "into, as long as the clip (over HTTP: a file id).")
    mask: str | None = Field(None, description="With animate_mode replace: a video, white where the character is "
                             "redrawn, black where the background stays (over HTTP: a file id).")
    reference_pose: str | None = Field(None, description="The reference figure's pose: a keypoint JSON file (one "
                                       "frame, on the photo's canvas); the driving skeleton is retargeted onto it "
                                       "(CLI and farm; not over HTTP).")
    retarget: Literal[RETARGET_MODES] = Field("reference", description="With reference_pose: scale and move the "
                                              "driving skeleton to the reference figure's height and place "
                                              "(reference), or draw it as given (none).")
    control_scale: float | None = Field(None, description="How strongly the pose (or the motion plan) conditions "
                                        "the frames (the ControlNet's conditioning scale; default 1).")
    plan: Literal[PLAN_MODES] = Field("auto", description="The bundled model's motion plan: a silhouette path that "
                                      "moves as the prompt says (a shape and a motion word), or, around known "
                                      "frames (image, keyframes, extend, lead_into), on from the object they show, "
                                      "which its control branch makes the object follow (auto); or the model "
                                      "moves the object itself (none). Other models have no planner.")
    label: Literal[LABEL_MODES] = Field(
        "start", description="The visible 'AI-generated' label: on the first 2 seconds (start), on every frame "
        "(always), or none (recorded in the file's metadata; a server may refuse it).",
    )
    label_text: str = Field(LABEL_TEXT, description="The label's text (one line, up to 40 characters; any script "
                            "of Unicode's Basic Multilingual Plane, e.g. 'AI生成').")
    label_position: Literal[LABEL_POSITIONS] = Field(LABEL_POSITION, description="The frame corner the label sits "
                                                     "in.")
    out: str = Field("longtake.mp4", description="Output MP4 path.")
    preview: str | None = Field(None, description="Optional contact-sheet PNG path.")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for alias, name in ALIASES.items():
                if alias in data and name in data:
                    raise RequestError(name, data[name], f"either {name} or its alias {alias}, not both "
                                                         f"(got {alias}={data[alias]!r} too)")
        return data

    @field_validator("seconds")
    @classmethod
    def _seconds(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0 or v > MAX_SECONDS):
            raise RequestError("seconds", v, f"a number > 0 and <= {MAX_SECONDS:g}")
        return v

    @field_validator("fps")
    @classmethod
    def _fps(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0 or v > MAX_FPS:
            raise RequestError("fps", v, f"a number > 0 and <= {MAX_FPS:g}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int | None, info) -> int | None:
        if v is not None and not SIDE_RANGE[0] <= v <= SIDE_RANGE[1]:
            raise RequestError(info.field_name, v, f"an integer from {SIDE_RANGE[0]} to {SIDE_RANGE[1]}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        if v is not None and not STEPS_RANGE[0] <= v <= STEPS_RANGE[1]:
            raise RequestError("steps", v, f"an integer from {STEPS_RANGE[0]} to {STEPS_RANGE[1]}")
        return v

    @field_validator("guidance", "guidance_2")
    @classmethod
    def _guidance(cls, v: float | None, info) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0 or v > MAX_GUIDANCE):
            raise RequestError(info.field_name, v, f"a number > 0 and <= {MAX_GUIDANCE:g} (1 turns guidance off)")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v <= MAX_SEED:
            raise RequestError("seed", v, "an integer from 0 to 2**63 - 1")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise RequestError("window", v, "an integer >= 1")
        return v

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise RequestError("overlap", v, "an integer >= 0")
        return v

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_WORKERS:
            raise RequestError("workers", v, f"an integer from 1 to {MAX_WORKERS}")
        return v

    @field_validator("cp")
    @classmethod
    def _cp(cls, v: int) -> int:
        return check_cp(v)

    @field_validator("label_text")
    @classmethod
    def _label_text(cls, v: str) -> str:
        try:
            return check_text(v)
        except LabelError as e:
            raise RequestError(e.field, e.value, e.expected) from None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise RequestError("prompt", v, "a non-empty prompt")
        return v

    @field_validator("strength")
    @classmethod
    def _strength(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or not 0 <= v <= 1):
            raise RequestError("strength", v, "a number from 0 (keep the video or crossfade) to 1 (redraw it all)")
        return v

    @field_validator("image", "extend", "lead_into", "video", "pose", "reference", "reference_pose", "face",
                     "background", "mask")
    @classmethod
    def _media(cls, v: str | None, info) -> str | None:
        if v is not None and not v.strip():
            raise RequestError(info.field_name, v, "a file path (or, over HTTP, a file id)")
        return v

    @field_validator("control_scale")
    @classmethod
    def _control_scale(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or not 0 < v <= MAX_CONTROL_SCALE):
            raise RequestError("control_scale", v, f"a number > 0 and <= {MAX_CONTROL_SCALE:g}")
        return v

    @field_validator("context")
    @classmethod
    def _context(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or not 0 < v <= MAX_CONTEXT_SECONDS):
            raise RequestError("context", v, f"a number of seconds > 0 and <= {MAX_CONTEXT_SECONDS:g}")
        return v

    @model_validator(mode="after")
    def _whole(self) -> "RenderRequest":
        if (self.prompt is None) == (self.timeline is None):
            raise RequestError("prompt", self.prompt, "exactly one of a prompt or a timeline")
        frames = self.num_frames
        if frames < 1 or frames > MAX_FRAMES:
            raise RequestError("seconds", self.length, f"seconds * fps to give 1 to {MAX_FRAMES} frames (got {frames})")
        if self.window is not None and self.overlap is not None and self.overlap >= self.window:
            raise RequestError("overlap", self.overlap, f"0 <= overlap < window ({self.window})")
        if self.timeline is not None:
            _check_timeline(self.timeline, self.length)
        if self.loop and (self.extend is not None or self.lead_into is not None):
            raise RequestError("loop", self.loop, "no loop with extend or lead_into (a loop has no ends to join)")
        if self.strength is not None and self.video is None and (self.extend is None or self.lead_into is None):
            raise RequestError("strength", self.strength, "no value without video or a bridge (extend and lead_into "
                                                          "together): it is how much of them is redrawn")
        if self.video is not None and (self.extend is not None or self.lead_into is not None):
            field = "extend" if self.extend is not None else "lead_into"
            raise RequestError(field, getattr(self, field), "no value with video (redraw a video, or continue one)")
        if self.workers is not None and self.workers % self.cp:
            raise RequestError("workers", self.workers, f"a multiple of cp ({self.cp}): windows go to groups of "
                                                        f"{self.cp} workers")
        if not self.include_inputs and self.extend is None and self.lead_into is None:
            raise RequestError("include_inputs", self.include_inputs, "true without extend or lead_into (it says "
                                                                      "whether their frames are in the output)")
        if self.context is not None and self.extend is None and self.lead_into is None:
            raise RequestError("context", self.context, "no value without extend or lead_into (it is their context)")
        self._check_pose()
        for i, key in enumerate(self.keyframes or []):
            if not math.isfinite(key.at) or key.at < 0 or (key.at >= self.length and self.video is None):
                raise RequestError(f"keyframes[{i}].at", key.at, f"a time from 0 to below seconds ({self.length:g})")
            if not key.image.strip():
                raise RequestError(f"keyframes[{i}].image", key.image, "a file path (or, over HTTP, a file id)")
        _check_writable("out", self.out, ".mp4")
        if self.preview is not None:
            _check_writable("preview", self.preview, ".png")
        return self

    def _check_pose(self) -> None:
        """The pose fields: what needs a pose, and what a pose-driven clip cannot be combined with."""
        if self.animate_mode == "replace":
            for name in ("background", "mask"):
                if getattr(self, name) is None:
                    raise RequestError(name, None, f"a {name} video with animate_mode replace (the character is "
                                                   "redrawn into the background where the mask is white)")
        else:
            for name in ("background", "mask"):
                if getattr(self, name) is not None:
                    raise RequestError(name, getattr(self, name), "no value without animate_mode replace")
        if self.pose is None:
            for name in ("pose_loop", "reference_pose", "face"):
                value = getattr(self, name)
                if value not in (None, False):
                    raise RequestError(name, value, "no value without pose (it is about the pose sequence)")
            if self.control_scale is not None and self.plan == "none":
                raise RequestError("control_scale", self.control_scale, "no value without pose or a motion plan "
                                                                        "(plan none)")
        else:
            for name in ("extend", "lead_into", "video", "loop"):
                value = getattr(self, name)
                if value not in (None, False):
                    raise RequestError(name, value, "no value with pose (a pose-driven clip is made from its first "
                                                    "frame to its last)")
        if self.reference is not None and self.image is not None:
            raise RequestError("reference", self.reference, "no value with image (give one: both start the clip "
                                                            "from a photo)")

    @property
    def length(self) -> float:
        """Seconds asked for, else the default (a video's own length is known only when it is opened)."""
        return self.seconds if self.seconds is not None else DEFAULT_SECONDS

    @property
    def num_frames(self) -> int:
        return round(self.length * self.fps)


def _check_timeline(keys: list[TimelineKey], seconds: float) -> None:
    if not keys:
        raise RequestError("timeline", [], "at least one {at, prompt} key")
    for i, key in enumerate(keys):
        if not math.isfinite(key.at) or not 0 <= key.at < seconds:
            raise RequestError(f"timeline[{i}].at", key.at, f"a time from 0 to below seconds ({seconds:g})")
        if not key.prompt.strip():
            raise RequestError(f"timeline[{i}].prompt", key.prompt, "a non-empty prompt")
        if i and key.at <= keys[i - 1].at:
            raise RequestError(
                f"timeline[{i}].at", key.at, f"a time after timeline[{i - 1}].at ({keys[i - 1].at:g}); keys sorted, no duplicates"
            )


def _check_writable(field: str, path: str, suffix: str) -> None:
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise RequestError(field, path, f"a path ending in {suffix}")
    if p.is_dir():
        raise RequestError(field, path, "a file path, not a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise RequestError(field, path, f"a path in an existing directory ({parent} does not exist)")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise RequestError(field, path, "a writable location")


def load_timeline(path: str) -> tuple[list[dict], str | None]:
    """Read a timeline file (YAML or JSON): a list of {at, prompt}, or a mapping with
    `timeline:` (that list) and an optional `negative_prompt:`. Returns (keys, negative_prompt)."""
    p = Path(path)
    if not p.is_file():
        raise RequestError("timeline", path, "an existing YAML or JSON file")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RequestError("timeline", path, f"valid YAML or JSON ({str(e).splitlines()[0]})") from None
    negative = None
    if isinstance(data, dict):
        negative = data.get("negative_prompt")
        unknown = set(data) - {"timeline", "negative_prompt"}
        if unknown:
            raise RequestError("timeline", sorted(unknown), "only the keys 'timeline' and 'negative_prompt'")
        data = data.get("timeline")
    if not isinstance(data, list) or not data:
        raise RequestError("timeline", path, "a non-empty list of {at: seconds, prompt: text}")
    for i, key in enumerate(data):
        if not isinstance(key, dict) or set(key) != {"at", "prompt"}:
            raise RequestError(f"timeline[{i}]", key, "a mapping with exactly 'at' and 'prompt'")
    return data, negative


def parse_request(data: dict | RenderRequest) -> RenderRequest:
    """Validate a dict into a RenderRequest, turning pydantic's errors into one RequestError."""
    if isinstance(data, RenderRequest):
        return data
    try:
        return RenderRequest.model_validate(data)
    except ValidationError as e:
        raise _to_request_error(e) from None


def _to_request_error(e: ValidationError) -> RequestError:
    errors = e.errors()
    err = errors[0]
    if err["type"] == "missing":  # a misspelt field is the likelier cause of a missing one: name that
        err = next((x for x in errors if x["type"] == "extra_forbidden"), err)
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, RequestError):
        return cause
    field = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in err["loc"]).replace(".[", "[") or "request"
    kind = err["type"]
    if kind == "extra_forbidden":
        return RequestError(field, err.get("input"), f"no such field ({_suggest(err['loc'])})")
    if kind == "literal_error":
        return RequestError(field, err.get("input"), f"one of {err['ctx']['expected']}")
    if kind == "missing":
        return RequestError(field, None, "a value (required)")
    return RequestError(field, err.get("input"), err["msg"][0].lower() + err["msg"][1:])


def _suggest(loc: tuple) -> str:
    """For an unknown field: the closest known field name, else where the fields are listed."""
    known = None
    if len(loc) == 1:
        known = list(RenderRequest.model_fields) + list(ALIASES)
    elif len(loc) == 3 and loc[0] == "timeline":
        known = list(TimelineKey.model_fields)
    elif len(loc) == 3 and loc[0] == "keyframes":
        known = list(Keyframe.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known or [], n=1)
    if close:
        return f"did you mean {ALIASES.get(close[0], close[0])!r}?"
    return "see `longtake render --help`" if len(loc) == 1 else f"the fields are {', '.join(known or [])}"
