"""AnimateDiff backend: a UNet with motion modules, a 2D VAE and a CLIP text encoder.

Knows torch and diffusers only. A worker builds one, keeps it, and calls `encode`, `predict` and
`decode`; the engine does the scheduler steps and the fusion on the full latent. With one window
this computes exactly what diffusers' `AnimateDiffPipeline.__call__` computes (steps 3, 8 and 9).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


class AnimateDiffBackend:
    family = "animatediff"

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32"):
        from diffusers import AnimateDiffPipeline

        from longtake.pipelines import inspect_model

        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        info = inspect_model(model_path)
        # pixel-space models (no VAE): the model's input is pixels rearranged space-to-depth
        self.pixel_shuffle = info.pixel_shuffle
        self.upscale = info.vae_scale_factor // max(1, info.pixel_shuffle)
        extra = {"vae": None} if self.pixel_shuffle else {}
        pipe = AnimateDiffPipeline.from_pretrained(model_path, use_safetensors=True, dtype=self.dtype, **extra)
        self.unet = pipe.unet.to(self.device).eval().requires_grad_(False)
        if info.circular_padding:
            wrap_convolutions(self.unet)
        # models that also read the caption through the time embedding (diffusers' "text_time" addition,
        # fed the mean of the text encoder's hidden states; longtake.json "pooled_text": "mean")
        self.pooled_text = info.pooled_text
        self.vae = pipe.vae.to(self.device).eval().requires_grad_(False) if not self.pixel_shuffle else None
        self.text_encoder = pipe.text_encoder.to(self.device).eval().requires_grad_(False)
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

    def encode(self, prompts: list[str], negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Key prompts -> (keys (K, seq, dim), negative (1, seq, dim)), float32 on the CPU.

        Each prompt is encoded alone, as the pipeline does for one prompt, so results are bit-stable."""
        keys = torch.cat([self._embed(p) for p in prompts])  # (K, seq, dim)
        return keys, self._embed(negative_prompt)

    @torch.inference_mode()
    def predict(
        self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, negative: torch.Tensor, guidance: float
    ) -> torch.Tensor:
        """One window's model output, classifier-free guidance included.

        z: (1, C, L, h, w) scaled model input; cond: (L, seq, dim) per-frame embeddings;
        negative: (1, seq, dim). Returns (1, C, L, h, w) float32 on the CPU."""
        num_frames = z.shape[2]
        z = z.to(self.device, self.dtype)
        cond = cond.to(self.device, self.dtype)
        if guidance > 1:
            neg = negative.to(self.device, self.dtype).expand(num_frames, -1, -1)
            model_in = torch.cat([z, z])  # (2, C, L, h, w)
            hidden = torch.cat([neg, cond])  # (2L, seq, dim): uncond frames, then cond frames
        else:
            model_in, hidden = z, cond
        added = pooled_text_kwargs(hidden, model_in.shape[0]) if self.pooled_text else None
        out = self.unet(model_in, t.to(self.device), encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        if guidance > 1:
            uncond, text = out.chunk(2)
            out = uncond + guidance * (text - uncond)
        return out.float().cpu()

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
