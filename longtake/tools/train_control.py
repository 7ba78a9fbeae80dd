"""Train the bundled model's control branch: a small ControlNet that makes the object follow a silhouette.

    python -m longtake.tools.train_control --model longtake/models/default [--max-steps 800] [--device cuda]

For the bundled model the "pose" of an object is its silhouette: a mask video (white on black, any size),
read like a pose video and given to the model as control frames at the output size (64x64). This trains a
diffusers `ControlNetModel` for it on the procedural shapes (`shapes.sample_control_batch`: the captioned
motions and free paths — circles, figure eights, lines in any direction, wanders — with their silhouettes)
while the model's UNet and text encoder stay frozen, and writes it into the model directory as
`controlnet/`, turning the directory into an `AnimateDiffControlNetPipeline` one, and sets longtake.json's
"planner": a request from text alone whose prompts name a shape and a motion then gets a silhouette path
drawn from those words (`models/planner.py`) as its pose. Without a pose or a plan (`plan="none"`, or
prompts the planner cannot read), renders are unchanged: the ControlNet only runs with control frames.

The ControlNet is the UNet's encoder half (its weights copied from the UNet, as ControlNet training
starts), per frame, without the caption's "text_time" path (it need not know what, only where), with the
convolutions wrapping around the frame edges as the UNet's do; the silhouette enters through a
conditioning embedding of three stride-2 convolutions (64x64 -> the UNet's 8x8), and every residual starts
at zero (zero convolutions), so at step 0 the model renders exactly as without it. Loss: the model's own
x0 MSE, with the object's pixels weighted 5x (the silhouette covers a tenth of the frame; the optimum is
unchanged). 10 % of captions are dropped (classifier-free guidance runs the ControlNet on both passes).

Resumable and reproducible as train_default (same state file format: OUT.state.safetensors beside the
model directory's controlnet/; the same arguments continue a run; a run cut in pieces equals one run).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longtake.models.planner import PLANNERS
from longtake.models.shapes import sample_control_batch
from longtake.tools.train_default import (FRAMES, GRID_SHARE, GRID_STEPS, SHUFFLE, SIZE, UPSCALE, build_components,
                                           ema_update, load_state, load_weights, pooled_text_kwargs, record_step,
                                           save_state, weights_digest)
from longtake.pipelines.animatediff import wrap_convolutions

logger = logging.getLogger("longtake.train_control")

MASK = SIZE * UPSCALE  # control frames come at the output size (64x64)
OBJECT_WEIGHT = 5.0  # the loss weight of the object's pixels (the background's is 1)


def build_controlnet(unet) -> torch.nn.Module:
    """A ControlNetModel with the UNet's encoder layout and weights (zero residual convolutions)."""
    from diffusers import ControlNetModel

    c = unet.config
    controlnet = ControlNetModel(
        in_channels=c.in_channels, conditioning_channels=3, down_block_types=(
            "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block, cross_attention_dim=c.cross_attention_dim,
        attention_head_dim=c.num_attention_heads, norm_num_groups=c.norm_num_groups,
        # 64x64 silhouettes -> the UNet's 8x8: three stride-2 convolutions
        conditioning_embedding_out_channels=(8, 16, 32, 32))
    own = controlnet.state_dict()
    copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
    controlnet.load_state_dict(copied, strict=False)
    logger.info("control branch: %d of %d tensors copied from the UNet", len(copied), len(own))
    wrap_convolutions(controlnet)  # the silhouettes wrap around the frame edges too
    return controlnet


def state_file(model: Path) -> Path:
    return model / "controlnet.state.safetensors"


def save_controlnet(model: Path, controlnet, card: dict) -> None:
    """controlnet/ into the model directory, model_index.json naming it (AnimateDiffControlNetPipeline), and
    longtake.json's planner: text-only requests get a motion plan drawn as silhouettes (models/planner.py)."""
    controlnet.save_pretrained(model / "controlnet", safe_serialization=True)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "AnimateDiffControlNetPipeline"
    index["controlnet"] = ["diffusers", "ControlNetModel"]
    (model / "model_index.json").write_text(json.dumps(index, indent=2))
    options = json.loads((model / "longtake.json").read_text())
    options["planner"] = PLANNERS[0]
    (model / "longtake.json").write_text(json.dumps(options, indent=2))
    (model / "controlnet" / "training.json").write_text(json.dumps(card, indent=2))


def train(model: Path, seed: int, batch: int, lr: float, max_steps: int, threads: int, device: str = "cpu",
          state_every: int = 100, piece_minutes: float | None = None, piece_steps: int | None = None) -> dict | None:
    """Train the control branch of the model in `model` (its UNet and text encoder frozen). Returns the card,
    or None when a piece ended first (state saved: run again to go on)."""
    torch.set_num_threads(threads)
    tokenizer, text_encoder, unet, scheduler = build_components(seed)
    load_weights(model, unet, text_encoder)
    unet, text_encoder = unet.to(device).eval().requires_grad_(False), text_encoder.to(device).eval().requires_grad_(False)
    torch.manual_seed(seed)
    controlnet = build_controlnet(unet).to(device).train()
    ema = copy.deepcopy(controlnet).requires_grad_(False)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=0.01)
    alphas = scheduler.alphas_cumprod.to(device)
    scheduler.set_timesteps(GRID_STEPS)
    grid = scheduler.timesteps.clone()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    base = weights_digest(model)
    run = {"seed": seed, "batch": batch, "lr": lr, "max_steps": max_steps, "threads": threads, "device": device,
           "base": base, "object_weight": OBJECT_WEIGHT}
    modules = {"controlnet": controlnet, "ema": ema}
    resumed = load_state(state_file(model), run, modules, opt, rng, gen, device)
    step, losses, done_before = resumed or (0, [], 0.0)
    t0, piece_start, piece_first = time.time() - done_before, time.time(), step
    bar = tqdm(total=max_steps, initial=step, desc="train control", unit="step")
    while step < max_steps:
        if ((piece_minutes is not None and time.time() - piece_start > piece_minutes * 60)
                or (piece_steps is not None and step - piece_first >= piece_steps)):
            save_state(state_file(model), run, step, losses, modules, opt, rng, gen, time.time() - t0)
            bar.close()
            logger.info("piece ended at step %d of %d: run again to go on", step, max_steps)
            return None
        clips, masks, captions = sample_control_batch(rng, batch, FRAMES, SIZE, MASK)
        x0 = torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 1, 4, 2, 3).to(device)  # (B, F, 3, H, W)
        x0 = F.pixel_unshuffle(x0.flatten(0, 1), SHUFFLE).unflatten(0, (batch, FRAMES)).transpose(1, 2)  # (B, 12, F, h, w)
        control = torch.from_numpy(masks).float().div(255).flatten(0, 1)[:, None].expand(-1, 3, -1, -1).to(device)
        # the object's pixels, in the model's layout (space-to-depth of the 16x16 silhouette)
        inside = F.avg_pool2d(control[:, :1], UPSCALE)  # (B*F, 1, 16, 16)
        weight = 1 + (OBJECT_WEIGHT - 1) * F.pixel_unshuffle(inside.expand(-1, 3, -1, -1), SHUFFLE)
        weight = weight.unflatten(0, (batch, FRAMES)).transpose(1, 2)  # (B, 12, F, h, w)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        ids[torch.rand(batch, generator=gen) < 0.1] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        on_grid = torch.rand(batch, generator=gen) < GRID_SHARE
        t = torch.where(on_grid, grid[torch.randint(0, len(grid), (batch,), generator=gen)], t).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)  # independent noise: the model's default
        a = alphas[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.no_grad():
            hidden = text_encoder(ids.to(device))[0].repeat_interleave(FRAMES, dim=0)  # (B*F, seq, dim)
        frames_in = xt.transpose(1, 2).flatten(0, 1)  # (B*F, 12, h, w)
        down, mid = controlnet(frames_in, t.repeat_interleave(FRAMES), encoder_hidden_states=hidden,
                               controlnet_cond=control, return_dict=False)
        pred = unet(xt, t, encoder_hidden_states=hidden, added_cond_kwargs=pooled_text_kwargs(hidden, batch),
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = (weight * (pred - x0) ** 2).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        for g in opt.param_groups:  # warm-up, then cosine decay to a tenth
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max_steps)))
        opt.step()
        ema_update(((ema, controlnet),), min(0.995, (1 + step) / (10 + step)))  # ~200-step horizon
        step = record_step(bar, losses, loss, step, t0)
        if state_every and step % state_every == 0 and step < max_steps:
            save_state(state_file(model), run, step, losses, modules, opt, rng, gen, time.time() - t0)
    bar.close()
    card = {"seed": seed, "steps": step, "batch": batch, "lr": lr, "threads": threads, "device": device,
            "base_weights": base, "object_weight": OBJECT_WEIGHT, "mask_size": MASK,
            "train_seconds": round(time.time() - t0, 1), "final_loss": round(float(np.mean(losses[-100:])), 5),
            "loss_curve": [round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)]}
    save_controlnet(model, ema.cpu(), card)
    state_file(model).unlink(missing_ok=True)
    return card


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a model directory train_default wrote (gets controlnet/)")
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2, help="torch threads (2 on the reference machine)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--state-every", type=int, default=100, help="save the resumable state every N steps")
    p.add_argument("--piece-minutes", type=float, help="stop after this many minutes, state saved; run the same "
                                                       "command again to go on")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.max_steps < 1:
        p.error(f"--max-steps: got {args.max_steps}, expected at least 1")
    if not (args.model / "unet" / "config.json").is_file():
        p.error(f"--model: got {str(args.model)!r}, expected a model directory train_default wrote")
    card = train(args.model, args.seed, args.batch, args.lr, args.max_steps, args.threads, args.device,
                 args.state_every, args.piece_minutes)
    if card is not None:
        logger.info("done: %d steps in %.0f s, final loss %.4f -> %s/controlnet", card["steps"],
                    card["train_seconds"], card["final_loss"], args.model)


if __name__ == "__main__":
    main()
