"""Context parallelism: one window predicted by a group of K workers, each holding 1/K of its tokens.

diffusers' own context parallelism does the work (`ContextParallelConfig`, `enable_parallelism`, the
transformer's `_cp_plan`: split the patch tokens after the embedding, attend across the group, gather
before the output projection): every rank of a group runs the same forward on the same inputs and gets the
same, gathered, output. Two ways to attend across the group:

- Ulysses: an all-to-all turns "my tokens, all heads" into "all tokens, my heads", attends, and turns back;
  the attention itself is the single-worker one (bit-identical frames on the CPU). Needs the head count
  divisible by K.
- ring: each rank keeps its queries and passes keys and values round the ring, merging partial results by
  their log-sum-exp; any K that divides the tokens, at a rounding's difference from one worker (a few 1e-7
  in float32).

`mode="auto"` takes Ulysses when the heads allow, else ring. The token count of a window (latent frames x
patches) must divide by K in both.

This module knows torch and diffusers only. The group's process group is joined by the worker
(`join_group`, from the executor's rendezvous: actors/ray_pool.py starts the group's members together);
the family's backend calls `parallelize` on each transformer it loads.
"""

from __future__ import annotations

import contextlib
import datetime
import math
from dataclasses import dataclass

from longtake.request import CP_MODES, MAX_CP, RequestError

GROUP_TIMEOUT_S = 300.0  # a collective waiting longer on a peer fails (a dead peer never hangs a group)


@dataclass(frozen=True)
class Member:
    """A worker's place in its group: rank `rank` of `size`, meeting at `address` (host:port, rank 0's)."""

    rank: int
    size: int
    address: str


def resolve_mode(mode: str, cp: int, heads: int) -> str:
    """'ulysses' or 'ring' for a group of `cp` on a transformer with `heads` attention heads. Raises
    RequestError naming cp_mode when Ulysses is asked for and the heads do not divide."""
    if mode not in CP_MODES:
        raise RequestError("cp_mode", mode, f"one of {', '.join(CP_MODES)}")
    if mode == "auto":
        return "ulysses" if heads % cp == 0 else "ring"
    if mode == "ulysses" and heads % cp:
        raise RequestError("cp_mode", mode, f"ring, or a cp that divides the model's {heads} attention heads "
                                            f"(Ulysses gives each of the {cp} workers whole heads)")
    return mode


def check_family(info, cp: int) -> None:
    """The model's family can shard a window (a transformer with a context-parallel plan). Raises
    RequestError naming cp."""
    if cp > 1 and not info.cp_heads:
        raise RequestError("cp", cp, f"1: the {info.family} family has no context-parallel plan (one window, one "
                                     f"worker)")


def server_mode(info, cp: int) -> str:
    """The way a server's groups of `cp` attend ('' for cp 1): the model's `auto` choice (requests do not
    choose: serve/schema.py's SERVER_FIELDS)."""
    if cp == 1:
        return ""
    check_family(info, cp)
    return resolve_mode("auto", cp, info.cp_heads)


def check_tokens(tokens: int, cp: int, window: int) -> None:
    """A window's tokens split evenly over the group. Raises RequestError naming cp."""
    if tokens % cp:
        raise RequestError("cp", cp, f"a group size that divides a {window}-latent-frame window's {tokens} tokens "
                                     f"({_sizes_dividing(tokens)}, or 1)")


def check_frames(frames: int, cp: int, window: int) -> None:
    """Each worker of the group holds whole latent frames (a family whose layers attend within a frame).
    Raises RequestError naming cp."""
    if frames % cp:
        raise RequestError("cp", cp, f"a group size that divides the {frames} latent frames a {window}-latent-frame "
                                     f"window goes through the transformer with ({_sizes_dividing(frames)}, or 1): "
                                     f"this model's workers each hold whole frames")


def _sizes_dividing(n: int) -> str:
    """The group sizes above 1 that divide n, for an error message."""
    return ", ".join(str(k) for k in range(2, MAX_CP + 1) if n % k == 0) or f"none up to {MAX_CP}"


def join_group(member: Member, device: str, timeout_s: float = GROUP_TIMEOUT_S) -> None:
    """Join this process's group (the default torch.distributed process group): gloo on the CPU, NCCL on
    GPUs. Blocks until every member has joined (at most `timeout_s`); every collective after it fails
    after `timeout_s` rather than wait forever on a dead peer."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("this process is already in a group: one group per worker process")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://{member.address}",
                            rank=member.rank, world_size=member.size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def parallelize(transformer, cp: int, mode: str, cp_plan: dict | None = None) -> None:
    """Shard this transformer's windows over the process group (`join_group` first): diffusers'
    `enable_parallelism` with Ulysses or ring attention (module docstring); `cp_plan` for a transformer
    whose class has none (diffusers' `_cp_plan` format)."""
    import torch
    from diffusers import ContextParallelConfig

    cpu = next(transformer.parameters()).device.type == "cpu"
    if mode == "ring" and cpu:
        _cpu_ring_attention()
    transformer.set_attention_backend("native" if mode == "ulysses" or cpu else "_native_flash")
    config = ContextParallelConfig(ulysses_degree=cp) if mode == "ulysses" else ContextParallelConfig(ring_degree=cp)
    # diffusers places rank r on accelerator r % device_count: a CPU has none (0), and each GPU worker sees
    # only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), so both are device 0 of 1
    with _one_device(torch):
        transformer.enable_parallelism(config=config, cp_plan=cp_plan)


@contextlib.contextmanager
def _one_device(torch):
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def _cpu_ring_attention() -> None:
    """Ring attention merges partial results by their log-sum-exp, which diffusers' native attention does not
    return: on the CPU, its forward op gets it from PyTorch's CPU flash kernel (GPUs use the `_native_flash`
    backend instead). Installed once per process; calls without `return_lse` go to diffusers' own op."""
    from diffusers.models import attention_dispatch as dispatch

    native = dispatch._native_attention_forward_op
    if getattr(native, "longtake_lse", False):
        return

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        import torch

        if not return_lse or query.device.type != "cpu":
            return native(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                          _save_ctx, _parallel_config)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (B, S, H, D) -> (B, H, S, D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[:2]
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # (B, S, H, D), (B, S, H)

    forward_op.longtake_lse = True
    dispatch._native_attention_forward_op = forward_op


def window_tokens(latent_frames: int, height: int, width: int, spatial: int, patch: tuple[int, int, int]) -> int:
    """Patch tokens of one window: latent frames / temporal patch x latent rows / patch x columns / patch."""
    pt, ph, pw = patch
    return math.ceil(latent_frames / pt) * (height // spatial // ph) * (width // spatial // pw)
