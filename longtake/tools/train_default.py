"""Train the bundled default model: a small pixel-space AnimateDiff-style video model.

    python -m longtake.tools.train_default --out DIR [--seed 0] [--device cuda] [--piece-minutes 10]

The shipped model is two runs (docs/models.md and the model card give the exact commands): stage 1 with
noise correlated across frames, stopped at step 6000 of a 9000-step schedule (`--stop-at`); stage 2
from its weights (`--init`) with independent noise per frame and a loss on the frame-to-frame
differences of the prediction (`--temporal-weight`), which make the model tie its frames together.

Resumable: every `--state-every` steps (and when a piece ends) the whole training state (weights, EMA,
optimizer, random generators, step, losses) is written atomically to OUT.state.safetensors (tensors
and JSON metadata, no pickle); a run started again with the same arguments continues from it, and a
run cut into pieces gives the same weights as one run.

Data: procedural clips from `shapes.py` (4 colours x 3 shapes x 6 motions x 4 backgrounds), made on
the fly. Model: diffusers classes only — UNet2DConditionModel + MotionAdapter -> UNetMotionModel on
RGB frames (16x16, 16 frames, rearranged space-to-depth to 8x8x12), a CLIP text encoder over a word
vocabulary, a DDIM scheduler. No VAE: frames are pixels, upscaled x4 on decode (64x64).
Trained to predict the clean clip (x0, "sample" prediction) with plain MSE, which puts the weight on
the noisy end where colour, shape and motion are decided; 10% caption dropout (for classifier-free
guidance) and an EMA of the weights, which is what ships. A cosine schedule, DDIM sampling with
trailing timesteps; half of every batch's timesteps are the ones the sampler visits (the 20-step grid,
which holds the default 10-step one), half uniform. The convolutions wrap around the frame edges as
the clips do (circular padding). longtake samples the model with the noise of its last stage
(`default_noise` in longtake.json). A run is deterministic for a seed and a step count on one machine
(torch threads fixed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from longtake.models.shapes import WORDS, sample_batch
from longtake.pipelines.animatediff import pooled_text_kwargs, wrap_convolutions
from longtake.pipelines.tiny import write_tokenizer_files
from longtake.core.windows import correlate_frames

logger = logging.getLogger("longtake.train")

SIZE, FRAMES, SHUFFLE, UPSCALE = 16, 16, 2, 4
TEXT_LR = 0.2  # the text encoder's learning rate, relative to the UNet's
NOISES = ("correlated", "independent")  # training noise across frames (the first is the default)
GRID_STEPS, GRID_SHARE = 20, 0.5  # half of every batch's timesteps come from the 20-step sampling grid
CONFIG = {  # longtake.json beside the weights: how longtake runs this model
    # the model denoises pixels rearranged space-to-depth (16x16x3 <-> 8x8x12, lossless), and the
    # 16x16 frames are upscaled x4 on decode: 64x64 output
    "pixel_space": True, "pixel_shuffle": SHUFFLE, "upscale": UPSCALE, "native_window": FRAMES,
    "default_steps": 10, "default_guidance": 2.0,
    # trained on frames that wrap around their edges; default_noise: the last stage's noise (save_model)
    "circular_padding": True, "default_noise": "correlated",
    # the caption also reaches every ResNet through the time embedding (mean of the text hidden states)
    "pooled_text": "mean",
}


def build_components(seed: int):
    from diffusers import DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # not in the working directory: runs may share it
        vocab, merges = write_tokenizer_files(Path(tmp), words=WORDS)
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1))
    # 16x16 frames (8x8 tokens of 2x2 pixels) see 3x the clips per second of 32x32 ones; earlier runs at
    # 32x32 and at 8x8x48 (4x4 patches) were undertrained in 60 CPU minutes (see the model card)
    channels = (32, 64, 64)
    unet2d = UNet2DConditionModel(
        sample_size=SIZE // SHUFFLE, in_channels=3 * SHUFFLE**2, out_channels=3 * SHUFFLE**2,
        block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=16, norm_num_groups=8,
        # a global path for the caption: cross-attention alone (at 4x4 and 2x2) left the text ignored
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 8)
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_num_attention_heads=4, motion_max_seq_length=FRAMES)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    # the clips wrap around the frame edges ("moving right" goes on for a minute): so do the convolutions,
    # and the model need not learn what happens at an edge
    wrap_convolutions(unet)
    # x0 ("sample") prediction: an undertrained model's errors are blur, not noise (v- and epsilon-
    # prediction left noisy frames after 60 CPU minutes), and plain MSE on x0 weighs the noisy steps that
    # decide colour, shape and motion; "trailing" spacing starts sampling at the true noise level
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              set_alpha_to_one=False, timestep_spacing="trailing", prediction_type="sample")
    return tokenizer, text_encoder, unet, scheduler


def save_model(out: Path, tokenizer, text_encoder, unet, scheduler, card: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    index = {"_class_name": "AnimateDiffPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNetMotionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": [None, None], "motion_adapter": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    # the model is sampled with the noise it was trained on
    config = CONFIG | {"default_noise": card.get("noise", CONFIG["default_noise"])}
    (out / "longtake.json").write_text(json.dumps(config, indent=2))
    (out / "training.json").write_text(json.dumps(card, indent=2))


WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def load_weights(model_dir: Path, unet, text_encoder) -> None:
    """The UNet's and text encoder's weights from a model directory this script wrote (safetensors)."""
    unet_file, text_file = WEIGHT_FILES
    unet.load_state_dict(load_file(str(model_dir / unet_file)))
    text_encoder.load_state_dict(load_file(str(model_dir / text_file)))


def weights_digest(model_dir: Path) -> str:
    """sha256 of a model directory's two weight files: what a second stage started from."""
    h = hashlib.sha256()
    for f in WEIGHT_FILES:
        h.update((model_dir / f).read_bytes())
    return h.hexdigest()


def check_stage(noise: str, temporal_weight: float, stop_at: int | None, max_steps: int | None,
                init: Path | None) -> None:
    """The second-stage options, before anything is built: a ValueError naming the option, value and what
    was expected."""
    if noise not in NOISES:
        raise ValueError(f"noise: got {noise!r}, expected one of {', '.join(NOISES)}")
    if not (math.isfinite(temporal_weight) and temporal_weight >= 0):
        raise ValueError(f"temporal_weight: got {temporal_weight!r}, expected a finite number >= 0")
    if stop_at is not None and not (max_steps and 1 <= stop_at <= max_steps):
        raise ValueError(f"stop_at: got {stop_at!r}, expected a step from 1 to max_steps ({max_steps}; needs --max-steps)")
    if init is not None:
        missing = [f for f in WEIGHT_FILES if not (Path(init) / f).is_file()]
        if missing:
            raise ValueError(f"init: got {str(init)!r}, expected a model directory this script wrote (no {missing[0]})")


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.safetensors")


def save_state(path: Path, run: dict, step: int, losses: list, modules: dict, opt, rng, gen, elapsed: float) -> None:
    """The whole training state in one safetensors file (written to a temporary file, then renamed)."""
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, entry in opt_state["state"].items():
        for k, v in entry.items():
            tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["torch_generator"] = gen.get_state()
    meta = {"run": json.dumps(run, sort_keys=True), "step": str(step), "losses": json.dumps(losses),
            "param_groups": json.dumps(opt_state["param_groups"]), "numpy_rng": json.dumps(rng.bit_generator.state),
            "elapsed": str(elapsed)}
    tmp = path.with_name("." + path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_state(path: Path, run: dict, modules: dict, opt, rng, gen, device: str) -> tuple[int, list, float] | None:
    """Continue from a saved state of the same run (same arguments); None if there is none."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if json.loads(meta["run"]) != run:
        raise SystemExit(f"{path} is the state of another run ({meta['run']}); delete it or use the same arguments")
    tensors = load_file(str(path), device="cpu")
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v if k == "step" else v.to(device)
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    rng.bit_generator.state = json.loads(meta["numpy_rng"])
    gen.set_state(tensors["torch_generator"])
    return int(meta["step"]), json.loads(meta["losses"]), float(meta["elapsed"])


def ema_update(pairs, decay: float) -> None:
    """Each (ema, live) module pair: ema = decay * ema + (1 - decay) * live."""
    with torch.no_grad():
        for ema, live in pairs:
            for pe, pl in zip(ema.parameters(), live.parameters()):
                pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)


def record_step(bar, losses: list, loss: torch.Tensor, step: int, t0: float) -> int:
    """Keep the step's loss, move the bar, log every 50 steps; returns the next step number."""
    losses.append(loss.item())
    step += 1
    bar.update()
    if step % 50 == 0:
        bar.set_postfix_str(f"loss {np.mean(losses[-50:]):.4f}")
        logger.info("step %d loss %.4f (%.0f s)", step, np.mean(losses[-50:]), time.time() - t0)
    return step


def train(out: Path, minutes: float, seed: int, batch: int, lr: float, max_steps: int | None, threads: int,
          save_every: int = 0, device: str = "cpu", state_every: int = 200, piece_minutes: float | None = None,
          piece_steps: int | None = None, init: Path | None = None, temporal_weight: float = 0.0,
          noise: str = NOISES[0], stop_at: int | None = None) -> dict | None:
    """Train (or continue a saved run of the same arguments). Returns the card, or None when a piece ended
    (piece_minutes / piece_steps) before the run did: its state is saved, run it again to go on.
    init: start from the weights of a model this script saved (a second stage; fresh optimizer and
    schedule). temporal_weight: add that weight times the MSE of the frame-to-frame differences of the
    x0 prediction (the motion) to the loss. noise: "correlated" (AR(1) across frames) or "independent"
    noise in training, and the default noise longtake samples the model with. stop_at: end the run at this
    step and write the model (the learning-rate schedule still spans max_steps; the state is kept, so the
    same command without it goes on): the weights equal the `save_every` snapshot of that step."""
    check_stage(noise, temporal_weight, stop_at, max_steps, init)
    torch.set_num_threads(threads)
    tokenizer, text_encoder, unet, scheduler = build_components(seed)
    if init is not None:
        load_weights(Path(init), unet, text_encoder)
    unet, text_encoder = unet.to(device), text_encoder.to(device)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = _optimizer(unet, text_encoder, lr)
    alphas = scheduler.alphas_cumprod.to(device)  # (T,)
    scheduler.set_timesteps(GRID_STEPS)
    grid = scheduler.timesteps.clone()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)  # on the CPU whatever the device: the same batches and noise
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    budget = minutes * 60
    # the step count is fixed by --max-steps when given (reproducible), else by the time budget
    total = max_steps or 10**9
    run, about = _run_and_about(seed, batch, lr, max_steps, threads, device, init, temporal_weight, noise)
    modules = {"unet": unet, "text": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    resumed = load_state(state_path(out), run, modules, opt, rng, gen, device) if max_steps else None
    step, losses, done_before = resumed or (0, [], 0.0)
    if resumed:
        logger.info("resumed at step %d of %d from %s", step, max_steps, state_path(out))
    t0 = time.time() - done_before  # train_seconds counts every piece
    piece_start, piece_first = time.time(), step
    bar = tqdm(total=max_steps, initial=step, desc="train", unit="step")
    end = min(total, stop_at) if stop_at and max_steps else total
    while step < end and (max_steps or time.time() - t0 < budget):
        if max_steps and ((piece_minutes is not None and time.time() - piece_start > piece_minutes * 60)
                          or (piece_steps is not None and step - piece_first >= piece_steps)):
            save_state(state_path(out), run, step, losses, modules, opt, rng, gen, time.time() - t0)
            bar.close()
            logger.info("piece ended at step %d of %d; state in %s: run again to go on", step, max_steps,
                        state_path(out))
            return None
        x0, ids = _clip_batch(rng, gen, tokenizer, empty, batch, device)
        xt, t = _noised(x0, alphas, grid, scheduler.config.num_train_timesteps, gen, noise)
        loss = _loss(unet, text_encoder, xt, t, ids, x0, temporal_weight)
        progress = step / max_steps if max_steps else (time.time() - t0) / budget
        _optimizer_step(opt, params, loss, step, progress)
        ema_update(((ema_unet, unet), (ema_text, text_encoder)), min(0.998, (1 + step) / (10 + step)))  # ~500 steps
        step = record_step(bar, losses, loss, step, t0)
        if save_every and step % save_every == 0:  # snapshots to look at mid-run; they do not change the run
            save_model(out.with_name(out.name + f"-step{step}"), tokenizer, ema_text, ema_unet, scheduler,
                       _card(seed, step, batch, lr, threads, t0, losses) | about)
        if max_steps and state_every and step % state_every == 0 and step < total:
            save_state(state_path(out), run, step, losses, modules, opt, rng, gen, time.time() - t0)
    bar.close()
    card = _card(seed, step, batch, lr, threads, t0, losses) | about
    save_model(out, tokenizer, ema_text.cpu(), ema_unet.cpu(), scheduler, card)
    if step < total and max_steps:  # stopped early (stop_at): the run can go on from here
        save_state(state_path(out), run, step, losses, modules, opt, rng, gen, time.time() - t0)
        return card
    state_path(out).unlink(missing_ok=True)
    return card


def _card(seed, step, batch, lr, threads, t0, losses) -> dict:
    return {"seed": seed, "steps": step, "batch": batch, "frames": FRAMES, "size": SIZE, "lr": lr, "text_lr": TEXT_LR,
            "grid_steps": GRID_STEPS, "grid_share": GRID_SHARE,
            "threads": threads, "train_seconds": round(time.time() - t0, 1),
            "final_loss": round(float(np.mean(losses[-200:])), 5), "loss_curve": [round(float(np.mean(losses[i:i + 100])), 5)
                                                                             for i in range(0, len(losses), 100)]}


def _optimizer(unet, text_encoder, lr: float) -> torch.optim.AdamW:
    """AdamW over both models, each group with its `base_lr` (the schedule scales it every step)."""
    # the text encoder learns at a fifth of the UNet's rate: at the full rate its outputs for different
    # captions collapsed within 1000 steps (black and white backgrounds 0.7 apart, norm 8) and the UNet
    # learned to ignore the text
    return torch.optim.AdamW([{"params": list(unet.parameters()), "base_lr": lr},
                              {"params": list(text_encoder.parameters()), "base_lr": lr * TEXT_LR}],
                             lr=lr, weight_decay=0.01)


def _run_and_about(seed: int, batch: int, lr: float, max_steps: int | None, threads: int, device: str,
                   init: Path | None, temporal_weight: float, noise: str) -> tuple[dict, dict]:
    """The run's identity (a saved state continues only the same run) and what the card says beyond `_card`."""
    run = {"seed": seed, "batch": batch, "lr": lr, "max_steps": max_steps, "threads": threads, "device": device}
    stage = {"init": weights_digest(Path(init)) if init is not None else None, "temporal_weight": temporal_weight,
             "noise": noise if noise != NOISES[0] else None}
    stage = {k: v for k, v in stage.items() if v}  # (only when set: states of first-stage runs stay valid)
    run |= stage
    about = {"device": device, "max_steps": max_steps} | stage  # for the card
    if init is not None and (Path(init) / "training.json").is_file():  # a second stage: the card tells both
        about["first_stage"] = json.loads((Path(init) / "training.json").read_text())
    return run, about


def _clip_batch(rng, gen, tokenizer, empty, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of procedural clips as the model sees them, and their captions' token ids with 10% replaced
    by the empty caption (for classifier-free guidance)."""
    clips, captions = sample_batch(rng, batch, FRAMES, SIZE)
    x0 = torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 1, 4, 2, 3).to(device)  # (B, F, 3, H, W)
    x0 = F.pixel_unshuffle(x0.flatten(0, 1), SHUFFLE).unflatten(0, (batch, FRAMES)).transpose(1, 2)  # (B, 3*s*s, F, h, w)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    drop = torch.rand(batch, generator=gen) < 0.1
    ids[drop] = empty
    return x0, ids.to(device)


def _noised(x0: torch.Tensor, alphas: torch.Tensor, grid: torch.Tensor, train_timesteps: int, gen,
            noise: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips noised to random timesteps: (x_t, t)."""
    batch, device = len(x0), x0.device
    # half the timesteps are the ones the sampler visits (the trailing 20-step grid, which holds the
    # 10-step grid), half uniform over all: the capacity goes where sampling asks, other step counts
    # still work
    t = torch.randint(0, train_timesteps, (batch,), generator=gen)
    on_grid = torch.rand(batch, generator=gen) < GRID_SHARE
    t = torch.where(on_grid, grid[torch.randint(0, len(grid), (batch,), generator=gen)], t).to(device)
    # "correlated": AR(1) across frames (rho 0.9), neighbouring frames start from similar noise (stage 1);
    # "independent": the model must tie the frames together itself (stage 2)
    eps = torch.randn(x0.shape, generator=gen)
    eps = (correlate_frames(eps, dim=2) if noise == "correlated" else eps).to(device)
    a = alphas[t].view(-1, 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t


def _loss(unet, text_encoder, xt: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, x0: torch.Tensor,
          temporal_weight: float) -> torch.Tensor:
    """The x0 prediction's MSE, plus `temporal_weight` times that of its frame-to-frame differences."""
    hidden = text_encoder(ids)[0].repeat_interleave(FRAMES, dim=0)  # (B*F, seq, dim)
    pred = unet(xt, t, encoder_hidden_states=hidden, added_cond_kwargs=pooled_text_kwargs(hidden, len(x0))).sample
    loss = F.mse_loss(pred, x0)  # x0 prediction
    if temporal_weight:  # the motion: frame-to-frame differences (same optimum, more weight on time)
        loss = loss + temporal_weight * F.mse_loss(pred.diff(dim=2), x0.diff(dim=2))
    return loss


def _optimizer_step(opt, params: list, loss: torch.Tensor, step: int, progress: float) -> None:
    """Backpropagate, clip the gradient norm to 1, set the learning rate for this point of the run, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for g in opt.param_groups:  # short warm-up, then cosine decay over the run
        g["lr"] = g["base_lr"] * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    opt.step()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write the model to")
    p.add_argument("--minutes", type=float, default=45, help="time budget when --max-steps is not given")
    p.add_argument("--max-steps", type=int, default=9000, help="train exactly this many steps (reproducible); 0: use --minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (2 on the reference machine)")
    p.add_argument("--save-every", type=int, default=0, help="also save the EMA model every N steps to OUT-stepN")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    p.add_argument("--state-every", type=int, default=200, help="save the resumable state every N steps (default 200)")
    p.add_argument("--piece-minutes", type=float, help="stop after this many minutes, state saved; run the same "
                                                       "command again to go on (default: run to the end)")
    p.add_argument("--init", type=Path, help="start from this model's weights (a second stage)")
    p.add_argument("--temporal-weight", type=float, default=0.0,
                   help="weight of a loss on the frame-to-frame differences of the prediction (default 0)")
    p.add_argument("--stop-at", type=int, help="end the run at this step and write the model (the schedule still "
                                               "spans --max-steps)")
    p.add_argument("--noise", choices=NOISES, default=NOISES[0],
                   help="training noise across frames, and the model's default noise in longtake (default correlated)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        check_stage(args.noise, args.temporal_weight, args.stop_at, args.max_steps or None, args.init)
    except ValueError as e:
        p.error(str(e))  # exit 2, before anything is built
    card = train(Path(args.out), args.minutes, args.seed, args.batch, args.lr, args.max_steps or None, args.threads,
                 args.save_every, args.device, args.state_every, args.piece_minutes, init=args.init,
                 temporal_weight=args.temporal_weight, noise=args.noise, stop_at=args.stop_at)
    if card is None:
        return
    logger.info("done: %d steps in %.0f s, final loss %.4f -> %s", card["steps"], card["train_seconds"],
                card["final_loss"], args.out)


if __name__ == "__main__":
    main()
