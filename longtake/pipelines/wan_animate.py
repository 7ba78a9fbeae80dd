"""Wan-Animate family (Wan 2.2 Animate, diffusers' `WanAnimatePipeline`): a reference photo animated by a pose.

Knows torch and diffusers only. A directory whose model_index.json names `WanAnimatePipeline` holds a
`WanAnimateTransformer3DModel` (a Wan 2.1 I2V-style DiT with a pose patch embedding, a motion encoder that
reads face crops and face adapters), the Wan VAE, UMT5 with its tokenizer, a CLIP vision encoder with its
image processor, and a flow-matching scheduler. Everything Wan shares (geometry, text embeddings, the
streamed causal decode) is `wan.py`'s: this Backend subclasses it.

Inputs (request fields): `reference` (the character photo; required), `pose` (skeleton video or keypoints;
required), `face` (optional face crops; absent: a blank face, every pixel -1, which is what the pipeline
gives its unconditional guidance pass, so the expression is left to the model), `animate_mode` "animate"
(the character in a new clip) or "replace" (the character redrawn into `background` where `mask` is white;
both videos required). The engine attaches the media to the conditioning (`cond.media`): the reference at
the output size (fitted inside it and padded with black, as the pipeline's `resize_mode="fill"` does), once
per job; and with each window, its own slice (`core.windows.conditioning_frames`: its pixel frames, reflected
past the clip's end as the pipeline pads) of the pose as drawn (`cond.control`), the face frames at the
motion encoder's size, the background frames and the mask as grayscale (`AnimateConditioning.for_window`).

One window is one of diffusers' segments. The pipeline renders a long clip segment after segment, each
`segment_frame_length` (4k+1) frames; a segment of T latent frames is denoised as T+1 latent frames,
a reference slot first, and its conditioning is, per latent frame, 20 channels concatenated to the 16
noisy ones (the `get_i2v_mask` mask, 4 channels, then a VAE latent, 16): for the slot, mask 1 and the
reference photo's latent (`prepare_reference_image_latents`); for the segment's frames, the "previous
segment" latents (`prepare_prev_segment_cond_latents`). The transformer also takes the segment's pose
latents (`prepare_pose_latents`: the pose frames through the VAE), its face frames (pixels), the prompt
and the photo's CLIP embedding (hidden_states[-2]), and its output's slot is dropped. Here a window of L
latent frames, (s, e), covers the pixel frames 4s .. 4(e - 1) (frames 0 .. 4(L - 1) for the first): the
same 4(L - 1) + 1 frames a segment starting there has, whose latent frames are exactly the clip's latent
frames s .. e - 1 (the causal VAE's first latent frame of a segment is its one frame 4s, the last frame of
the clip's latent frame s). `predict` builds, for that range: the pose latents, the face frames, and the
previous-segment conditioning; the reference latent and CLIP embedding are the same for every window.
Frames past the clip (the 4k+1 rule's surplus) repeat it backwards, as the pipeline's `pad_video_frames`.

What stands in for the previous segment: in diffusers segment n > 0 is conditioned on the last decoded
frame of segment n - 1 (mask 1 on it). Here windows are denoised together and fused at every step, so no
window has a finished neighbour to copy; every window gets the conditioning diffusers gives the first
segment: no previous frames (mask 0), and latents of a black clip ("animate") or of the window's own
background frames with the inverted mask ("replace"). Continuity between windows comes from the fusion.

The reference slot: in diffusers the slot is a latent frame denoised with the rest (it starts as noise and
follows the scheduler, and its output is dropped at the end). Here it is the window's private frame
(`options["private_frames"]` = 1; cluster/sampler.py): the engine keeps one per window, starting from the
window's own seeded noise (`windows.private_noise`), passes it first in the window's model input, and
steps the slot part of the prediction with the window's own scheduler copy; it is never fused with another
window, and checkpoints hold it. So with one window longtake's frames equal `WanAnimatePipeline.__call__`
given the same initial latents, the slot included (tests/test_families.py), and with several each window
carries the slot exactly as the pipeline carries one segment's.

Per worker the reference's VAE latent and CLIP embedding, and each window's pose latents, face frames and
previous-segment latents, are computed once and kept (keyed by the media's hash and the window): the
conditioning is the same at every step, so the frames do not depend on it. The CLIP vision encoder and the
VAE sit on the predictors (they read the media the engine attached to the conditioning, after the
encoder has embedded the prompts); UMT5 on the encoder worker, as for Wan.

Memory (Wan2.2-Animate-14B, from its transformer config: 40 blocks of width 5120, FFN 13824, image
cross-attention added_kv_proj_dim 5120, 8 face adapters, a 512 px motion encoder): 17.27 B parameters
(blocks 16.15 B, face adapters 0.84 B, embeddings 0.24 B, motion and face encoders 0.04 B), x 2 bytes in
bfloat16 = 34.5 GB a predictor. Activations of one 720 x 1280 window of 20 latent frames (+ the slot):
21 x 45 x 80 = 75,600 tokens; a hidden state is 75,600 x 5120 x 2 B = 0.77 GB, the FFN's inner one
75,600 x 13824 x 2 B = 2.1 GB, attention (SDPA, memory-efficient) about linear in tokens: about 5 GB at
peak, the guidance pass run after the conditional one, not batched. The VAE (0.13 B parameters, float32:
0.5 GB, plus a few GB of activations when it encodes a window's 77 pose frames) and the CLIP ViT-H/14 vision
encoder (0.63 B, 1.3 GB in bf16) come on top: about 45 GB a predictor, one per 80 GB GPU (A100 / H100 80 GB;
not a 48 GB card). In host memory a predictor keeps the conditioning of up to 64 windows (pose and
previous-segment latents, 16 + 20 channels x 20 latent frames x 90 x 160 x 4 B = 41 MB a window at 720p: up
to 2.7 GB), and the driver the clip's media as uint8 frames (a minute at 16 fps, 720 x 1280: 2.7 GB for the
pose, as much for a background, a third of it for a mask, 0.75 GB of 512 px face frames). The
encoder worker holds UMT5-XXL's encoder (5.7 B parameters, 11.4 GB in bf16) on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from longtake.pipelines import ModelInfo, read_json, read_options
from longtake.pipelines import wan
from longtake.core.windows import TextConditioning, reflect_index, window_pixels  # noqa: F401 (tests read them here)
from longtake.request import RequestError

NATIVE_WINDOW = 20  # latent frames of the pipeline's default segment (77 frames), the reference slot not counted
DEFAULT_SIZE = (720, 1280)  # the pipeline's default height and width
MEMO_ENTRIES = 64  # windows whose conditioning a worker keeps (on the CPU: about 41 MB a window at 720p)


def required_weights(index: dict) -> tuple[str, ...]:
    return ("transformer", "vae", "text_encoder", "image_encoder")


def inspect(path: Path, index: dict, model: str) -> ModelInfo:
    if not (index.get("transformer") or [None])[0] or not (index.get("image_encoder") or [None])[0]:
        raise RequestError("model", model, "a WanAnimatePipeline directory with a transformer and an image_encoder")
    base = wan.inspect(path, index, model)
    transformer = read_json(path / "transformer" / "config.json", model)
    extra = read_options(path, model)
    latent = int(transformer.get("latent_channels") or (int(transformer["in_channels"]) - 4) // 2)
    patch_t = transformer.get("patch_size", [1, 2, 2])[0]
    height, width = extra.get("default_size", DEFAULT_SIZE)
    return replace(
        base,
        family="wan_animate",
        layout=replace(base.layout, channels=latent),
        native_window=int(extra.get("native_window", NATIVE_WINDOW)),
        # the rotary tables cover the window and its reference slot
        max_window=int(extra.get("max_window", int(transformer.get("rope_max_seq_len", 1024)) * patch_t - 1)),
        default_height=int(height),
        default_width=int(width),
        default_steps=int(extra.get("default_steps", 20)),  # the pipeline's defaults: 20 steps, no guidance
        default_guidance=float(extra.get("default_guidance", 1.0)),
        experts=1,
        # context parallelism with its own plan (Backend.cp_plan): each worker whole latent frames, as the face
        # adapter attends within each frame
        cp_heads=int(transformer.get("num_attention_heads", 40)),
        options={"experts": ["transformer"], "boundary_ratio": None,
                 # the engine: a pose drives it; the reference photo is conditioning (not a pinned frame 0)
                 "pose": True, "pose_required": True, "reference": "condition",
                 "private_frames": 1,  # the reference slot, carried per window (module docstring)
                 "cp_whole_frames": True,  # a group's workers split a window at latent-frame boundaries
                 "face_size": int(transformer.get("motion_encoder_size", 512)), "modes": ["animate", "replace"]},
    )


def cp_plan(transformer) -> dict:
    """Wan's context-parallel plan (split the tokens after the embedding and the rotary tables, gather before
    the output projection), plus the face adapters' motion vectors split by latent frame like the tokens:
    each face adapter attends within each frame (its queries unflattened to (frames, tokens of a frame)), so a
    worker holding whole frames needs only their motion vectors and attends locally."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    rope = ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)
    motion = ContextParallelInput(split_dim=1, expected_dims=4, split_output=False)  # (B, frames, N, C)
    return {"rope": {0: rope, 1: rope},
            "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
            **{f"face_adapter.{i}": {"encoder_hidden_states": motion} for i in range(len(transformer.face_adapter))},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


def parallelize(transformer, cp: int, mode: str) -> None:
    """Shard a WanAnimateTransformer3DModel's windows over the worker's group (`cp_plan`); the face adapters
    then attend on their own frames, without the group's attention."""
    from longtake.pipelines import parallel

    parallel.parallelize(transformer, cp, mode, cp_plan=cp_plan(transformer))
    for adapter in transformer.face_adapter:
        adapter.processor._parallel_config = None


@dataclass
class AnimateConditioning(TextConditioning):
    """Wan's text conditioning, plus what the engine attaches: `media` (reference, pose as `control`, face,
    background, mask) with the mode, the seed and the media's hash."""

    media: dict | None = None

    def for_window(self, frames: dict[str, torch.Tensor]) -> "AnimateConditioning":
        """The window's own pose (`control`), face, background and mask frames, beside the job's reference."""
        if not frames:
            return self
        window = super().for_window(frames)
        window.media = {**(self.media or {}), **{name: a for name, a in frames.items() if name != "control"}}
        return window


class Backend(wan.Backend):
    transformer_class = "WanAnimateTransformer3DModel"
    vae_roles = ("predict", "decode")  # predictors encode the pose, background and reference frames

    def __init__(self, info: ModelInfo, device: str = "cpu", dtype: str = "float32",
                 roles: tuple[str, ...] = ("encode", "predict", "decode"), cp: tuple[int, str] | None = None):
        super().__init__(info, device=device, dtype=dtype, roles=roles, cp=cp)
        self.image_encoder = self.image_processor = None
        if "predict" in roles:
            from transformers import CLIPImageProcessor, CLIPVisionModel

            self.image_processor = CLIPImageProcessor.from_pretrained(info.path, subfolder="image_processor")
            self.image_encoder = CLIPVisionModel.from_pretrained(info.path, subfolder="image_encoder",
                                                                 use_safetensors=True,
                                                                 dtype=self.dtype).to(self.device).eval()
        self.face_size = info.options["face_size"]
        self._memo: OrderedDict = OrderedDict()

    def _parallelize(self, transformer, cp: int, mode: str) -> None:
        parallelize(transformer, cp, mode)

    def encode(self, prompts: list[str], negative_prompt: str, schedule) -> AnimateConditioning:
        text = super().encode(prompts, negative_prompt, schedule)
        return AnimateConditioning(text.keys, text.negative, text.a, text.b, text.alpha)

    # ---------------------------------------------------------------- conditioning, as the pipeline computes it

    def _normalized(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = wan.latent_stats(self.vae, latent.device, latent.dtype)
        return (latent - mean) * (1.0 / std)  # as the pipeline standardizes encoded latents

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        """(1, 3, n, H, W) in [-1, 1] -> (1, C, n', h, w): the posterior's mode, standardized."""
        return self._normalized(self.vae.encode(video.to(self.device, torch.float32)).latent_dist.mode())

    @staticmethod
    def _pixels(frames: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (1, 3, n, H, W) float32 in [-1, 1], as diffusers' image processors compute it."""
        return (frames.float() / 255.0 * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0)

    def _i2v_mask(self, latent_t: int, h: int, w: int, values: torch.Tensor | None, mask_len: int) -> torch.Tensor:
        """The pipeline's `get_i2v_mask`: (1, 4, latent_t, h, w)."""
        temporal = self.vae.config.scale_factor_temporal
        if values is None:
            mask = torch.zeros(1, 1, (latent_t - 1) * temporal + 1, h, w, device=self.device)
        else:
            mask = values.clone().to(self.device, torch.float32)
        mask[:, :, :mask_len] = 1
        first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
        mask = torch.concat([first, mask[:, :, 1:]], dim=2)
        return mask.view(1, -1, temporal, h, w).transpose(1, 2)

    def _remember(self, key, make):
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        value = make()
        self._memo[key] = value
        while len(self._memo) > MEMO_ENTRIES:
            self._memo.popitem(last=False)
        return value

    @torch.inference_mode()
    def _reference(self, media: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot conditioning (1, 4 + C, 1, h, w): the mask and the reference's latent, CLIP embedding)."""
        def make():
            from PIL import Image

            image = media["reference"]  # (H, W, 3) uint8 at the output size
            latent = self._encode(self._pixels(image[None]))  # prepare_reference_image_latents
            _, _, _, h, w = latent.shape
            cond = torch.cat([self._i2v_mask(1, h, w, None, 1), latent], dim=1)
            pixels = self.image_processor(images=Image.fromarray(image.numpy()), return_tensors="pt")
            pixels = pixels.to(self.device)
            pixels["pixel_values"] = pixels["pixel_values"].to(self.dtype)
            embeds = self.image_encoder(**pixels, output_hidden_states=True).hidden_states[-2]
            return cond, embeds
        return self._remember((media["key"], "reference"), make)

    @torch.inference_mode()
    def _window(self, cond: AnimateConditioning, start: int, end: int):
        """The window's own conditioning: (pose latents (1, C, L, h, w), previous-segment conditioning
        (1, 4 + C, L, h, w), face frames (1, 3, n, S, S) in [-1, 1]). The latents (VAE encodes) are kept on the
        CPU; the face frames are cut and scaled again each call (cheap, and 0.24 GB a 720p window in float32)."""
        media = cond.media
        n = len(cond.control)  # the window's pixel frames (window_pixels)
        if media.get("face") is not None:
            face = self._pixels(media["face"])
        else:  # no face video: the blank face (every pixel -1) of the pipeline's unconditional pass
            face = torch.full((1, 3, n, self.face_size, self.face_size), -1.0)

        def make():
            pose = self._encode(self._pixels(cond.control))  # prepare_pose_latents
            _, _, latent_t, h, w = pose.shape
            if media["mode"] == "replace":  # the window's background, the mask inverted (prepare_prev_segment_...)
                video = self._pixels(media["background"])
                mask = media["mask"].float() / 255.0  # (n, H, W) in [0, 1]
                mask = 1 - mask[:, None].to(self.device)  # (n, 1, H, W)
                mask = F.interpolate(mask, size=(h, w), mode="nearest")[None].permute(0, 2, 1, 3, 4)
            else:  # animate: a black clip, mask 0 (no previous segment)
                video = torch.zeros(1, 3, n, *cond.control.shape[1:3])
                mask = None
            previous = torch.cat([self._i2v_mask(latent_t, h, w, mask, 0), self._encode(video)], dim=1)
            return pose.cpu(), previous.cpu()
        pose, previous = self._remember((media["key"], "window", start, end), make)
        return pose.to(self.device), previous.to(self.device), face.to(self.device)

    @torch.inference_mode()
    def predict(self, z: torch.Tensor, t: torch.Tensor, cond: AnimateConditioning, window: tuple[int, int],
                guidance: tuple[float, ...]) -> torch.Tensor:
        """One window as one of the pipeline's segments (module docstring): z is (1, C, 1 + L, h, w), the
        window's reference slot (its private frame) then its latent frames, with the reference, pose, face and
        previous-segment conditioning; guidance (one scale) as the pipeline's: the unconditional pass has the
        negative prompt and a blank face. Returns (1, C, 1 + L, h, w) float32, the slot's prediction first."""
        media = cond.media
        if media is None or cond.control is None:
            raise ValueError("Wan-Animate needs the reference and pose the engine attaches to the conditioning")
        (guidance,) = guidance
        expert = self.experts[0]
        start, end = window
        if z.shape[2] != 1 + end - start:
            raise ValueError(f"z: got {z.shape[2]} latent frames, expected the reference slot and the window's "
                             f"{end - start} ({1 + end - start})")
        slot_cond, image_embeds = self._reference(media)
        pose, previous, face = self._window(cond, *window)
        latents = z.to(self.device, torch.float32)  # (1, C, 1 + L, h, w)
        conditioning = torch.cat([slot_cond, previous], dim=2)  # (1, 4 + C, L + 1, h, w)
        x = torch.cat([latents, conditioning], dim=1).to(self.dtype)
        timestep = t.to(self.device).expand(1)
        kwargs = dict(hidden_states=x, timestep=timestep, encoder_hidden_states_image=image_embeds.to(self.dtype),
                      pose_hidden_states=pose.to(self.dtype), return_dict=False)
        text = cond.centre(*window).to(self.device, self.dtype)
        out = expert(encoder_hidden_states=text, face_pixel_values=face.to(self.dtype), **kwargs)[0]
        if guidance > 1:
            negative = cond.negative.to(self.device, self.dtype)
            uncond = expert(encoder_hidden_states=negative, face_pixel_values=(face * 0 - 1).to(self.dtype),
                            **kwargs)[0]
            out = uncond + guidance * (out - uncond)
        return out.float().cpu()

