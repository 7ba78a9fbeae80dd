"""A tiny AnimateDiff-format model built from configs, with random weights.

It is the default model until a trained one ships (see the README), and the model the tests use.
`build_tiny_animatediff(dir)` writes a complete diffusers directory (model_index.json, safetensors
weights, a CLIP tokenizer written locally, a DDIM scheduler), so it loads through exactly the same
`from_pretrained(..., use_safetensors=True)` path as a real AnimateDiff model.

    python -m longtake.pipelines.tiny /tmp/tiny-animatediff
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

TINY_NAME = "tiny"  # the --model value that selects this model
TINY_VERSION = "tiny-animatediff-v1"


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable unicode map of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(directory: Path, words: list[str] = ()) -> tuple[Path, Path]:
    """Write a character-level CLIP BPE vocabulary (plus optional whole words) and its merges.

    Every byte is a token, with and without the end-of-word marker, so any text tokenizes offline.
    Each word in `words` becomes one token through the merges needed to build it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in words:
        # merge left to right: ((w o) r) d</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            if merge not in merges:
                merges.append(merge)
            current = current + piece
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""))
    return vocab_file, merges_file


def build_tiny_animatediff(out_dir: str | os.PathLike, seed: int = 0, frames: int = 16):
    """Build and save a tiny AnimateDiff pipeline; returns the pipeline object."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    tok_dir = out_dir / "_tokenizer_src"
    vocab_file, merges_file = write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        # attention only at the lower resolution: cheap enough for a laptop CPU
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    motion_adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=frames,
    )
    vae = AutoencoderKL(  # 3 blocks: 4x spatial compression, 64x64 frames from 16x16 latents
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False, steps_offset=1
    )
    pipe = AnimateDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=motion_adapter,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return pipe


def cache_dir() -> Path:
    return Path(os.environ.get("LONGTAKE_CACHE", Path.home() / ".cache" / "longtake"))


def ensure_tiny_model() -> Path:
    """Return the directory of the tiny default model, building it once (atomically) if needed."""
    target = cache_dir() / "models" / TINY_VERSION
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    build_tiny_animatediff(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    build_tiny_animatediff(sys.argv[1] if len(sys.argv) > 1 else "tiny-animatediff")
