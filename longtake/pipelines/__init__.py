"""Model backends: one file per model family. Only torch and diffusers here, never Ray.

`inspect_model` reads a model directory's JSON configs (no weights, no torch) so a request can be
checked before any worker starts. `load_backend` builds the backend a worker keeps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from longtake.request import RequestError

# model_index.json `_class_name` -> family
FAMILIES = {"AnimateDiffPipeline": "animatediff"}
# components whose weights must be present as safetensors, per family
REQUIRED_WEIGHTS = {"animatediff": ("unet", "text_encoder")}


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a model, read from its configs."""

    path: str
    family: str
    native_window: int  # frames per window the model was made for (latent frames)
    max_window: int  # longest window its temporal layers accept
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel
    temporal_compression: int  # output frames per latent frame
    default_size: int  # pixels (square)
    default_steps: int
    default_guidance: float
    pixel_shuffle: int = 0  # pixel-space models: space-to-depth factor of the model's input (0: latent model)
    default_noise: str = "independent"  # initial-noise mode when the request names none
    circular_padding: bool = False  # the UNet's convolutions wrap around the frame edges (trained that way)
    pooled_text: bool = False  # a "text_time" UNet fed the mean of the caption's hidden states

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


def resolve_model_path(model: str) -> str:
    """'default' -> the bundled trained model; 'tiny' -> a random-weight tiny model built once into the
    cache (for quick checks); anything else is a path."""
    from longtake.pipelines.tiny import TINY_NAME, ensure_tiny_model

    if model == "default":
        if not (DEFAULT_MODEL / "model_index.json").is_file():
            raise RequestError("model", model, f"the bundled model in {DEFAULT_MODEL} (missing: rebuild it with "
                                               f"python -m longtake.models.train_default --out {DEFAULT_MODEL})")
        return str(DEFAULT_MODEL)
    return str(ensure_tiny_model()) if model == TINY_NAME else model


def inspect_model(model: str) -> ModelInfo:
    path = Path(resolve_model_path(model))
    if not path.is_dir():
        raise RequestError("model", model, "an existing diffusers model directory, 'default' or 'tiny'")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise RequestError("model", model, "a diffusers model directory with a model_index.json")
    index = _read_json(index_file, model)
    family = FAMILIES.get(index.get("_class_name"))
    if family is None:
        raise RequestError(
            "model", model, f"a supported family ({', '.join(FAMILIES)}), not {index.get('_class_name')!r}"
        )
    components = REQUIRED_WEIGHTS[family] + (("vae",) if index.get("vae", [None])[0] else ())
    for component in components:
        if not any((path / component).glob("*.safetensors")):
            raise RequestError("model", model, f"safetensors weights in {component}/ (only .safetensors is loaded)")
    return _inspect_animatediff(path, model)


def _read_json(file: Path, model: str) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RequestError("model", model, f"readable JSON in {file.name} ({e})") from None


def _inspect_animatediff(path: Path, model: str) -> ModelInfo:
    unet = _read_json(path / "unet" / "config.json", model)
    # optional longtake.json: defaults for this model, and pixel-space models (no VAE, upscaled on decode)
    extra = _read_json(path / "longtake.json", model) if (path / "longtake.json").is_file() else {}
    if extra.get("pixel_space"):
        scale = int(extra.get("pixel_shuffle", 1)) * int(extra.get("upscale", 1))
    else:
        vae = _read_json(path / "vae" / "config.json", model)
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    max_window = int(unet.get("motion_max_seq_length", 32))
    return ModelInfo(
        path=str(path),
        family="animatediff",
        # AnimateDiff motion modules are trained on 16 frames
        native_window=int(extra.get("native_window", min(16, max_window))),
        max_window=max_window,
        latent_channels=int(unet["in_channels"]),
        vae_scale_factor=scale,
        temporal_compression=1,
        default_size=int(extra.get("default_size", int(unet["sample_size"]) * scale)),
        default_steps=int(extra.get("default_steps", 25)),
        default_guidance=float(extra.get("default_guidance", 7.5)),
        pixel_shuffle=int(extra.get("pixel_shuffle", 1)) if extra.get("pixel_space") else 0,
        default_noise=_noise_mode(extra.get("default_noise", "independent"), model),
        circular_padding=bool(extra.get("circular_padding", False)),
        pooled_text=_pooled_text(unet, extra, model),
    )


def _pooled_text(unet: dict, extra: dict, model: str) -> bool:
    """Only our own "text_time" models are run (SDXL-style ones need a second text encoder and size ids)."""
    pooled = extra.get("pooled_text")
    if pooled not in (None, "mean"):
        raise RequestError("model", model, f"a longtake.json whose pooled_text is 'mean' or absent (got {pooled!r})")
    if unet.get("addition_embed_type") == "text_time" and pooled is None:
        raise RequestError("model", model, "a UNet without addition_embed_type 'text_time' (SDXL-style models are "
                                           "not supported), or a longtake.json with pooled_text 'mean'")
    return pooled == "mean"


def _noise_mode(mode, model: str) -> str:
    from longtake.pipelines.windows import NOISE_MODES

    if mode not in NOISE_MODES:
        raise RequestError("model", model, f"a longtake.json whose default_noise is one of {', '.join(NOISE_MODES)} "
                                           f"(got {mode!r})")
    return mode


def load_backend(model_path: str, device: str = "cpu", dtype: str = "float32"):
    """Build the backend for a model directory (already inspected)."""
    from longtake.pipelines.animatediff import AnimateDiffBackend

    return AnimateDiffBackend(model_path, device=device, dtype=dtype)


def load_scheduler(model_path: str):
    """The diffusers scheduler the model directory names (config only, no weights)."""
    import diffusers

    config = json.loads((Path(model_path) / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise RequestError("model", model_path, f"a diffusers scheduler, not {config['_class_name']!r}")
    return cls.from_config(config)
