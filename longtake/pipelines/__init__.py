"""Model backends behind one small interface: one module per family. Only torch and diffusers here, never Ray.

May import: torch, diffusers, transformers, the pure core (`longtake.core`) and the request's RequestError.
Never the engine, the executors, the bundled model's planner (the engine reaches it through the model's
`options["planner"]`), HTTP or Ray.

The registry maps a diffusers directory's `model_index.json` `_class_name` to its family module, imported
lazily (as vLLM registers its models); adding a family (LTX-Video, CogVideoX...) is one new file and one
line in FAMILIES. A family module has:

    required_weights(index) -> components      the folders that must hold safetensors weights
    inspect(path, index, model) -> ModelInfo     the model's facts from its JSON configs (no weights)
    Backend(info, device, dtype, roles)          what a worker keeps; loads only what its roles use

A Backend (roles: "encode", "predict", "decode"):

    encode(prompts, negative_prompt, schedule) -> cond
        once per job, on one worker: the key prompts' embeddings plus the per-latent-frame schedule
        (`core.windows.prompt_schedule`), as an object the engine never reads (CPU tensors, picklable)
    predict(z, t, cond, window, guidance) -> model output
        one window: z (1, C, L, h, w) float32, `window` = (start, end) latent frames; the backend takes
        the window's own conditioning from `cond` (per-frame embeddings for a UNet with motion modules,
        one embedding per window for a DiT) and applies classifier-free guidance, `guidance` holding one
        scale per expert (ModelInfo.experts). Float32 on the CPU. A family with private frames
        (`options["private_frames"]` = p: state of its own carried through the steps, as Wan-Animate's
        reference slot) gets them first, z (1, C, p + L, h, w), and returns p + L frames likewise; the
        engine steps them per window, never fused (cluster/sampler.py).
    encode_frames(frames) -> latents           known frames (n, H, W, 3) uint8 -> (1, C, n', h, w): the
                                               inverse of decode (image, keyframes, extend, video to video)
    decode(z) -> (n, H, W, 3) uint8            families with `streamed_decode=False`: any chunk alone
    decode_stream(z, chunk) -> iterator        families with `streamed_decode=True` (causal 3D VAEs):
                                               one session on one worker, in order, `chunk` latent frames
                                               at a time; frames equal one whole-clip decode

The engine computes no geometry: it asks the model's `LatentLayout` (latent frames for F frames, frames for
n latent frames, the size multiple, the latent shape). The scheduler is the one the directory names; the
engine steps it on the fused prediction. `ModelInfo.cuda_dtype` is the family's weight dtype on GPUs
(latents stay float32).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longtake.request import RequestError

# The oldest diffusers longtake runs on: the first release whose from_pretrained takes `dtype=` (older ones
# ignore it and load float32 weights, which then meet float16 inputs on a GPU). Keep in step with
# pyproject.toml; tests/test_floor.py renders with exactly this release.
DIFFUSERS_FLOOR = "0.40.0"

# model_index.json `_class_name` -> family module (imported when a model of that family is used)
FAMILIES = {
    "AnimateDiffPipeline": "longtake.pipelines.animatediff",
    "AnimateDiffControlNetPipeline": "longtake.pipelines.animatediff",  # with a pose ControlNet
    "WanPipeline": "longtake.pipelines.wan",
    "WanAnimatePipeline": "longtake.pipelines.wan_animate",  # Wan 2.2 Animate: a reference photo, a pose
    "LongtakeSimPipeline": "longtake.pipelines.sim",  # a real model's sizes with simulated time (sim:PRESET)
}
ROLES = ("encode", "predict", "decode")
SIM_PREFIX = "sim:"  # --model sim:PRESET: a simulated model at a real model's sizes (sim.py)


@dataclass(frozen=True)
class LatentLayout:
    """How frames and pixels map to the model's latents."""

    channels: int
    spatial: int  # pixels per latent pixel (the VAE's spatial factor)
    size_multiple: int  # the model's own rule: height and width are multiples of this (VAE factor x patch size)
    size_reason: str  # why, for error messages
    temporal: int = 1  # frames per latent frame
    causal: bool = False  # a causal 3D VAE: the first latent frame is one frame (the 4k+1 rule)

    def latent_frames(self, frames: int) -> int:
        """Latent frames needed for at least `frames` output frames."""
        if self.causal:
            return math.ceil((frames - 1) / self.temporal) + 1
        return math.ceil(frames / self.temporal)

    def frames(self, latent_frames: int) -> int:
        """Output frames decoded from `latent_frames` latent frames."""
        if self.causal:
            return self.temporal * (latent_frames - 1) + 1
        return self.temporal * latent_frames

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.channels, height // self.spatial, width // self.spatial)  # (C, h, w)

    @property
    def pixel_multiple(self) -> int:
        """What height and width must be multiples of: the model's own multiple, made even for the video
        writer (its rule, `longtake.video.valid_frame_side`, is the one source of both)."""
        from longtake.video import FRAME_SIDE_MULTIPLE

        return math.lcm(self.size_multiple, FRAME_SIDE_MULTIPLE)

    def check_size(self, name: str, value: int) -> None:
        """Every rule an output side must meet, the model's and the video writer's: checked before any work
        (a size the writer refuses would otherwise fail only after the whole denoise). Raises RequestError."""
        from longtake.video import FRAME_SIDE_REASON, valid_frame_side

        if valid_frame_side(value, self.size_multiple):
            return
        multiple = self.pixel_multiple
        if multiple == self.size_multiple:
            reason = self.size_reason
        elif self.size_multiple == 1:
            reason = FRAME_SIDE_REASON
        else:
            reason = f"{self.size_multiple} for {self.size_reason}, and {FRAME_SIDE_REASON}"
        positive = "" if isinstance(value, int) and value > 0 else "positive "
        raise RequestError(name, value, f"a {positive}multiple of {multiple} ({reason})")


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a model, read from its configs."""

    path: str
    family: str
    layout: LatentLayout
    native_window: int  # latent frames per window the model was made for
    max_window: int  # longest window (latent frames) the model's temporal layers accept
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    default_noise: str = "independent"  # initial-noise mode when the request names none
    cuda_dtype: str = "float16"  # weight dtype on GPUs (latents stay float32)
    streamed_decode: bool = False  # causal 3D VAE: one ordered decode session (decode_stream), not chunks
    separate_encoder: bool = False  # the text encoder is large: encode on one encoder worker, predictors skip it
    experts: int = 1  # denoisers that share the steps by noise level (Wan 2.2 A14B: 2), one guidance scale each
    # context parallelism (pipelines/parallel.py): the transformer's attention heads when the family shards a
    # window over a group of workers (0: it does not, cp 1 only), and its patch size (frames, rows, columns)
    cp_heads: int = 0
    patch: tuple[int, int, int] = (1, 1, 1)
    options: dict = field(default_factory=dict)  # family-specific facts the backend reads (JSON values)

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


def resolve_model_path(model: str) -> str:
    """'default' -> the bundled trained model; 'tiny' / 'tiny-wan' -> random-weight tiny models built once
    into the cache (for quick checks); 'sim:PRESET' -> a simulated model at a real model's sizes
    (pipelines/sim.py), written once into the cache; anything else is a path."""
    from longtake.pipelines.tiny import TINY_MODELS, cache_dir, ensure_tiny_model

    if model.startswith(SIM_PREFIX):
        from longtake.pipelines.sim import ensure_sim_model

        return str(ensure_sim_model(model, cache_dir()))

    if model == "default":
        if not (DEFAULT_MODEL / "model_index.json").is_file():
            raise RequestError("model", model, f"the bundled model in {DEFAULT_MODEL} (missing: rebuild it with "
                                               f"python -m longtake.tools.train_default --out {DEFAULT_MODEL})")
        return str(DEFAULT_MODEL)
    return str(ensure_tiny_model(model)) if model in TINY_MODELS else model


def family_module(class_name: str, model: str):
    name = FAMILIES.get(class_name)
    if name is None:
        raise RequestError("model", model, f"a supported family ({', '.join(FAMILIES)}), not {class_name!r}")
    return importlib.import_module(name)


def inspect_model(model: str) -> ModelInfo:
    from longtake.pipelines.tiny import TINY_MODELS

    path = Path(resolve_model_path(model))
    if not path.is_dir():
        names = ", ".join(repr(name) for name in ("default", *TINY_MODELS, f"{SIM_PREFIX}PRESET"))
        raise RequestError("model", model, f"an existing diffusers model directory, or one of {names}")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise RequestError("model", model, "a diffusers model directory with a model_index.json")
    index = read_json(index_file, model)
    module = family_module(index.get("_class_name"), model)
    for component in module.required_weights(index):
        if not any((path / component).glob("*.safetensors")):
            raise RequestError("model", model, f"safetensors weights in {component}/ (only .safetensors is loaded)")
    return module.inspect(path, index, model)


def read_json(file: Path, model: str) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RequestError("model", model, f"readable JSON in {file.name} ({e})") from None


def read_options(path: Path, model: str) -> dict:
    """The optional longtake.json beside model_index.json: this model's defaults and flags."""
    return read_json(path / "longtake.json", model) if (path / "longtake.json").is_file() else {}


def noise_mode(mode, model: str) -> str:
    from longtake.core import NOISE_MODES

    if mode not in NOISE_MODES:
        raise RequestError("model", model, f"a longtake.json whose default_noise is one of {', '.join(NOISE_MODES)} "
                                           f"(got {mode!r})")
    return mode


_IMPORT_LOCK = threading.Lock()


def check_diffusers():
    """The installed diffusers, imported; ImportError naming the floor if it is older (it would load weights in
    float32 whatever dtype is asked).

    Thread-safe: diffusers' lazy module, imported by two threads at once (two serve jobs starting), can hand
    one of them a module without its attributes yet; the first import happens under a lock."""
    with _IMPORT_LOCK:
        import diffusers

        diffusers.SchedulerMixin  # resolve the lazy attributes while no other thread imports

    def release(version: str) -> tuple[int, ...]:  # "0.43.0.dev0" -> (0, 43, 0)
        return tuple(int(part) for part in re.findall(r"\d+", version)[:3])

    if release(diffusers.__version__) < release(DIFFUSERS_FLOOR):
        raise ImportError(f"longtake needs diffusers>={DIFFUSERS_FLOOR} (older releases ignore from_pretrained's "
                          f"dtype=); found diffusers {diffusers.__version__} in {Path(diffusers.__file__).parent}: "
                          f"pip install 'diffusers>={DIFFUSERS_FLOOR}'")
    return diffusers


WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")  # weights, configs, tokenizer vocabularies


def weights_identity(model_path: str) -> str:
    """A cheap identity of a model directory's files (no contents read): SHA-256 over the relative path, size
    and modification time of every weights, config and tokenizer file (hidden ones left out). Rewriting or
    touching any of them changes it."""
    root = Path(model_path)
    entries = []
    for directory, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not name.endswith(WEIGHT_SUFFIXES):
                continue
            file = Path(directory) / name
            st = file.stat()
            entries.append((file.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def load_backend(model_path: str, device: str = "cpu", dtype: str = "float32", roles=ROLES, cp=None):
    """Build the backend for a model directory (already inspected), loading only what `roles` use; `cp`
    (cp, mode), a family that shards its windows over this worker's group (pipelines/parallel.py)."""
    info = inspect_model(model_path)
    module = importlib.import_module(FAMILIES_BY_NAME[info.family])
    if getattr(module, "USES_DIFFUSERS", True):  # the simulated family's workers never import it (seconds saved)
        check_diffusers()
    if cp is not None:
        return module.Backend(info, device=device, dtype=dtype, roles=tuple(roles), cp=cp)
    return module.Backend(info, device=device, dtype=dtype, roles=tuple(roles))


FAMILIES_BY_NAME = {module.rsplit(".", 1)[1]: module for module in FAMILIES.values()}
DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype: got {name!r}, expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_scheduler(model_path: str):
    """The diffusers scheduler the model directory names (config only, no weights): the class in
    model_index.json, as diffusers' from_pretrained takes it, with the config in scheduler/."""
    diffusers = check_diffusers()
    config = json.loads((Path(model_path) / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads((Path(model_path) / "model_index.json").read_text())
    name = (index.get("scheduler") or [None, None])[1] or config["_class_name"]
    with _IMPORT_LOCK:
        cls, mixin = getattr(diffusers, name, None), diffusers.SchedulerMixin
    if cls is None or not isinstance(cls, type) or not issubclass(cls, mixin):
        raise RequestError("model", model_path, f"a diffusers scheduler, not {name!r}")
    return cls.from_config(config)
