"""Frame-window planning, overlap fusion, per-frame noise and prompt timelines.

A long video is denoised as overlapping windows of `window` frames. At every
diffusion step each window's prediction is blended back into one full-length
tensor (`fuse`) with per-frame weights (`window_weights`). Initial noise is
defined per frame (`frames_noise`) so that any worker can regenerate the noise
of any frame range without materialising the whole video. Prompt keyframes are
turned into per-frame embedding blends (`prompt_schedule`,
`interpolate_embeddings`). Only torch, numpy and the stdlib are used.
"""

from bisect import bisect_right
import copy
from dataclasses import dataclass

import numpy as np
import torch

from longtake.core import NOISE_MODES, WEIGHTINGS  # the one list of each (torch-free, for the CLI)

# "correlated": an AR(1) process over frames, eps_f = rho * eps_(f-1) + sqrt(1 - rho^2) * xi_f (unit variance,
# lag-1 correlation rho), as in PYoCo's progressive noise prior; expanded over a finite horizon so any frame
# range is computed alone
NOISE_CORRELATION, NOISE_HORIZON = 0.9, 32
_MASK32 = 2**32 - 1


def _check_window(window: int, overlap: int) -> None:
    if window < 1:
        raise ValueError(f"window: got {window}, expected window >= 1")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap: got {overlap}, expected 0 <= overlap < window ({window})")


def plan_windows(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Half-open (start, end) windows of length `window`, stride window - overlap; last ends at F."""
    if num_frames < 1:
        raise ValueError(f"num_frames: got {num_frames}, expected num_frames >= 1")
    _check_window(window, overlap)
    if num_frames <= window:
        return [(0, num_frames)]
    stride = window - overlap
    plan, start = [], 0
    while start + window < num_frames:
        plan.append((start, start + window))
        start += stride
    plan.append((num_frames - window, num_frames))  # tail; equals `start` when it fits exactly
    return plan


def plan_loop(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Windows around a circle of F frames (a loop): the same stride as `plan_windows`, spread evenly, the
    last ones running past the end (end > F: frames taken modulo F), so the last and first frames are
    neighbours inside a window and fused like any others. Always at least two windows (a clip no longer
    than one window is covered twice, half a clip apart, so its wrap is inside one of them)."""
    if num_frames < 2:
        raise ValueError(f"num_frames: got {num_frames}, expected num_frames >= 2 for a loop")
    _check_window(window, overlap)
    length = min(window, num_frames)
    count = max(2, -(-num_frames // (window - overlap)))
    return [(k * num_frames // count, k * num_frames // count + length) for k in range(count)]


def window_frames(start: int, end: int, num_frames: int) -> torch.Tensor:
    """The frame indices of a window: start..end-1, modulo F for a loop's windows that wrap."""
    return torch.arange(start, end) % num_frames


def reflect_index(i: int, n: int) -> int:
    """Frame i of a clip of n frames padded as Wan-Animate's pipeline (`pad_video_frames`) pads: 0, 1, ...,
    n - 1, n - 2, ..., 0, 1, ..."""
    if n == 1 or i < n:
        return min(i, n - 1)
    j = i % (2 * (n - 1))
    return j if j < n else 2 * (n - 1) - j


def window_pixels(start: int, end: int, temporal: int = 4) -> range:
    """The pixel frames a window of latent frames start..end-1 of a causal VAE (4k+1 frames) conditions on:
    temporal (L - 1) + 1 frames from temporal x start."""
    first = temporal * start
    return range(first, first + temporal * (end - start - 1) + 1)


def conditioning_frames(start: int, end: int, n: int, temporal: int = 1) -> list[int]:
    """Which frames of a clip of `n` per-frame conditioning frames (a pose, a face video, a mask...) the
    window of latent frames start..end-1 reads, in the order it reads them: frames start..end-1 modulo n
    (a loop's window wraps) without temporal compression; with it (a causal VAE), `window_pixels`,
    reflected past the clip's end (`reflect_index`). What the engine sends a window (its own slice)."""
    if temporal == 1:
        return window_frames(start, end, n).tolist()
    return [reflect_index(i, n) for i in window_pixels(start, end, temporal)]


def take_window(z: torch.Tensor, start: int, end: int, dim: int = 2) -> torch.Tensor:
    """A window's frames of a (1, C, F, h, w) tensor: a copy (a gather when the window wraps)."""
    num_frames = z.shape[dim]
    if end <= num_frames:
        return z.narrow(dim, start, end - start).clone()
    return z.index_select(dim, window_frames(start, end, num_frames).to(z.device))


def _check_plan(plan: list[tuple[int, int]]) -> None:
    if not plan:
        raise ValueError("plan: got [], expected at least one window")
    for i, (start, end) in enumerate(plan):
        if not 0 <= start < end:
            raise ValueError(f"plan[{i}]: got {(start, end)}, expected 0 <= start < end")


def _ramp(n: int, ov: int) -> torch.Tensor:
    """(n,) ramp (k+1)/(ov+1) over the first `ov` entries, 1 elsewhere."""
    w = torch.ones(n, dtype=torch.float64)
    ov = min(max(ov, 0), n)
    w[:ov] = torch.arange(1, ov + 1, dtype=torch.float64) / (ov + 1)
    return w


def _overlap_linear(plan: list[tuple[int, int]], i: int, loop: int = 0) -> torch.Tensor:
    start, end = plan[i]
    ov_in = plan[i - 1][1] - start if i > 0 else (plan[-1][1] - loop if loop else 0)
    ov_out = end - plan[i + 1][0] if i + 1 < len(plan) else (end - loop if loop else 0)
    ramp_in = _ramp(end - start, ov_in)
    ramp_out = _ramp(end - start, ov_out).flip(0)
    return torch.minimum(ramp_in, ramp_out)


def window_weights(plan: list[tuple[int, int]], weighting: str, loop: int = 0) -> list[torch.Tensor]:
    """One float64 (end - start,) tensor of strictly positive blend weights per window. `loop`: the frame
    count of a circular plan (`plan_loop`), whose first and last windows are neighbours."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: got {weighting!r}, expected one of {', '.join(WEIGHTINGS)}")
    _check_plan(plan)
    weights = []
    for i, (start, end) in enumerate(plan):
        n = end - start
        if weighting == "flat":
            w = torch.ones(n, dtype=torch.float64)
        elif weighting == "pyramid":
            k = torch.arange(n, dtype=torch.float64)
            w = torch.minimum(k + 1, n - k)
        else:
            w = _overlap_linear(plan, i, loop)
        weights.append(w)
    return weights


def _check_fuse_inputs(preds, plan, weights, num_frames: int, frame_dim: int, loop: bool = False) -> None:
    if not len(preds) == len(plan) == len(weights):
        raise ValueError(f"preds: got {len(preds)} preds / {len(plan)} windows / "
                         f"{len(weights)} weights, expected equal counts")
    _check_plan(plan)
    other = list(preds[0].shape)
    other[frame_dim] = None
    for i, ((start, end), pred, w) in enumerate(zip(plan, preds, weights)):
        if end > num_frames and not (loop and start < num_frames and end - start <= num_frames):
            raise ValueError(f"plan[{i}]: got {(start, end)}, expected end <= num_frames ({num_frames})")
        if pred.shape[frame_dim] != end - start or w.shape != (end - start,):
            raise ValueError(f"preds[{i}]: got {pred.shape[frame_dim]} frames and weights {tuple(w.shape)}, "
                             f"expected {end - start} for window {(start, end)}")
        shape = list(pred.shape)
        shape[frame_dim] = None
        if shape != other:
            raise ValueError(f"preds[{i}]: got shape {tuple(pred.shape)}, expected to match preds[0] "
                             f"{tuple(preds[0].shape)} outside frame_dim {frame_dim}")


def fuse(preds: list[torch.Tensor], plan: list[tuple[int, int]], weights: list[torch.Tensor],
         num_frames: int, frame_dim: int = 2, loop: bool = False) -> torch.Tensor:
    """Weighted per-frame average of window predictions, accumulated in float64 in list order. `loop`: the
    plan is circular (windows may run past the end; their frames are taken modulo num_frames)."""
    if not preds:
        raise ValueError("preds: got [], expected one prediction per window")
    frame_dim = frame_dim % preds[0].dim()
    _check_fuse_inputs(preds, plan, weights, num_frames, frame_dim, loop)
    device, dtype = preds[0].device, preds[0].dtype
    out_shape = list(preds[0].shape)
    out_shape[frame_dim] = num_frames
    num = torch.zeros(out_shape, dtype=torch.float64, device=device)  # e.g. (1, C, F, H, W)
    den = torch.zeros(num_frames, dtype=torch.float64, device=device)  # (F,)
    view = [1] * len(out_shape)
    for (start, end), pred, w in zip(plan, preds, weights):
        w = w.to(device=device, dtype=torch.float64)
        view[frame_dim] = end - start
        if end <= num_frames:
            num.narrow(frame_dim, start, end - start).add_(pred.to(torch.float64) * w.view(view))
            den[start:end] += w
        else:  # a loop's window past the end: scatter modulo F (indices within a window are distinct)
            index = window_frames(start, end, num_frames).to(device)
            num.index_add_(frame_dim, index, pred.to(torch.float64) * w.view(view))
            den.index_add_(0, index, w)
    if bool((den <= 0).any()):
        missing = int(torch.nonzero(den <= 0)[0])
        raise ValueError(f"plan: got no window covering frame {missing}, expected every frame covered")
    view[frame_dim] = num_frames
    return (num / den.view(view)).to(dtype)


def _zigzag_words(value: int, name: str) -> list[int]:
    """Signed 64-bit int -> two uint32 words (fixed width, so the encoding is injective)."""
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name}: got {value}, expected -2**63 <= {name} < 2**63")
    z = 2 * value if value >= 0 else -2 * value - 1
    return [z & _MASK32, z >> 32]


def frame_seed(seed: int, frame: int) -> int:
    """Stable 63-bit generator seed mixed from (seed, frame); frame may be negative."""
    entropy = _zigzag_words(seed, "seed") + _zigzag_words(frame, "frame")
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)


def _independent_frame(seed: int, frame: int, frame_shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(frame_seed(seed, frame))
    return torch.randn(frame_shape, generator=gen, dtype=torch.float32)  # (C, H, W)


def _freenoise_root(seed: int, frame: int, window: int, overlap: int, perms: dict) -> int:
    """Walk a FreeNoise-shuffled frame back to the independent frame (< window) it copies."""
    stride = window - overlap
    while frame >= window:
        k = (frame - window) // stride
        chunk_start = window + k * stride
        if k not in perms:
            gen = torch.Generator("cpu").manual_seed(frame_seed(seed, -(k + 1)))
            perms[k] = torch.randperm(stride, generator=gen).tolist()
        frame = chunk_start - window + perms[k][frame - chunk_start]
    return frame


def correlate_frames(xi: torch.Tensor, dim: int, rho: float = NOISE_CORRELATION) -> torch.Tensor:
    """Independent unit noise along `dim` (frames) -> the AR(1) "correlated" noise of frames 0, 1, ...

    The recursion of `frames_noise(mode="correlated")` (equal up to rounding for fewer than
    NOISE_HORIZON frames); training uses it on its batches."""
    frames = list(xi.unbind(dim))
    out = [frames[0]]
    for x in frames[1:]:
        out.append(rho * out[-1] + (1 - rho**2) ** 0.5 * x)
    return torch.stack(out, dim)


def _correlated_frame(f: int, xi: dict) -> torch.Tensor:
    """eps_f = sqrt(1 - rho^2) * sum_{k<m} rho^k xi_(f-k) + rho^m xi_(f-m), m = min(f, horizon): the AR(1)
    recursion unrolled m times, with eps_(f-m) replaced by xi_(f-m) (exact for f <= horizon; unit
    variance and correlation rho^lag for lags below the horizon everywhere)."""
    rho = NOISE_CORRELATION
    m = min(f, NOISE_HORIZON)
    acc = torch.zeros(xi[f].shape, dtype=torch.float64)
    for k in range(m):
        acc += (1 - rho**2) ** 0.5 * rho**k * xi[f - k].double()
    acc += rho**m * xi[f - m].double()
    return acc.float()


def frames_noise(seed: int, frames, frame_shape: tuple[int, ...], mode: str = "independent",
                 window: int = 16, overlap: int = 4, dtype=torch.float32) -> torch.Tensor:
    """Noise of just `frames`: (1, C, len(frames), H, W) for frame_shape (C, H, W)."""
    if mode not in NOISE_MODES:
        raise ValueError(f"noise: got {mode!r}, expected one of {', '.join(NOISE_MODES)}")
    frame_shape = tuple(int(s) for s in frame_shape)
    if len(frame_shape) < 1:
        raise ValueError(f"frame_shape: got {frame_shape}, expected at least one dim (C, ...)")
    frames = [int(f) for f in frames]
    if any(f < 0 for f in frames):
        raise ValueError(f"frames: got {min(frames)}, expected frame indices >= 0")
    if mode == "freenoise":
        _check_window(window, overlap)
        perms: dict = {}
        frames = [_freenoise_root(seed, f, window, overlap, perms) for f in frames]
    if not frames:
        return torch.empty((1, frame_shape[0], 0) + frame_shape[1:], dtype=dtype)
    if mode == "correlated":
        xi = {f: _independent_frame(seed, f, frame_shape)
              for f in range(max(0, min(frames) - NOISE_HORIZON), max(frames) + 1)}
        cache = {f: _correlated_frame(f, xi) for f in dict.fromkeys(frames)}
    else:
        cache = {f: _independent_frame(seed, f, frame_shape) for f in dict.fromkeys(frames)}
    noise = torch.stack([cache[f] for f in frames], dim=1)  # (C, n, H, W)
    return noise.unsqueeze(0).to(dtype)  # (1, C, n, H, W)


def initial_noise(seed: int, num_frames: int, frame_shape: tuple[int, ...], mode: str = "independent",
                  window: int = 16, overlap: int = 4, dtype=torch.float32) -> torch.Tensor:
    """Noise of the whole video: (1, C, F, H, W) for frame_shape (C, H, W)."""
    if num_frames < 0:
        raise ValueError(f"num_frames: got {num_frames}, expected num_frames >= 0")
    return frames_noise(seed, range(num_frames), frame_shape, mode, window, overlap, dtype)


PRIVATE_NOISE = -2_000_000  # frame_seed's frames of the windows' private frames (`private_frame`)
MAX_PRIVATE = 64  # private frames a window may have


def private_frame(window: int, i: int = 0) -> int:
    """frame_seed's frame of window `window`'s private frame i (its step noise: of frame 0, mixed again with
    the step, as a range's is), below every clip frame and step noise."""
    return PRIVATE_NOISE - MAX_PRIVATE * window - i


def private_noise(seed: int, window: int, count: int, frame_shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of window `window`'s private latent frames (a family that carries state of its own
    through the steps, such as Wan-Animate's reference slot): (1, C, count, H, W), from (seed, window), the
    same on every worker; frames of its own, apart from the clip's (frame indices below every STEP_NOISE)."""
    if not 0 <= count <= MAX_PRIVATE:
        raise ValueError(f"private frames: got {count}, expected 0..{MAX_PRIVATE}")
    frames = [_independent_frame(seed, private_frame(window, i), tuple(frame_shape)) for i in range(count)]
    if not frames:
        return torch.empty((1, frame_shape[0], 0) + tuple(frame_shape[1:]))
    return torch.stack(frames, dim=1).unsqueeze(0)


@dataclass(frozen=True)
class PromptKey:
    at: float  # seconds
    prompt: str


def _check_keys(keys: list[PromptKey]) -> None:
    if not keys:
        raise ValueError("timeline: got [], expected at least one PromptKey")
    for i in range(1, len(keys)):
        if not keys[i].at > keys[i - 1].at:
            raise ValueError(f"timeline[{i}].at: got {keys[i].at}, "
                             f"expected > timeline[{i - 1}].at ({keys[i - 1].at})")


def prompt_schedule(keys: list[PromptKey], num_frames: int, fps: float, loop: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-frame (a, b, alpha): frame f blends key a and key b with weight alpha on b. `loop`: the clip
    wraps, so after the last key the prompt moves on to the first key, reached again at the clip's end."""
    _check_keys(keys)
    if num_frames < 1:
        raise ValueError(f"num_frames: got {num_frames}, expected num_frames >= 1")
    if not fps > 0:
        raise ValueError(f"fps: got {fps}, expected fps > 0")
    times = [float(k.at) for k in keys]
    a, b = torch.zeros(num_frames, dtype=torch.int64), torch.zeros(num_frames, dtype=torch.int64)  # (F,)
    alpha = torch.zeros(num_frames, dtype=torch.float64)  # (F,)
    for f in range(num_frames):
        t = f / fps
        i = max(bisect_right(times, t) - 1, 0)  # last key with at <= t (or 0)
        if loop and len(times) > 1 and (t > times[-1] or t < times[0]):  # across the wrap: last key -> first
            span = num_frames / fps - times[-1] + times[0]
            a[f], b[f] = len(times) - 1, 0
            alpha[f] = ((t - times[-1]) if t > times[-1] else (t + num_frames / fps - times[-1])) / span
            continue
        if t <= times[0] or t >= times[-1] or t == times[i]:
            a[f] = b[f] = i
            continue
        a[f], b[f] = i, i + 1
        alpha[f] = (t - times[i]) / (times[i + 1] - times[i])
    return a, b, alpha


def interpolate_embeddings(key_embeds: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           alpha: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(K, ...) key embeddings -> (end - start, ...) per-frame embeddings for frames start..end-1 (modulo F:
    a loop's window may run past the end, 0 <= start < F, end - start <= F)."""
    num_frames = a.shape[0]
    if not (0 <= start <= end <= num_frames or 0 <= start < num_frames and end - start <= num_frames):
        raise ValueError(f"start, end: got ({start}, {end}), expected 0 <= start <= end <= {num_frames} "
                         f"(or a wrapping window: start < {num_frames}, end - start <= {num_frames})")
    device = key_embeds.device
    index = window_frames(start, end, num_frames)  # (n,)
    a = a[index].to(device)  # (n,)
    b = b[index].to(device)  # (n,)
    alpha = alpha[index].to(device)  # (n,)
    out = key_embeds[a].clone()  # (n, ...) exact copies of key a
    mix = (a != b) & (alpha != 0)  # (n,)
    if bool(mix.any()):
        view = (-1,) + (1,) * (key_embeds.dim() - 1)
        al = alpha[mix].to(torch.float32).view(view)  # (m, 1, ...)
        ea = key_embeds[a[mix]].to(torch.float32)  # (m, ...)
        eb = key_embeds[b[mix]].to(torch.float32)  # (m, ...)
        out[mix] = ((1 - al) * ea + al * eb).to(key_embeds.dtype)
    return out


@dataclass
class TextConditioning:
    """A job's text conditioning, as backends build it in `encode`: key-prompt embeddings and the per-frame
    interpolation schedule (latent frames). Only these few tensors travel, once per job (a worker holds them
    by their hash); each window's embeddings are made on the worker that predicts it. A window's own
    per-frame conditioning (its control frames) is attached on the worker (`for_window`), from the slice
    the engine sends with the window."""

    keys: torch.Tensor  # (K, seq, dim)
    negative: torch.Tensor  # (1, seq, dim)
    a: torch.Tensor  # (F,) key index before each frame
    b: torch.Tensor  # (F,) key index after each frame
    alpha: torch.Tensor  # (F,) weight of key b
    control: torch.Tensor | None = None  # (n, H, W, 3) uint8: the window's own control frames (a pose), in order
    control_scale: float = 1.0  # the ControlNet's conditioning scale

    def for_window(self, frames: dict[str, torch.Tensor]) -> "TextConditioning":
        """This conditioning with one window's own per-frame conditioning (`conditioning_frames` of each clip
        the engine holds): `control`; a subclass takes its media too."""
        if not frames:
            return self
        window = copy.copy(self)  # (attributes the engine set beside the fields, an image prompt's media, kept)
        window.control = frames.get("control")
        return window

    def control_frames(self) -> torch.Tensor:
        """The window's control frames, (L, 3, H, W) float32 in [0, 1], as diffusers' control video
        processor gives them."""
        return self.control.permute(0, 3, 1, 2).float() / 255

    def frames(self, start: int, end: int) -> torch.Tensor:
        """Per-frame embeddings of frames start..end-1 (UNets with motion modules)."""
        return interpolate_embeddings(self.keys, self.a, self.b, self.alpha, start, end)  # (L, seq, dim)

    def centre(self, start: int, end: int) -> torch.Tensor:
        """One embedding for a window (DiTs): the interpolation at its centre frame; for an even length, the
        mean of the two middle frames' (exactly the key's embedding when both are on one key)."""
        mid = (start + end - 1) // 2 % len(self.a)  # a loop's window may run past the end
        both = self.frames(mid, mid + 1 + (end - start + 1) % 2)  # (1 or 2, seq, dim)
        return both.mean(0, keepdim=True) if len(both) == 2 else both  # (1, seq, dim)
