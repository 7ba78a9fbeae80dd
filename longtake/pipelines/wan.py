"""Wan family (Wan 2.1 and 2.2 text-to-video): a diffusion transformer, a causal 3D VAE and a UMT5 encoder.

Knows torch and diffusers only. A directory whose model_index.json names `WanPipeline` holds
`WanTransformer3DModel` (and for Wan 2.2 A14B a second expert `transformer_2` with `boundary_ratio`),
`AutoencoderKLWan`, a UMT5 text encoder with its tokenizer, and a flow-matching scheduler (UniPC or Euler).

- Geometry: the VAE compresses 4 frames into one latent frame after a first frame of its own (4k+1
  frames), 8x8 pixels into one latent pixel; the transformer patchifies latents 2x2, so sizes are
  multiples of 16. Windows are in latent frames (native: 21 = 81 frames).
- Conditioning: one text embedding per window (the timeline's interpolation at the window's centre),
  classifier-free guidance as two transformer passes (cond, then uncond), as `WanPipeline.__call__` does.
- Experts: at timestep t >= boundary_ratio * num_train_timesteps the first transformer predicts, below
  it `transformer_2`, per step exactly as diffusers switches.
- Decode: the causal VAE decodes latent frame by latent frame with a feature cache (the last frames
  each causal convolution saw). `decode_stream` runs that session on one worker and yields frames as
  they come, so they equal one whole-clip `vae.decode`; decoding window-length chunks alone would be
  wrong at every chunk start.
- Memory: the UMT5 encoder is loaded only by the encode role (one encoder worker per job); predictors
  hold the transformer(s) in bfloat16 on GPUs and the VAE in float32.

With one window this computes what `WanPipeline.__call__` computes for the same latents.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import torch

from longtake.pipelines import LatentLayout, ModelInfo, noise_mode, read_json, read_options, torch_dtype
from longtake.core.windows import TextConditioning
from longtake.request import RequestError

NATIVE_WINDOW = 21  # latent frames Wan 2.1 / 2.2 T2V were trained on (81 frames)
MAX_SEQUENCE_LENGTH = 512  # text tokens, as WanPipeline.__call__'s default


def required_weights(index: dict) -> tuple[str, ...]:
    experts = tuple(name for name in ("transformer", "transformer_2") if (index.get(name) or [None])[0])
    return experts + ("vae", "text_encoder")


def inspect(path: Path, index: dict, model: str) -> ModelInfo:
    if index.get("expand_timesteps"):
        raise RequestError("model", model, "a Wan text-to-video model (T2V 1.3B / 14B / A14B); the TI2V model "
                                           "(expand_timesteps) is not supported yet")
    experts = [name for name in ("transformer", "transformer_2") if (index.get(name) or [None])[0]]
    if not experts:
        raise RequestError("model", model, "a WanPipeline directory with a transformer")
    if index.get("boundary_ratio") is not None and len(experts) != 2:
        raise RequestError("model", model, "both transformer and transformer_2 when boundary_ratio is set")
    transformer = read_json(path / experts[0] / "config.json", model)
    vae = read_json(path / "vae" / "config.json", model)
    extra = read_options(path, model)
    spatial = int(vae.get("scale_factor_spatial") or 8)
    temporal = int(vae.get("scale_factor_temporal") or 4)
    patch_t, patch_h, patch_w = transformer.get("patch_size", [1, 2, 2])
    multiple = spatial * max(patch_h, patch_w)
    height, width = extra.get("default_size", [480, 832])
    return ModelInfo(
        path=str(path),
        family="wan",
        layout=LatentLayout(channels=int(transformer.get("in_channels", 16)), spatial=spatial,
                            size_multiple=multiple, temporal=temporal, causal=True,
                            size_reason=f"the VAE factor {spatial} x the transformer's patch size {patch_h}"),
        native_window=int(extra.get("native_window", NATIVE_WINDOW)),
        # rotary position tables cover rope_max_seq_len positions per axis
        max_window=int(extra.get("max_window", int(transformer.get("rope_max_seq_len", 1024)) * patch_t)),
        default_height=int(height),
        default_width=int(width),
        default_steps=int(extra.get("default_steps", 50)),
        default_guidance=float(extra.get("default_guidance", 5.0)),
        default_noise=noise_mode(extra.get("default_noise", "independent"), model),
        cuda_dtype="bfloat16",
        streamed_decode=True,
        separate_encoder=True,
        experts=len(experts),
        cp_heads=int(transformer.get("num_attention_heads", 40)),  # diffusers' WanTransformer3DModel has a _cp_plan
        patch=(int(patch_t), int(patch_h), int(patch_w)),
        options={"experts": experts, "boundary_ratio": index.get("boundary_ratio")},
    )


def prompt_clean(text: str) -> str:
    """WanPipeline's prompt cleaning (without ftfy, which is optional there): unescape HTML, squash spaces."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()



def latent_stats(vae, device, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Wan VAE's per-channel latent mean and std, (1, C, 1, 1, 1) on `device` (in `dtype`): the
    transformer sees latents standardized by them. (Each caller keeps the arithmetic of the diffusers
    pipeline it matches: x / (1 / std) + mean, (x - mean) / std, (x - mean) * (1 / std).)"""
    config = vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    return (torch.tensor(config.latents_mean).view(shape).to(device, dtype),
            torch.tensor(config.latents_std).view(shape).to(device, dtype))

class Backend:
    transformer_class = "WanTransformer3DModel"  # the diffusers class of the expert(s) (subclasses: another DiT)
    vae_roles = ("decode",)  # the roles that load the VAE (a family that encodes conditioning frames: predict too)

    def __init__(self, info: ModelInfo, device: str = "cpu", dtype: str = "float32",
                 roles: tuple[str, ...] = ("encode", "predict", "decode"), cp: tuple[int, str] | None = None):
        import diffusers
        from diffusers import AutoencoderKLWan

        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        path = info.path
        self.experts, self.boundary = [], None
        if "predict" in roles:
            transformer = getattr(diffusers, self.transformer_class)
            self.experts = [transformer.from_pretrained(path, subfolder=name, use_safetensors=True,
                                                        dtype=self.dtype).to(self.device).eval()
                            for name in info.options["experts"]]
            if cp is not None:  # this worker is one of a group that predicts each window together
                for expert in self.experts:
                    self._parallelize(expert, *cp)
            if info.options["boundary_ratio"] is not None:
                from longtake.pipelines import load_scheduler

                train_steps = load_scheduler(path).config.num_train_timesteps
                self.boundary = info.options["boundary_ratio"] * train_steps
        self.vae = None
        if any(role in roles for role in self.vae_roles):
            # the VAE is small (about 0.5 GB): float32 everywhere, for exact decodes
            self.vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", use_safetensors=True,
                                                        dtype=torch.float32).to(self.device).eval()
        self.text_encoder = self.tokenizer = None
        if "encode" in roles:
            from transformers import AutoTokenizer, UMT5EncoderModel

            self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            self.text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True,
                                                                 dtype=self.dtype).to(self.device).eval()

    def _parallelize(self, transformer, cp: int, mode: str) -> None:
        """Shard this transformer's windows over the worker's group: diffusers' own `_cp_plan` (Wan's)."""
        from longtake.pipelines.parallel import parallelize

        parallelize(transformer, cp, mode)

    @torch.inference_mode()
    def _embed(self, text: str) -> torch.Tensor:
        """One prompt -> (1, 512, dim) float32: the encoder's states for its tokens, zeros after them."""
        ids = self.tokenizer([prompt_clean(text)], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                             truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = ids.attention_mask.to(self.device)
        hidden = self.text_encoder(ids.input_ids.to(self.device), mask).last_hidden_state.float().cpu()
        length = int(ids.attention_mask.sum())
        hidden[:, length:] = 0
        return hidden  # (1, seq, dim)

    def encode(self, prompts: list[str], negative_prompt: str, schedule) -> TextConditioning:
        """Key prompts + the per-latent-frame schedule -> the job's conditioning (CPU, float32)."""
        keys = torch.cat([self._embed(p) for p in prompts])  # (K, seq, dim)
        return TextConditioning(keys, self._embed(negative_prompt), *schedule)

    @torch.inference_mode()
    def predict(self, z: torch.Tensor, t: torch.Tensor, cond: TextConditioning, window: tuple[int, int],
                guidance: tuple[float, ...]) -> torch.Tensor:
        """One window's flow prediction, guidance included (one scale per expert). z: (1, C, L, h, w);
        returns (1, C, L, h, w) float32. The window's text is the timeline at its centre (one embedding
        per window, as the DiT takes)."""
        k = 0 if self.boundary is None or t >= self.boundary else 1
        expert, guidance = self.experts[k], guidance[k]
        z = z.to(self.device, self.dtype)
        timestep = t.to(self.device).expand(z.shape[0])
        text = cond.centre(*window).to(self.device, self.dtype)  # (1, seq, dim)
        out = expert(hidden_states=z, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        if guidance > 1:
            negative = cond.negative.to(self.device, self.dtype)
            uncond = expert(hidden_states=z, timestep=timestep, encoder_hidden_states=negative, return_dict=False)[0]
            out = uncond + guidance * (out - uncond)
        return out.float().cpu()

    def _denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = latent_stats(self.vae, self.device)
        return z.to(self.device, torch.float32) / (1.0 / std) + mean  # (1, C, n, h, w), as WanPipeline computes it

    @staticmethod
    def _to_uint8(video: torch.Tensor) -> np.ndarray:
        """(1, 3, n, H, W) in [-1, 1] -> (n, H, W, 3) uint8, as WanPipeline's postprocess then x255."""
        video = (video.clamp(-1, 1) / 2 + 0.5).clamp(0, 1)
        return (video[0] * 255).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (1, C, 1 + ceil((n - 1) / 4), h, w) normalized latents: the clip through
        the causal VAE's encoder (the posterior's mode, as WanImageToVideoPipeline takes it), then
        normalized as the transformer sees latents (the inverse of `_denormalize`)."""
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, n, H, W)
        video = video.to(self.device, torch.float32) / 127.5 - 1
        latent = self.vae.encode(video).latent_dist.mode()  # (1, C, n', h, w)
        mean, std = latent_stats(self.vae, self.device)
        return ((latent - mean) / std).float().cpu()

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """The whole clip at once through `vae.decode` (reference; the engine streams)."""
        return self._to_uint8(self.vae.decode(self._denormalize(z)).sample)

    @torch.inference_mode()
    def decode_stream(self, z: torch.Tensor, chunk: int = 4):
        """(1, C, n, h, w) latents -> uint8 frame chunks (first 1 + 4 (chunk - 1) frames, then 4 chunk each),
        in order: the VAE's own frame-by-frame loop with its feature cache, kept between chunks."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

        vae = self.vae
        x = vae.post_quant_conv(self._denormalize(z))  # (1, C, n, h, w); a 1x1x1 convolution, frame by frame
        cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        pending = []
        for i in range(x.shape[2]):
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
            if vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=vae.config.patch_size)
            pending.append(out.clamp(-1.0, 1.0))
            if len(pending) == chunk or i == x.shape[2] - 1:
                yield self._to_uint8(torch.cat(pending, 2))
                pending = []
