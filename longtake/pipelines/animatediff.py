"""AnimateDiff family: a UNet with motion modules, a per-frame 2D VAE and a CLIP text encoder.

The bundled default model (pixel space, no VAE; with a ControlNet for silhouette paths, its convolutions
wrapping like the UNet's: `longtake/tools/train_control.py`) and `tiny` are of this family. Knows torch and
diffusers only. `inspect` reads the configs; a worker builds one `Backend`, keeps it, and calls `encode`, `predict`
and `decode`; the engine does the scheduler steps and the fusion on the full latent. Conditioning is
per frame: each window gets the interpolated embeddings of its own frames. The 2D VAE decodes every
frame alone, so decode chunks run on any worker in parallel. With one window this computes exactly what
diffusers' `AnimateDiffPipeline.__call__` computes (steps 3, 8 and 9).

An `AnimateDiffControlNetPipeline` directory runs its ControlNet on each window's own pose frames. A directory
of either class may add an IP-Adapter image prompt:

    ip_adapter/<name>.safetensors    one IP-Adapter state dict, keys prefixed `image_proj.` and `ip_adapter.`
                                     (the layout diffusers' `load_ip_adapter` reads, e.g. h94/IP-Adapter's
                                     models/ip-adapter_sd15.safetensors; only .safetensors is loaded)
    image_encoder/                   the CLIPVisionModelWithProjection it was trained with (safetensors), named
                                     in model_index.json as the pipeline's `image_encoder`
    feature_extractor/               its CLIPImageProcessor (optional: else diffusers' default for the encoder's
                                     image size, as `load_ip_adapter` makes one)
    longtake.json "ip_adapter_scale" the adapter's scale (default 1.0)

Predictors load it with `load_ip_adapter(path, subfolder="ip_adapter", weight_name=..., local_files_only=True)`
(nothing is downloaded). The image prompt is the request's reference photo (also pinned at frame 0): the
engine sends the photo as read (`cond.media["reference"]`, with the media's hash `cond.media["key"]`), a
worker embeds it once per job as `prepare_ip_adapter_image_embeds` does (zeros for the unconditional half)
and every window's UNet call gets it as `added_cond_kwargs["image_embeds"]`, so one window equals
`AnimateDiffControlNetPipeline.__call__(..., ip_adapter_image=photo)`. Such a model needs a reference photo.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longtake.pipelines import LatentLayout, ModelInfo, noise_mode, read_json, read_options, torch_dtype
from longtake.core.windows import TextConditioning
from longtake.request import RequestError

logger = logging.getLogger(__name__)

IP_ADAPTER_DIR = "ip_adapter"  # the folder of an IP-Adapter state dict (module docstring)
IMAGE_PROMPTS_KEPT = 4  # jobs whose image-prompt embeddings a worker keeps


def wrap_convolutions(unet: torch.nn.Module) -> int:
    """Circular padding for the UNet's padded 2D convolutions, for models trained on frames that wrap around
    their edges (longtake.json "circular_padding"; weights are unchanged). Returns how many convolutions."""
    count = 0
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d) and isinstance(module.padding, tuple) and any(module.padding):
            module.padding_mode = "circular"
            count += 1
    return count


def pooled_text_kwargs(hidden: torch.Tensor, batch: int) -> dict:
    """A "text_time" UNet's extra inputs: (batch * frames, seq, dim) hidden states -> the mean over each
    clip's frames and tokens as `text_embeds` (batch, dim), and one zero `time_ids` per clip."""
    pooled = hidden.unflatten(0, (batch, -1)).mean(dim=(1, 2))  # (batch, dim)
    return {"text_embeds": pooled, "time_ids": torch.zeros(batch, 1, dtype=pooled.dtype, device=pooled.device)}


def required_weights(index: dict) -> tuple[str, ...]:
    """Components whose weights must be present as safetensors."""
    return (("unet", "text_encoder") + (("vae",) if index.get("vae", [None])[0] else ())
            + (("controlnet",) if index.get("controlnet", [None])[0] else ()))


def inspect(path: Path, index: dict, model: str) -> ModelInfo:
    unet = read_json(path / "unet" / "config.json", model)
    # optional longtake.json: defaults for this model, and pixel-space models (no VAE, upscaled on decode)
    extra = read_options(path, model)
    if extra.get("pixel_space"):
        scale = int(extra.get("pixel_shuffle", 1)) * int(extra.get("upscale", 1))
    else:
        vae = read_json(path / "vae" / "config.json", model)
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    max_window = int(unet.get("motion_max_seq_length", 32))
    size = int(extra.get("default_size", int(unet["sample_size"]) * scale))
    return ModelInfo(
        path=str(path),
        family="animatediff",
        # the layout adds the video writer's rule (even sides) to the model's own multiple
        layout=LatentLayout(channels=int(unet["in_channels"]), spatial=scale, size_multiple=scale,
                            size_reason="the model's pixel-shuffle x upscale factor" if extra.get("pixel_space")
                            else "the model's VAE factor"),
        # AnimateDiff motion modules are trained on 16 frames
        native_window=int(extra.get("native_window", min(16, max_window))),
        max_window=max_window,
        default_height=size,
        default_width=size,
        default_steps=int(extra.get("default_steps", 25)),
        default_guidance=float(extra.get("default_guidance", 7.5)),
        default_noise=noise_mode(extra.get("default_noise", "independent"), model),
        cuda_dtype="float16",
        options={
            # pixel-space models: space-to-depth factor of the model's input (0: latent model)
            "pixel_shuffle": int(extra.get("pixel_shuffle", 1)) if extra.get("pixel_space") else 0,
            # the UNet's convolutions wrap around the frame edges (trained that way)
            "circular_padding": bool(extra.get("circular_padding", False)),
            # a "text_time" UNet fed the mean of the caption's hidden states
            "pooled_text": _pooled_text(unet, extra, model),
            # a ControlNet (AnimateDiffControlNetPipeline directories): requests may give a pose
            "controlnet": bool(index.get("controlnet", [None])[0]),
            "pose": bool(index.get("controlnet", [None])[0]),  # the engine: requests may give a pose
            # longtake.json "planner": text-only requests get a motion plan as their pose (models/planner.py)
            "planner": _planner(extra, index, model),
            # an IP-Adapter image prompt: its weights file in ip_adapter/ ("" without one), and its scale
            "ip_adapter": ip_adapter_file(path, index, model),
            "ip_adapter_scale": _ip_adapter_scale(extra, model),
        },
    )


def _planner(extra: dict, index: dict, model: str) -> str:
    """longtake.json's "planner" ("" without one), on a model with a ControlNet (the plan is drawn as its
    control frames): RequestError naming `model` otherwise. Which planners exist is the bundled model's
    business (models/planner.py: the engine checks the name there)."""
    name = extra.get("planner", "")
    if name and not index.get("controlnet", [None])[0]:
        raise RequestError("model", model, "a ControlNet (controlnet/) for its longtake.json planner to drive")
    return name


def ip_adapter_file(path: Path, index: dict, model: str) -> str:
    """The IP-Adapter weights file's name in ip_adapter/ ("" without the folder), checked before any weights
    load: one .safetensors file whose keys are those of an IP-Adapter (read from its header), and an image
    encoder with safetensors weights. RequestError naming `model` otherwise."""
    folder = path / IP_ADAPTER_DIR
    if not folder.is_dir():
        return ""
    files = sorted(f.name for f in folder.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(sorted(f.name for f in folder.iterdir())) or "nothing"
        raise RequestError("model", model, f"an {IP_ADAPTER_DIR}/ folder holding one IP-Adapter .safetensors file "
                                           f"(only .safetensors is loaded; found {found})")
    keys = _safetensors_keys(folder / files[0], model)
    if not any(k.startswith("image_proj.") for k in keys) or not any(k.startswith("ip_adapter.") for k in keys):
        raise RequestError("model", model, f"an IP-Adapter state dict in {IP_ADAPTER_DIR}/{files[0]} (keys prefixed "
                                           f"image_proj. and ip_adapter.)")
    if not index.get("image_encoder", [None])[0] or not any((path / "image_encoder").glob("*.safetensors")):
        raise RequestError("model", model, f"with an {IP_ADAPTER_DIR}/ folder, an image_encoder "
                                           f"(CLIPVisionModelWithProjection) named in model_index.json, with "
                                           f"safetensors weights in image_encoder/")
    return files[0]


def _safetensors_keys(file: Path, model: str) -> list[str]:
    """The tensor names in a safetensors file's header (no tensor read)."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise RequestError("model", model, f"a readable safetensors file in {IP_ADAPTER_DIR}/ ({e})") from None
    return [k for k in header if k != "__metadata__"]


def _ip_adapter_scale(extra: dict, model: str) -> float:
    scale = extra.get("ip_adapter_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise RequestError("model", model, f"a longtake.json whose ip_adapter_scale is a number >= 0 (got {scale!r})")
    return float(scale)


def _pooled_text(unet: dict, extra: dict, model: str) -> bool:
    """Only our own "text_time" models are run (SDXL-style ones need a second text encoder and size ids)."""
    pooled = extra.get("pooled_text")
    if pooled not in (None, "mean"):
        raise RequestError("model", model, f"a longtake.json whose pooled_text is 'mean' or absent (got {pooled!r})")
    if unet.get("addition_embed_type") == "text_time" and pooled is None:
        raise RequestError("model", model, "a UNet without addition_embed_type 'text_time' (SDXL-style models are "
                                           "not supported), or a longtake.json with pooled_text 'mean'")
    return pooled == "mean"


class Backend:
    def __init__(self, info: ModelInfo, device: str = "cpu", dtype: str = "float32",
                 roles: tuple[str, ...] = ("encode", "predict", "decode")):
        from diffusers import AnimateDiffControlNetPipeline, AnimateDiffPipeline

        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        # pixel-space models (no VAE): the model's input is pixels rearranged space-to-depth
        self.pixel_shuffle = info.options["pixel_shuffle"]
        self.upscale = info.layout.spatial // max(1, self.pixel_shuffle)
        skip = {"vae": None} if self.pixel_shuffle or "decode" not in roles else {}
        if "encode" not in roles:
            skip |= {"text_encoder": None, "tokenizer": None}
        if info.options["controlnet"] and "predict" not in roles:
            skip["controlnet"] = None
        if info.options["controlnet"]:  # the UNet has its motion modules already (the ControlNet pipeline would
            # otherwise insist on the adapter)
            skip["motion_adapter"] = None
        ip_adapter = info.options.get("ip_adapter") if "predict" in roles else ""
        if not ip_adapter:  # the image encoder serves only an IP-Adapter's image prompt, on predictors
            skip |= {"feature_extractor": None, "image_encoder": None}
        cls = AnimateDiffControlNetPipeline if info.options["controlnet"] else AnimateDiffPipeline
        pipe = cls.from_pretrained(info.path, use_safetensors=True, dtype=self.dtype, **skip)
        self.image_encoder = self.feature_extractor = None
        if ip_adapter:  # into the UNet's cross-attention, as the pipeline loads it (from this directory only)
            pipe.load_ip_adapter(info.path, subfolder=IP_ADAPTER_DIR, weight_name=ip_adapter, local_files_only=True)
            pipe.set_ip_adapter_scale(info.options["ip_adapter_scale"])
            self.image_encoder = pipe.image_encoder.to(self.device).eval().requires_grad_(False)
            self.feature_extractor = pipe.feature_extractor
        self._image_prompts: OrderedDict = OrderedDict()  # media hash -> (image embeds, negative), per adapter
        self._image_lock = threading.Lock()
        self.controlnet = getattr(pipe, "controlnet", None)
        if self.controlnet is not None:
            self.controlnet = self.controlnet.to(self.device).eval().requires_grad_(False)
        self.unet = pipe.unet.to(self.device).eval().requires_grad_(False)
        if info.options["circular_padding"]:
            wrap_convolutions(self.unet)
            if self.controlnet is not None:  # the bundled model's control branch wraps as its UNet does
                wrap_convolutions(self.controlnet)
        # models that also read the caption through the time embedding (diffusers' "text_time" addition,
        # fed the mean of the text encoder's hidden states; longtake.json "pooled_text": "mean")
        self.pooled_text = info.options["pooled_text"]
        self.vae = pipe.vae.to(self.device).eval().requires_grad_(False) if pipe.vae is not None else None
        self.text_encoder = pipe.text_encoder
        if self.text_encoder is not None:
            self.text_encoder = self.text_encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = pipe.tokenizer

    @torch.inference_mode()
    def _embed(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(
            [text], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = ids.attention_mask.to(self.device)
        return self.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[0].float().cpu()  # (1, seq, dim)

    def encode(self, prompts: list[str], negative_prompt: str, schedule) -> TextConditioning:
        """Key prompts + the per-frame schedule (a, b, alpha) -> the job's conditioning, float32 on the CPU.

        Each prompt is encoded alone, as the pipeline does for one prompt, so results are bit-stable."""
        keys = torch.cat([self._embed(p) for p in prompts])  # (K, seq, dim)
        return TextConditioning(keys, self._embed(negative_prompt), *schedule)

    @torch.inference_mode()
    def predict(self, z: torch.Tensor, t: torch.Tensor, cond: TextConditioning, window: tuple[int, int],
                guidance: tuple[float]) -> torch.Tensor:
        """One window's model output, classifier-free guidance included (one expert: one scale).

        z: (1, C, L, h, w) scaled model input; the window's frames get their own interpolated embeddings
        (L, seq, dim). Returns (1, C, L, h, w) float32 on the CPU."""
        num_frames, (guidance,) = z.shape[2], guidance
        z = z.to(self.device, self.dtype)
        hidden_cond = cond.frames(*window).to(self.device, self.dtype)  # (L, seq, dim)
        if guidance > 1:
            neg = cond.negative.to(self.device, self.dtype).expand(num_frames, -1, -1)
            model_in = torch.cat([z, z])  # (2, C, L, h, w)
            hidden = torch.cat([neg, hidden_cond])  # (2L, seq, dim): uncond frames, then cond frames
        else:
            model_in, hidden = z, hidden_cond
        added = pooled_text_kwargs(hidden, model_in.shape[0]) if self.pooled_text else {}
        if self.image_encoder is not None:  # the IP-Adapter's image prompt: unconditional (zeros), then the photo
            embeds, negative = self._image_prompt(getattr(cond, "media", None))
            added["image_embeds"] = [torch.cat([n, e]) if guidance > 1 else e for e, n in zip(embeds, negative)]
        residuals = {}
        if self.controlnet is not None and cond.control is not None:  # the window's own pose frames
            control = cond.control_frames().to(self.device, self.dtype)  # (L, 3, H, W)
            control = torch.cat([control] * model_in.shape[0])
            frames_in = model_in.transpose(1, 2).flatten(0, 1)  # (B*L, C, h, w), frames of each batch in order
            down, mid = self.controlnet(frames_in, t.to(self.device), encoder_hidden_states=hidden,
                                        controlnet_cond=control, conditioning_scale=cond.control_scale,
                                        guess_mode=False, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        out = self.unet(model_in, t.to(self.device), encoder_hidden_states=hidden, added_cond_kwargs=added or None,
                        **residuals).sample
        if guidance > 1:
            uncond, text = out.chunk(2)
            out = uncond + guidance * (text - uncond)
        return out.float().cpu()

    @torch.inference_mode()
    def _image_prompt(self, media: dict | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The reference photo's embeddings, one (1, 1, ...) tensor per IP-Adapter, and their unconditional
        counterparts, as `prepare_ip_adapter_image_embeds` computes them (`encode_image`: the CLIP image
        processor on the photo; image_embeds for a plain IP-Adapter, else the encoder's penultimate hidden
        states, with those of a black image as the negative). Computed once per job (keyed by the media's
        hash), on the device in the model's dtype."""
        from diffusers.models.embeddings import ImageProjection
        from PIL import Image

        if not media or media.get("reference") is None:
            raise ValueError("this model has an IP-Adapter: the conditioning needs the reference photo "
                             "(cond.media['reference'], attached by the engine)")
        key = media["key"]
        with self._image_lock:
            if key in self._image_prompts:
                self._image_prompts.move_to_end(key)
                return self._image_prompts[key]
        dtype = next(self.image_encoder.parameters()).dtype
        photo = media["reference"]
        photo = photo.numpy() if isinstance(photo, torch.Tensor) else np.asarray(photo)
        pixels = self.feature_extractor(Image.fromarray(photo), return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, dtype)
        embeds, negative = [], []
        for layer in self.unet.encoder_hid_proj.image_projection_layers:
            if isinstance(layer, ImageProjection):
                e = self.image_encoder(pixels).image_embeds
                n = torch.zeros_like(e)
            else:  # IP-Adapter Plus and the like: hidden states
                e = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
                n = self.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
            embeds.append(e[None])
            negative.append(n[None])
        with self._image_lock:
            self._image_prompts[key] = embeds, negative
            while len(self._image_prompts) > IMAGE_PROMPTS_KEPT:
                self._image_prompts.popitem(last=False)
        return embeds, negative

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (1, C, n, h, w) float32 latents that `decode` turns back into these frames
        (up to the model's resolution): pixel-space models average each upscale block and rearrange
        space-to-depth; latent models take the VAE posterior's mean, scaled."""
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, H, W)
        if self.vae is None:
            if self.upscale > 1:
                video = F.avg_pool2d(video, self.upscale)
            z = F.pixel_unshuffle(video, self.pixel_shuffle)  # (n, C, h, w)
        else:
            posterior = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
            z = posterior.mean * self.vae.config.scaling_factor
        return z.float().cpu().permute(1, 0, 2, 3).unsqueeze(0).contiguous()  # (1, C, n, h, w)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """(1, C, n, h, w) latents -> (n, H, W, 3) uint8 frames. Pixel-space models: upscale only."""
        _, c, n, h, w = z.shape
        z = z.permute(0, 2, 1, 3, 4).reshape(n, c, h, w)  # (n, C, h, w)
        if self.vae is None:
            video = F.pixel_shuffle(z.float(), self.pixel_shuffle)  # (n, 3, h*s, w*s) in [-1, 1]
            if self.upscale > 1:
                video = F.interpolate(video, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        else:
            z = z.to(self.device, self.dtype) / self.vae.config.scaling_factor
            video = self.vae.decode(z).sample.float()  # (n, 3, H, W) in [-1, 1]
        video = (video / 2 + 0.5).clamp(0, 1)
        return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
