"""Simulated family: a real model's geometry and data sizes, with simulated compute time.

Knows torch and diffusers (its scheduler) only. A directory whose model_index.json names
`LongtakeSimPipeline` holds `sim.json` (the geometry and timings below) and a diffusers scheduler config;
no weights. `--model sim:PRESET` builds one from `PRESETS` into the cache (`ensure_sim_model`).

What is real: every tensor that travels has the real model's shape (a window's latents, the text
conditioning, decoded frames), the scheduler is the real model's, the engine, the pools and the transfers
are the ones a real render uses. What is simulated: the predictor sleeps `predict_s` per window-step (half
without guidance: one pass instead of two) and returns a cheap deterministic function of its inputs; the
decoder sleeps `decode_s` per frame and makes frames from three latent channels (blended between latent
frames as a causal VAE's cache would carry them, upsampled bilinearly); the encoder
returns embeddings of the real shape drawn from a hash of the prompt. Frames therefore depend only on the
request (seed, prompts, window plan), never on timing, the pool or retries: determinism across pools,
retries and resumes means what it means for a real family. There is no diffusers pipeline to compare
with (the conformance suite says so, as it does for the bundled model).

Where the sizes come from (published configs; `source` in each preset):
- Wan 2.1 / 2.2 T2V 14B (Wan-AI/Wan2.1-T2V-14B-Diffusers): transformer in_channels 16, patch (1, 2, 2);
  AutoencoderKLWan z_dim 16, 8x spatial and 4x temporal compression, causal (4k+1 frames); UMT5-XXL
  d_model 4096 over 512 tokens; 81-frame windows (21 latent frames) at 1280x720 (90 x 160 latents).
- Wan-Animate 14B (Wan-AI/Wan2.2-Animate-14B-Diffusers): Wan's geometry, 77-frame windows (20 latent
  frames) plus a reference slot each (a private frame, as `wan_animate.py` carries it), the pose frames at
  the output size, face frames at the motion encoder's 512 px, the reference photo; `animate_mode`
  replace adds background and mask frames. The predictor reads its window's slice of each (sampled).
- AnimateDiff on SD 1.5 (guoyww/animatediff-motion-adapter-v1-5-2 + runwayml SD 1.5): UNet in_channels 4,
  VAE 8x spatial, no temporal compression; CLIP ViT-L/14 768 over 77 tokens; 16-frame windows at 512x512.

Time per window-step: `real_predict_s` is an H100 estimate of a window-step with guidance (two passes; one
pass, half of it, at guidance 1; see each preset's `timing`); `predict_s` is it divided by `compression`.
Compression overweights every cost that is not the model (driver, serialization, transfers, decode and
encode) by that factor: a run that meets its efficiency target compressed meets it with margin at real
speed. It is chosen so that the machine's cores are not what a scale bench measures: a 720p window-step
costs about 0.5 s of CPU on one box (the driver's fusion and scheduler step, Ray's transfers between the
simulated nodes, the workers' copies: `longtake bench --simulate` reports it), so 32 workers on 2 cores
stay near half busy only at a window-step of 16 s or more: compression 2 for the Wan presets. A
10-minute clip then takes about 14 minutes at 32 workers (and 55 at 8): the price of measuring on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from longtake.core.windows import TextConditioning
from longtake.pipelines import SIM_PREFIX as PREFIX
from longtake.pipelines import LatentLayout, ModelInfo, read_json
from longtake.pipelines.wan_animate import AnimateConditioning
from longtake.request import RequestError

CLASS_NAME = "LongtakeSimPipeline"
USES_DIFFUSERS = False  # its workers never import diffusers (the driver loads the scheduler): they start in a
# second or two, which a bench of 32 simulated workers on one box needs

# diffusers scheduler configs of the simulated models (what their model directories ship)
WAN_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                 "use_flow_sigmas": True, "flow_shift": 5.0, "num_train_timesteps": 1000}  # Wan 720p: shift 5
SD15_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "linear", "clip_sample": False, "steps_offset": 1,
                  "timestep_spacing": "linspace", "num_train_timesteps": 1000}

# Wan 14B at 720p, what Wan 2.1 / 2.2 T2V and Wan-Animate share: the VAE's compression, the DiT's patch, UMT5
WAN_720P = {"channels": 16, "spatial": 8, "temporal": 4, "causal": True, "patch": 2, "overlap": 5, "height": 720,
            "width": 1280, "fps": 16, "text_tokens": 512, "text_dim": 4096, "per_frame_text": False,
            "separate_encoder": True, "steps": 10, "scheduler": WAN_SCHEDULER, "compression": 2.0,
            "decode_s": 0.0005}

PRESETS = {
    "wan-14b-720p": {
        **WAN_720P,
        "source": "Wan-AI/Wan2.1-T2V-14B-Diffusers configs (Wan 2.2 T2V-A14B has the same geometry)",
        "native_window": 21, "guidance": 5.0, "animate": False, "face_size": 0, "real_predict_s": 35.0,
        "timing": "one H100, both guidance passes of 75,600 tokens (21 x 45 x 80): xDiT's published "
                  "HunyuanVideo 1280x720 figure (1,904 s for 50 single-pass steps of 118,800 tokens on one "
                  "H100, 38 s a pass) scaled by the attention-bound token ratio (about 0.46), times 2 passes",
    },
    "wan-animate-14b-720p": {
        "source": "Wan-AI/Wan2.2-Animate-14B-Diffusers configs: Wan's geometry, a reference slot per window, "
                  "pose frames at the output size, face frames at the motion encoder's 512 px",
        **WAN_720P,
        "native_window": 20, "guidance": 1.0, "animate": True, "face_size": 512, "real_predict_s": 40.0,
        "timing": "one H100, two passes of 75,600 tokens (20 latent frames + the slot) through 17.3 B "
                  "parameters: the Wan 14B estimate, x 1.15 for the face adapters and image cross-attention "
                  "(the pipeline's default guidance 1 runs one pass: half of it)",
    },
    "animatediff-sd15-512": {
        "source": "SD 1.5 UNet and VAE configs with AnimateDiff's motion adapter (16-frame windows)",
        "channels": 4, "spatial": 8, "temporal": 1, "causal": False, "patch": 1,
        "native_window": 16, "overlap": 4, "height": 512, "width": 512, "fps": 8,
        "text_tokens": 77, "text_dim": 768, "per_frame_text": True, "separate_encoder": False,
        "guidance": 7.5, "steps": 25, "scheduler": SD15_SCHEDULER, "animate": False, "face_size": 0,
        "real_predict_s": 0.35, "compression": 1.0, "decode_s": 0.0005,
        "timing": "one H100, a 16-frame 512x512 window with guidance batched (about 9 s for 25 steps)",
    },
}
FIELDS = tuple(PRESETS["animatediff-sd15-512"])  # what a sim.json holds (a preset with any of them overridden)


def sim_config(preset: str, **overrides) -> dict:
    """A preset's sim.json, with fields overridden (a test's reduced size, a bench's --predict-s)."""
    unknown = set(overrides) - set(FIELDS) - {"predict_s"}
    if unknown:
        raise ValueError(f"sim fields: got {sorted(unknown)}, expected some of {', '.join(FIELDS)}, predict_s")
    config = {**PRESETS[preset], "preset": preset, **overrides}
    if "predict_s" not in overrides:
        config["predict_s"] = config["real_predict_s"] / config["compression"]
    return config


def build_sim(out, preset: str = "wan-14b-720p", **overrides) -> Path:
    """Write a sim model directory: model_index.json, scheduler/scheduler_config.json, sim.json."""
    config = sim_config(preset, **overrides)
    out = Path(out)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = dict(config["scheduler"])
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
    (out / "model_index.json").write_text(json.dumps({"_class_name": CLASS_NAME,
                                                      "scheduler": ["diffusers", scheduler["_class_name"]]}))
    (out / "sim.json").write_text(json.dumps({k: v for k, v in config.items() if k != "scheduler"}, indent=1))
    return out


def ensure_sim_model(model: str, cache: Path) -> Path:
    """'sim:PRESET' -> its directory in the cache, written once (atomically). RequestError naming `model`."""
    from longtake.pipelines.tiny import build_once

    name = model[len(PREFIX):]
    if name not in PRESETS:
        raise RequestError("model", model, f"one of {', '.join(PREFIX + p for p in PRESETS)}")
    digest = hashlib.sha256(json.dumps(sim_config(name)).encode()).hexdigest()[:8]
    return build_once(cache / "models" / f"sim-{name}-{digest}", lambda out: build_sim(out, name))


def required_weights(index: dict) -> tuple[str, ...]:
    return ()  # no weights: sizes and timings only


def inspect(path: Path, index: dict, model: str) -> ModelInfo:
    sim = read_json(path / "sim.json", model)
    missing = [f for f in (*FIELDS, "predict_s") if f not in sim and f != "scheduler"]
    if missing:
        raise RequestError("model", model, f"a sim.json with {', '.join(missing)}")
    for name in ("predict_s", "decode_s"):
        if not (isinstance(sim[name], (int, float)) and sim[name] >= 0):
            raise RequestError("model", model, f"a sim.json whose {name} is a number >= 0 (got {sim[name]!r})")
    return ModelInfo(
        path=str(path),
        family="sim",
        layout=sim_layout(sim),
        native_window=int(sim["native_window"]),
        max_window=4 * int(sim["native_window"]),
        default_height=int(sim["height"]),
        default_width=int(sim["width"]),
        default_steps=int(sim["steps"]),
        default_guidance=float(sim["guidance"]),
        cuda_dtype="bfloat16",
        streamed_decode=bool(sim["causal"]),  # a causal VAE decodes in one ordered session
        separate_encoder=bool(sim["separate_encoder"]),
        options={"sim": sim, **(ANIMATE_OPTIONS | {"face_size": int(sim["face_size"])} if sim["animate"] else {})},
    )


# what the engine reads of an animating model (a reference photo and a pose, as Wan-Animate: wan_animate.py)
ANIMATE_OPTIONS = {"pose": True, "pose_required": True, "reference": "condition", "private_frames": 1,
                   "modes": ["animate", "replace"]}


def _prompt_embedding(text: str, tokens: int, dim: int) -> torch.Tensor:
    """(1, tokens, dim) float32 in [-1, 1], from the prompt's hash (a real encoder's output shape)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return torch.rand(1, tokens, dim, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class Backend:
    def __init__(self, info: ModelInfo, device: str = "cpu", dtype: str = "float32",
                 roles: tuple[str, ...] = ("encode", "predict", "decode")):
        self.sim = info.options["sim"]  # nothing to load or place: it computes on the CPU, whatever the device
        self.layout = info.layout

    def encode(self, prompts: list[str], negative_prompt: str, schedule) -> TextConditioning:
        """Key prompts + the per-latent-frame schedule -> conditioning of the real model's shape."""
        shape = (self.sim["text_tokens"], self.sim["text_dim"])
        keys = torch.cat([_prompt_embedding(p, *shape) for p in prompts])  # (K, tokens, dim)
        kind = AnimateConditioning if self.sim["animate"] else TextConditioning  # the engine attaches media
        return kind(keys, _prompt_embedding(negative_prompt, *shape), *schedule)

    @torch.inference_mode()
    def predict(self, z: torch.Tensor, t: torch.Tensor, cond: TextConditioning, window: tuple[int, int],
                guidance: tuple[float, ...]) -> torch.Tensor:
        """Sleeps the window-step's simulated time, then returns a cheap function of z, t and the window's
        own text (per frame, or the centre's, as the simulated model takes it), guidance applied."""
        passes = 2 if guidance[0] > 1 else 1
        time.sleep(self.sim["predict_s"] * passes / 2)
        # the text as the model takes it (per frame, or the window's centre), through its mean: the mean of an
        # interpolation is the interpolation of the means, so the keys are reduced first (cheap at 512 x 4096)
        means = TextConditioning(cond.keys.mean((1, 2), keepdim=True), cond.negative.mean((1, 2), keepdim=True),
                                 cond.a, cond.b, cond.alpha)
        if self.sim["per_frame_text"]:
            text = means.frames(*window).view(1, 1, -1, 1, 1)  # (1, 1, L, 1, 1)
        else:
            text = means.centre(*window).view(())
        level = float(t) / 1000 + (self._media_signal(cond, *window) if self.sim["animate"] else 0.0)
        shift = 0.1 * torch.tanh(4 * text) + 0.01 * level  # what the prompt adds
        if guidance[0] > 1:  # uncond + g (cond - uncond), the 0.5 z of both passes cancelling in the difference
            uncond = 0.1 * torch.tanh(4 * means.negative.view(())) + 0.01 * level
            shift = uncond + guidance[0] * (shift - uncond)
        return torch.add(shift, z, alpha=0.5).float()  # one pass over the window's latents

    def _media_signal(self, cond: AnimateConditioning, start: int, end: int) -> float:
        """A number from the window's own pose, face, background and mask frames and the reference photo
        (every 16th pixel of each: the frames a real predictor reads, sampled cheaply). z carries the
        window's reference slot first (its private frame), as Wan-Animate's."""
        media = cond.media
        if media is None or cond.control is None:
            raise ValueError("an animating model needs the reference and pose the engine attaches to the conditioning")
        total = float(media["reference"][::16, ::16].float().mean()) / 255
        for clip in (cond.control, media.get("face"), media.get("background"), media.get("mask")):  # the window's
            if clip is not None:
                total += float(clip[:, ::16, ::16].float().mean()) / 255
        return total

    def _frame_counts(self, n: int, first: bool) -> list[int]:
        temporal = self.layout.temporal
        return [1 if self.layout.causal and first and i == 0 else temporal for i in range(n)]

    def _pixels(self, z: torch.Tensor, first: bool, previous: torch.Tensor | None = None) -> np.ndarray:
        """(1, C, n, h, w) -> frames from channels 0-2: the k-th of the `temporal` frames a latent frame
        stands for is the blend (k + 1) / temporal of the way from the latent frame before it (`previous`:
        the last one of the stream's previous chunk, as a causal VAE's cache carries it) to it, so its last
        frame is the latent frame itself; then upsampled (bilinear: smooth as a VAE's frames, so H.264
        keeps them as it keeps real ones)."""
        latents = z[0, :3].transpose(0, 1).float()  # (n, 3, h, w)
        before = torch.cat([latents[:1] if previous is None else previous, latents[:-1]])  # (n, 3, h, w)
        blended = []
        for i, count in enumerate(self._frame_counts(len(latents), first)):
            for k in range(count):
                weight = (k + 1) / count
                blended.append(latents[i] if weight == 1 else (1 - weight) * before[i] + weight * latents[i])
        small = torch.stack(blended).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)  # (frames, 3, h, w)
        # uint8 in channels-last: a few ms a 720p frame on one thread (float32 takes ten times that)
        rgb = torch.nn.functional.interpolate(small.contiguous(memory_format=torch.channels_last),
                                              scale_factor=self.layout.spatial, mode="bilinear", align_corners=False)
        frames = rgb.permute(0, 2, 3, 1).contiguous().numpy()  # (frames, H, W, 3)
        time.sleep(self.sim["decode_s"] * len(frames))
        return frames

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Any chunk alone (no causal VAE), or the whole clip (a causal one's reference)."""
        return self._pixels(z, first=True)

    @torch.inference_mode()
    def decode_stream(self, z: torch.Tensor, chunk: int = 4):
        """One ordered session: the first latent frame is one frame (causal), the others `temporal` each,
        blended from the latent frame before (carried between chunks): frames equal one whole decode."""
        for s in range(0, z.shape[2], chunk):
            previous = z[0, :3, s - 1:s].transpose(0, 1).float() if s else None
            yield self._pixels(z[:, :, s:s + chunk], s == 0, previous)

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (1, C, n', h, w): the inverse of decode (each latent frame's last frame,
        averaged over each latent pixel's pixels, into channels 0-2; the others zero)."""
        c, spatial = self.layout.channels, self.layout.spatial
        n = self.layout.latent_frames(len(frames))
        last = np.cumsum(self._frame_counts(n, first=True)) - 1  # each latent frame's last frame
        x = torch.from_numpy(np.ascontiguousarray(frames[np.minimum(last, len(frames) - 1)]))
        x = x.float().div(127.5).sub(1).permute(0, 3, 1, 2)  # (n, 3, H, W)
        rgb = torch.nn.functional.avg_pool2d(x, spatial).transpose(0, 1).unsqueeze(0)  # (1, 3, n, h, w)
        return torch.cat([rgb, torch.zeros(1, c - 3, *rgb.shape[2:])], 1) if c > 3 else rgb[:, :c]


def sim_layout(sim: dict) -> LatentLayout:
    """A sim.json's (or `sim_config`'s) latent layout: its VAE's factors and the DiT's patch."""
    spatial, patch = int(sim["spatial"]), int(sim["patch"])
    return LatentLayout(channels=int(sim["channels"]), spatial=spatial, size_multiple=spatial * patch,
                        temporal=int(sim["temporal"]), causal=bool(sim["causal"]),
                        size_reason=f"the simulated VAE factor {spatial} x patch size {patch}")


def window_latent_bytes(info: ModelInfo) -> int:
    """Float32 bytes of one native window's latents at the model's default size (what a window call carries)."""
    c, h, w = info.layout.latent_shape(info.default_height, info.default_width)
    return 4 * c * info.native_window * h * w
