"""Tiny random-weight models built from configs: `tiny` (AnimateDiff), `tiny-pose` (AnimateDiff with a pose
ControlNet), `tiny-pose-ip` (the same plus an IP-Adapter image prompt: a CLIP vision encoder with projection,
its image processor and an `ip_adapter/` state dict), `tiny-wan` (Wan 2.1 T2V) and `tiny-wan-animate` (Wan 2.2
Animate: a reference photo animated by a pose, with a CLIP vision encoder and its image processor built
locally).

They render noise, quickly: for checks, the bench and the tests. Each builder writes a complete diffusers
directory (model_index.json, safetensors weights, a tokenizer written locally, the family's scheduler),
so it loads through exactly the same `from_pretrained(..., use_safetensors=True)` path as a real model.
Nothing is downloaded.

    python -m longtake.pipelines.tiny /tmp/tiny-animatediff [tiny|tiny-pose|tiny-pose-ip|tiny-wan|tiny-wan22|tiny-wan-animate]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

TINY_NAME = "tiny"  # the --model value that selects the tiny AnimateDiff model
TINY_WAN = "tiny-wan"  # the --model value that selects the tiny Wan 2.1 model
TINY_POSE = "tiny-pose"  # the tiny AnimateDiff model with a pose ControlNet
TINY_POSE_IP = "tiny-pose-ip"  # the same with an IP-Adapter image prompt
IP_ADAPTER_FILE = "ip-adapter.safetensors"  # the tiny models' file in ip_adapter/ (any one .safetensors name works)
TINY_WAN_ANIMATE = "tiny-wan-animate"  # the tiny Wan 2.2 Animate model


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


def _save(pipe, out_dir) -> None:
    """`pipe.save_pretrained(out_dir)` without the libraries' progress bars (transformers' "Writing model
    shards", huggingface_hub's, diffusers'): a tiny model is built on the way to what a command was asked to do
    (`--model tiny-wan`). Each library's bar setting is put back afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_on, transformers_on = diffusers_logging.is_progress_bar_enabled(), \
        transformers_logging.is_progress_bar_enabled()
    hub_on = not are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # (huggingface_hub's too)
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if diffusers_on:
            diffusers_logging.enable_progress_bar()
        if transformers_on:
            transformers_logging.enable_progress_bar()  # (huggingface_hub's too)
        if hub_on:
            enable_progress_bars()
        elif not are_progress_bars_disabled():
            disable_progress_bars()


def build_tiny_animatediff(out_dir: str | os.PathLike, seed: int = 0, frames: int = 16, controlnet: bool = False,
                           ip_adapter: bool = False):
    """Build and save a tiny AnimateDiff pipeline (with `controlnet`: an AnimateDiffControlNetPipeline whose
    ControlNet has the UNet's shape and random, not zero, output convolutions, the control image's embedding
    included, so that the pose changes the frames; with `ip_adapter`: also a CLIP vision encoder with
    projection, its image processor and a random IP-Adapter in ip_adapter/, see `ip_adapter_state_dict`);
    returns the pipeline object (without the IP-Adapter loaded: `load_ip_adapter` reads it from the directory)."""
    from diffusers import AnimateDiffControlNetPipeline, AnimateDiffPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    tok_dir = out_dir / "_tokenizer_src"
    vocab_file, merges_file = write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    torch.manual_seed(seed)  # the components draw their weights in this order, as they always have
    parts = _tiny_animatediff_parts(tokenizer, frames)
    net = _tiny_controlnet() if controlnet else None
    if ip_adapter:  # made after the rest, so the other weights equal those of the model without it
        parts.update(_tiny_image_encoder())
    pipe = AnimateDiffControlNetPipeline(controlnet=net, **parts) if controlnet else AnimateDiffPipeline(**parts)
    _save(pipe, out_dir)
    if ip_adapter:
        from safetensors.torch import save_file

        state = ip_adapter_state_dict(pipe.unet, parts["image_encoder"].config.projection_dim, seed=seed)
        (out_dir / "ip_adapter").mkdir()
        save_file({f"{part}.{key}": value.contiguous() for part, weights in state.items()
                   for key, value in weights.items()}, out_dir / "ip_adapter" / IP_ADAPTER_FILE)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return pipe


def _tiny_animatediff_parts(tokenizer, frames: int) -> dict:
    """The tiny AnimateDiff's components (random weights, in this order): a 2-level UNet, its motion
    adapter, a 3-block VAE, a 2-layer CLIP text encoder, a DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        # attention only at the lower resolution: cheap enough for a laptop CPU
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=4)
    motion_adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=4,
                                   motion_num_attention_heads=2, motion_max_seq_length=frames)
    vae = AutoencoderKL(  # 3 blocks: 4x spatial compression, 64x64 frames from 16x16 latents
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer)))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              steps_offset=1)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, motion_adapter=motion_adapter,
                scheduler=scheduler)


def _tiny_controlnet():
    """A ControlNet of the tiny UNet's shape whose output convolutions and control embedding are random, not
    zero (so that the pose changes the frames)."""
    from diffusers import ControlNetModel

    net = ControlNetModel(block_out_channels=(16, 32), layers_per_block=1, in_channels=4,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                          attention_head_dim=8, norm_num_groups=4,
                          conditioning_embedding_out_channels=(8, 16, 16))  # 4x down: the VAE's factor
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.05)
    return net


def _tiny_image_encoder() -> dict:
    """An IP-Adapter's image encoder and its processor: image_embeds (16 wide) of 32 px crops in 8 x 8
    patches of 4 px."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    return {"image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=4, projection_dim=16)),
            "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})}


def ip_adapter_state_dict(unet, image_embed_dim: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter (the original kind: 4 image tokens) for `unet`, in the layout diffusers'
    `load_ip_adapter` reads: {"image_proj": {proj.weight, proj.bias, norm.weight, norm.bias}, "ip_adapter":
    {"<k>.to_k_ip.weight", "<k>.to_v_ip.weight"}}, k = 1, 3, 5... over the UNet's cross-attention processors
    in order (motion modules and self-attention skipped), as `_convert_ip_adapter_attn_to_diffusers` numbers
    them (diffusers' tests build theirs the same way). Weights are random, not zero, so the image changes
    the frames."""
    gen = torch.Generator().manual_seed(seed + 1)
    cross, tokens = unet.config.cross_attention_dim, 4
    channels = list(unet.config.block_out_channels)
    image_proj = {"proj.weight": torch.randn(tokens * cross, image_embed_dim, generator=gen) * 0.5,
                  "proj.bias": torch.randn(tokens * cross, generator=gen) * 0.1,
                  "norm.weight": 1 + torch.randn(cross, generator=gen) * 0.1,
                  "norm.bias": torch.randn(cross, generator=gen) * 0.1}
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for proj in ("to_k_ip", "to_v_ip"):
            layers[f"{key}.{proj}.weight"] = torch.randn(hidden, cross, generator=gen) * 0.3
        key += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


def build_wan_tokenizer(max_length: int = 512):
    """A byte-level tokenizer (the `tokenizers` library, no merges) wrapped as a transformers fast tokenizer:
    every text tokenizes offline; <pad> is id 0 and </s> is appended, as UMT5's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for char in _bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def build_tiny_wan(out_dir: str | os.PathLike, seed: int = 0, two_experts: bool = False):
    """Build and save a tiny Wan text-to-video pipeline (Wan 2.1; with `two_experts`, a Wan 2.2 A14B-style
    pair of transformers switching at boundary_ratio 0.875). Returns the pipeline object."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_wan_tokenizer()
    torch.manual_seed(seed)
    # sizes from diffusers' own Wan tests; the full rotary table (1024 positions) so windows can be long
    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                     out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)

    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    # Wan 2.1's own scheduler config: UniPC on flow sigmas, shift 3
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000, solver_order=2, final_sigmas_type="zero")
    experts = {"transformer": transformer()}
    if two_experts:
        experts |= {"transformer_2": transformer(), "boundary_ratio": 0.875}
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, **experts)
    _save(pipe, out_dir)
    # what a tiny model renders at by default: 64x64 frames, few steps (real Wan: 480x832, 50 steps)
    (Path(out_dir) / "longtake.json").write_text(json.dumps({"default_size": [64, 64], "default_steps": 10}))
    return pipe


def build_tiny_wan_animate(out_dir: str | os.PathLike, seed: int = 0):
    """Build and save a tiny WanAnimatePipeline: the transformer, motion and face encoders at the sizes of
    diffusers' own Wan-Animate tests (a 16 x 16 face), the image cross-attention of the real model
    (added_kv_proj_dim), a CLIP vision encoder and its image processor, and the tiny Wan VAE, UMT5 and
    tokenizer. Returns the pipeline object."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    tokenizer = build_wan_tokenizer()
    torch.manual_seed(seed)
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, latent_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=1024,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=1, motion_encoder_batch_size=8)
    with torch.no_grad():  # random, not zero, face adapters, so that the face video changes the frames
        for adapter in transformer.face_adapter:
            torch.nn.init.normal_(adapter.to_out.weight, std=0.05)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    # hidden_states[-2] of this encoder is the image embedding (16 wide: the transformer's image_dim); 8 x 8
    # patches of 4 px on a 32 px crop
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=4,
                                                     projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                        num_train_timesteps=1000, solver_order=2, final_sigmas_type="zero")
    pipe = WanAnimatePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                              image_processor=image_processor, image_encoder=image_encoder, transformer=transformer)
    _save(pipe, out_dir)
    (Path(out_dir) / "longtake.json").write_text(json.dumps({"default_size": [64, 64], "default_steps": 4}))
    return pipe


# --model names of the tiny models -> (cache directory name, builder)
TINY_MODELS = {TINY_NAME: ("tiny-animatediff-v1", build_tiny_animatediff), TINY_WAN: ("tiny-wan-v1", build_tiny_wan),
               TINY_POSE: ("tiny-pose-v2", lambda out: build_tiny_animatediff(out, controlnet=True)),
               TINY_POSE_IP: ("tiny-pose-ip-v1", lambda out: build_tiny_animatediff(out, controlnet=True,
                                                                                  ip_adapter=True)),
               TINY_WAN_ANIMATE: ("tiny-wan-animate-v1", build_tiny_wan_animate)}


def cache_dir() -> Path:
    return Path(os.environ.get("LONGTAKE_CACHE", Path.home() / ".cache" / "longtake"))


def ensure_tiny_model(name: str = TINY_NAME) -> Path:
    """Return the directory of a tiny model, building it once (atomically) into the cache if needed."""
    version, build = TINY_MODELS[name]
    return build_once(cache_dir() / "models" / version, build)


def build_once(target: Path, build) -> Path:
    """`target`, a model directory `build(path)` writes, written once: into a temporary name beside it, then
    renamed (another process building it at the same time writes the same files; the first rename wins)."""
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    build(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    builders = {**{name: build for name, (_, build) in TINY_MODELS.items()},
                "tiny-wan22": lambda out: build_tiny_wan(out, two_experts=True)}
    builders[sys.argv[2] if len(sys.argv) > 2 else TINY_NAME](sys.argv[1] if len(sys.argv) > 1 else "tiny-model")
