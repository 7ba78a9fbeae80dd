"""Write MODEL_CARD.md beside a trained default model, from its training.json and EVAL.md.

    python -m longtake.tools.card longtake/models/default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from longtake.models.shapes import BACKGROUNDS, MOTIONS, OBJECT_COLORS, SHAPES
from longtake.core.windows import NOISE_CORRELATION


def write_card(model_dir: str | Path) -> Path:
    """MODEL_CARD.md in `model_dir`, from its training.json, configs and eval tables; returns its path."""
    d = Path(model_dir)
    t = json.loads((d / "training.json").read_text())
    lt = json.loads((d / "longtake.json").read_text())
    sections = [INTRO, _data(t), _architecture(d, t, lt), _training(t, lt), _evaluation(d)]
    out = d / "MODEL_CARD.md"
    out.write_text("\n\n".join(sections))
    return out


INTRO = """# longtake default model

A small text-to-video diffusion model trained by `python -m longtake.tools.train_default` on
procedural clips, shipped inside the package so longtake renders something watchable on a laptop CPU."""


def _data(t: dict) -> str:
    """The procedural clips the model was trained on: their words, sizes and motion."""
    return f"""## Data
Generated on the fly by `longtake/models/shapes.py`: one object of {len(OBJECT_COLORS)} colours
({", ".join(OBJECT_COLORS)}) and {len(SHAPES)} shapes ({", ".join(SHAPES)}) over {len(BACKGROUNDS)} plain
backgrounds ({", ".join(BACKGROUNDS)}; never blue on blue), moving {", ".join(MOTIONS)} (directions wrap
around the frame edges; "bouncing" is a vertical bounce). Captions are built from those words:
"a red ball moving right on a blue background". {t['frames']} frames of {t['size']}x{t['size']} per clip; objects of
radius 0.17-0.21 of the frame, moving about 1 pixel per frame (0.85-1.05 at 16 px: a window crosses the
frame once)."""


def _architecture(d: Path, t: dict, lt: dict) -> str:
    """The diffusers classes and their sizes, from the model's configs."""
    unet = json.loads((d / "unet" / "config.json").read_text())
    text = json.loads((d / "text_encoder" / "config.json").read_text())
    sched = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    objective = {"sample": "x0 (sample) prediction", "v_prediction": "v-prediction"}.get(sched["prediction_type"],
                                                                                      "epsilon prediction")
    size_mb = sum(f.stat().st_size for f in d.rglob("*.safetensors")) / 2**20
    text_path = (" The caption also reaches every ResNet through the time embedding (diffusers' `text_time`\n"
                 "  addition, fed the mean of the text encoder's hidden states)." if lt.get("pooled_text") else "")
    wrap = ("\n- Circular padding: the convolutions wrap around the frame edges, as the clips do." if
            lt.get("circular_padding") else "")
    noise = (f"\n- Initial noise {lt['default_noise']} across frames (AR(1), correlation {NOISE_CORRELATION} between neighbours), in\n"
             "  training and in longtake's sampling." if lt.get("default_noise") == "correlated" else
             "\n- Initial noise independent for every frame, in training (the last stage) and in longtake's sampling.")
    return f"""## Architecture
diffusers classes only, run by the same AnimateDiff backend as real models:
- `UNetMotionModel` (UNet2DConditionModel + MotionAdapter), blocks {unet['block_out_channels']},
  {unet['layers_per_block']} layer per block, cross-attention at the two lower resolutions, motion modules
  at every resolution (max {unet.get('motion_max_seq_length')} frames).{text_path}{wrap}{noise}
- Pixel space, no VAE: the model denoises frames rearranged space-to-depth
  ({t['size']}x{t['size']}x3 <-> {t['size'] // lt['pixel_shuffle']}x{t['size'] // lt['pixel_shuffle']}x{3 * lt['pixel_shuffle'] ** 2},
  lossless); decoding is the inverse rearrangement and a x{lt['upscale']} bilinear upscale to
  {t['size'] * lt['upscale']}x{t['size'] * lt['upscale']}.
- `CLIPTextModel` ({text['num_hidden_layers']} layers, width {text['hidden_size']}) over a word vocabulary written locally.
- DDIM scheduler, cosine betas, {objective}, trailing timestep spacing, clipped x0 estimates; defaults
  {lt['default_steps']} steps, guidance {lt['default_guidance']}.
- Weights: {size_mb:.1f} MB of safetensors (EMA of the trained weights)."""


def _training(t: dict, lt: dict) -> str:
    """The shipped model's training runs (one paragraph per stage), then the runs not shipped."""
    stages = _stages(t)
    training = "".join(_stage(s, lt, k + 1 if len(stages) > 1 else None) for k, s in enumerate(stages))
    return f"## Training\n{training}\n{RUNS_NOT_SHIPPED}"


RUNS_NOT_SHIPPED = """Runs not shipped (all on 2 threads; the eval is the same 50 + 1 clips):
1. Epsilon prediction with leading timesteps: loss 0.043, noisy samples (the first x0 estimates
   divide by sqrt(alpha_bar) ~ 0).
2. The model shipped before run 6: 32x32 frames (16x16x12), v-prediction, no pooled text, zero padding,
   independent noise, lr 0.001 for the text encoder too, batch 6, 1800 steps, 50.9 minutes, final loss
   0.0937. Colour accuracy 0.26, motion 0.16, seam continuity 1.115 (naive windows 1.49), colour drift
   8.4 and size ratio 0.93 over 30 s, at guidance 9.
3. The same data at 8x8x48 (pixel shuffle 4) with blocks (64, 64, 64), batch 12, 2700 steps, half the
   timesteps from the noisier half: 3x the clips per second, 60.5 minutes, but noisy frames without a
   coherent object (colour right for 1 of 8 probe prompts).
4. 16x16 frames (8x8x12, 3x the clips per second), x0 ("sample") prediction, the text encoder at a
   fifth of the learning rate, batch 8, 3800 steps, 51.9 minutes, final loss 0.0222. Clean frames and
   solid objects, colour accuracy 0.34 and motion accuracy 0.16 at guidance 9, but objects that fade in
   and out: seam continuity 2.07 (naive windows 9.85) and colour drift 38.8 over 30 s. Two findings on
   the way: at the full learning rate the text encoder's outputs for different captions collapsed
   (black and white backgrounds 0.7 apart at norm 8) and the UNet learned to ignore the text; and with
   v-prediction a 16x16 model still drew pure noise after 750 steps, where x0 prediction drew clean
   frames with the prompt's background after 530.
5. Run 4 with circular padding and correlated noise, without the pooled text: stopped at step 1700 of
   3200. At steps 800 and 1600 its x0 prediction at t=999 had the same background for every caption but
   "black", although the text encoder's outputs for the four backgrounds were 1.2 to 4.8 apart (norm
   about 6): the UNet read the caption only through cross-attention at 4x4 and 2x2, and ignored it.
   With the pooled text (run 6) all four backgrounds were right at t=999 by step 800.
6. Model v1, shipped before this one: run 5 with the pooled text, 3200 steps of batch 8 with uniform
   timesteps, 51.7 minutes, final loss 0.0245, default 20 steps; objects of radius 0.13-0.17 of the frame
   moving 0.5-0.8 pixels per frame. Colour accuracy 0.60, motion accuracy 0.08 (left, up and still 0.00),
   seam continuity 1.23 (naive windows 1.57), drift 2.5 and 1.10 over 30 s, and objects that faded out:
   visible in 0.69 of the frames of the ten 60 s renders (lowest 0.29).
7. Stage 1 of the shipped model alone (the weights at its step 6000). Probes (10 held-out clips of 4 s
   and a 30 s render of the demo prompt, seeds not the eval's): colour 1.00, visible 0.94, but motion 0.10.
   The positions followed the noise, not the prompt: with the same seed, "still" and "moving right" drew
   the same path, wandering with the AR(1) noise; sampled with noise correlation 0.97 instead of 0.9,
   every object stood still whatever the prompt. The temporal layers did little: on a noised still clip
   at t=700 the x0 error was 0.043 with the 16 frames together and 0.048 frame by frame. Correlated noise
   gives a model little reason to pool its frames (they share most of their noise), hence stage 2.

Stages 1 and 2 (v2) changed four things against v1, each aimed at one of its failures:
objects 1.6x the area and motion of about a pixel per frame (v1's half-pixel steps at 16 px came out as
"still" or as nothing); half of each batch on the sampler's own timesteps (the tiny model's capacity
goes where sampling asks, and 10 steps suffice: the default render is twice as fast); 3.9x the steps;
and a second stage with independent noise per frame and a loss on the frame-to-frame differences of the
prediction (the motion; the optimum is the same, the weight on time larger), so that the frames must
be tied together by the model. Probes of stage 2: after 1500 steps colour 1.00, motion 0.30, visible
0.99, the paths continuous; after 3000 and 4500, motion 0.50 (on the eval's 50 clips the shipped model
scores 0.20: ten probe clips were too few). What is left for motion: "still" objects creep (median 0.3
pixel a frame at 16 px against the eval's 0.1) and moving ones wobble and move slower than trained.

Stages 3 and 4 (this version, v3): stage 3 trained the stage-2 weights (v2, shipped before) 10,000 more
steps with the motion loss at weight 3 and learning rate 5e-4. Alone it met the seam target (1.149 on the
full eval) and moved better (motion 0.32), but objects faded on low-contrast prompts: visible in 0.935 of
the frames of the ten 60 s renders, the blue square on black only 0.70 and 0.74 (dim, half-drawn).
Probes (18 clips) every 2500 steps put its seam at 1.33, 1.19, 1.30 and 1.15: the motion loss smooths
the seams. Stage 4, 2500 steps at learning rate 2e-4 with the motion loss back at weight 1, kept the
seams and brought the objects back. Against v2 on the full eval: seam continuity 1.47 -> 1.15, motion
accuracy 0.20 -> 0.38, visible 1.00 -> 0.96 (lowest render 0.998 -> 0.82, the blue square on black),
colour accuracy 1.00 -> 0.94, colour drift over 30 s 0.42 -> 2.41.

Guidance (measured on run 6): x0 prediction extrapolated by classifier-free guidance overshoots. At guidance 9, run 6's
half-trained snapshot drew white backgrounds for "black" prompts that guidance 1 drew right. On 24
held-out prompts and seeds (not the eval's), colour accuracy was 0.67, 0.75, 0.71 and 0.50 at guidance
1, 2, 3 and 5 (motion 0.21 to 0.25): the default is 2."""


def _stages(t: dict) -> list[dict]:
    """The training runs of a model, first to last (each `--init` stage embeds the card it started from)."""
    return (_stages(t["first_stage"]) if t.get("first_stage") else []) + [t]


def _stage(t: dict, lt: dict, number: int | None) -> str:
    """One training run's paragraph (a model trained in stages has one per stage)."""
    text_lr = f" (the text encoder at {t['text_lr']} of it)" if t.get("text_lr") else ""
    grid = (f"{t['grid_share']:.0%} of every batch's timesteps from the {t['grid_steps']}-step sampling grid (which holds\n"
            f"the default {lt['default_steps']}-step one), the rest uniform, " if t.get("grid_share") else "")
    curve = ", ".join(f"{v:.3f}" for v in t["loss_curve"][:: max(1, len(t["loss_curve"]) // 10)])
    steps = (f"{t['steps']} steps (of a {t['max_steps']}-step schedule, `--stop-at {t['steps']}`)"
             if t.get("max_steps") and t["max_steps"] > t["steps"] else f"{t['steps']} steps")
    start = f"from stage {number - 1 if number else 1}'s weights (`--init`), " if t.get("init") else ""
    noise = f"{t.get('noise', 'correlated')} noise, "
    motion = f"the motion loss at weight {t['temporal_weight']} (`--temporal-weight`), " if t.get("temporal_weight") else ""
    head = f"Stage {number}: " if number else ""
    return (f"{head}{start}seed {t['seed']}, {steps} of batch {t['batch']} clips, AdamW lr {t['lr']}{text_lr} (warm-up,\n"
            f"cosine decay), 10% caption dropout, {noise}{motion}{grid}{t['threads']} torch threads:\n"
            f"{t['train_seconds'] / 60:.1f} minutes on a 2-core CPU. Final loss (mean of the last 200 steps): {t['final_loss']}.\n"
            f"Loss every 100 steps (sampled): {curve}.\n\n")


def _evaluation(d: Path) -> str:
    """The eval tables beside the model (EVAL.md, MODES_EVAL.md) and the control branch's section."""
    evaluation = (d / "EVAL.md").read_text() if (d / "EVAL.md").is_file() else "(not evaluated yet: run `longtake eval`)"
    modes = ("\n" + (d / "MODES_EVAL.md").read_text()) if (d / "MODES_EVAL.md").is_file() else ""
    return f"## Evaluation\n{evaluation}{modes}{_control(d)}"


def _control(d: Path) -> str:
    """The control branch's section (controlnet/training.json, POSE_EVAL.md), if the model has one."""
    if not (d / "controlnet" / "training.json").is_file():
        return ""
    c = json.loads((d / "controlnet" / "training.json").read_text())
    cfg = json.loads((d / "controlnet" / "config.json").read_text())
    size_mb = sum(f.stat().st_size for f in (d / "controlnet").glob("*.safetensors")) / 2**20
    pose = (d / "POSE_EVAL.md").read_text() if (d / "POSE_EVAL.md").is_file() else "(not evaluated yet: run `longtake eval --suite pose`)"
    return f"""
## Control branch (silhouette paths)
`controlnet/`: a diffusers `ControlNetModel` trained by `python -m longtake.tools.train_control` with the
model above frozen, so that `--pose` takes a silhouette video (white on black, any size, resampled like a
pose video) and the object follows it; `--reference` (pinned at frame 0) gives its look. It also draws the
motion plan below. Without a pose or a plan the branch does not run.
- The UNet's encoder half (blocks {cfg['block_out_channels']}, weights copied from the UNet at the start),
  per frame, without the pooled caption, with wrapping convolutions; the {c['mask_size']}x{c['mask_size']} silhouettes enter
  through a conditioning embedding of channels {cfg['conditioning_embedding_out_channels']} (three stride-2
  convolutions to the UNet's 8x8); every residual starts at zero. {size_mb:.1f} MB of safetensors (EMA).
- Data: `shapes.sample_control_batch`, half the captioned motions (captioned with or without the motion
  words), half free paths (circles, figure eights, lines in any direction, wanders) captioned without
  them ("a red ball on a blue background"); objects of radius 0.15-0.24 of the frame.
- Loss: x0 MSE with the object's pixels weighted {c['object_weight']:g}x; batch {c['batch']}, learning rate {c['lr']:g}
  (warm-up, cosine to a tenth), {c['steps']} steps in {c['train_seconds'] / 60:.1f} minutes on {c['threads']} CPU threads
  ({c['device']}), seed {c['seed']}, final loss {c['final_loss']}.
- Reproduce: `python -m longtake.tools.train_control --model longtake/models/default --max-steps {c['steps']}
  --seed {c['seed']}` (resumable like train_default: `--piece-minutes`, state beside the weights).

{pose}{_plan(d)}"""


def _plan(d: Path) -> str:
    """The motion plan's section (longtake.json "planner"), with the eval of the model alone beside it."""
    lt = json.loads((d / "longtake.json").read_text())
    if not lt.get("planner"):
        return ""
    alone = d / "EVAL_PLAN_NONE.md"
    alone_text = ("\n" + alone.read_text().split("\n", 1)[1].lstrip("\n")) if alone.is_file() else ""  # minus its title
    return f"""
## Motion plan
longtake.json's `"planner": "{lt['planner']}"` (`longtake/models/planner.py`): a request from text alone whose
prompts name a shape and a motion ("a red ball bouncing on a blue background") gets a silhouette path drawn
from those words (the start and speed from the seed, the speed of the training clips, a timeline's motions
blended as its prompts are, a loop's path closed) as its control frames, and the control branch above makes
the object follow it. Around known frames (image, keyframes, extend, lead_into) the path starts from the
object they show and goes on at the prompt's motion, or at the context's own velocity where the prompt
names none, landing on the next known object (a bridge). The model alone takes colour, shape and background
from the words but moves the object where its noise takes it; the plan is what makes it move as told, as
layout-guided video models split the work (where first, then what). A video redrawn below strength 1, a
pose, `plan: none`, prompts without the words, or known frames without an object render without it. The
evaluation above is with the plan (every eval prompt names both); the model alone, on the same clips and
seeds (`longtake eval --plan none`):
{alone_text}"""


if __name__ == "__main__":
    print(write_card(sys.argv[1] if len(sys.argv) > 1 else "longtake/models/default"))
