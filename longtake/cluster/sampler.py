"""The sampler: the latents and the scheduler state of a job, per frame range, and when each window runs.

The clip's frames are cut into ranges at every window edge, so each range is covered by a fixed set of
windows (1 or 2 in a plan with overlap < half a window). Each range has its own copy of the scheduler
(multistep solvers keep their history per range) and its own step count. When every window covering a
range has predicted step t, the range is fused (in window order, as `fuse` does for the whole clip) and
stepped to t + 1; a window runs step t + 1 as soon as all its ranges are there:

    wavefront   a window starts step t + 1 when its own ranges (so its neighbours) have finished step t
    barrier     a window starts step t + 1 when every range has (the reference schedule: all windows of a
                step, then the next step)

Both give the same frames: the same fusion sums and the same scheduler arithmetic per frame, only in
another order. That holds for a scheduler whose step is elementwise over the sample (DDIM, Euler, UniPC,
DPM-Solver, the flow-matching ones: checked on every job by `elementwise`, a few steps of the job's own
scheduler on a small tensor, whole against per range). A stochastic scheduler's step noise is seeded per
frame and step (`frame_seed`), the same for any range. A scheduler that is not elementwise (dynamic
thresholding over the whole sample) keeps one range over the clip: that is the barrier, logged.

Private frames: a family may carry latent frames of its own through the steps, one set per window, that no
other window sees (Wan-Animate's reference slot: `ModelInfo.options["private_frames"]`). The window's model
input is its private frames followed by its frames, its prediction comes back the same way; the private
part is stepped at once, by the window's own copy of the scheduler (their step noise seeded per window),
and never fused.

Checkpoints take one coherent step: the newest step every range has reached (`coherent_step`), from
snapshots each range (and each window's private frames) keeps of the steps it has passed since
(`snapshots=True`).

Memory and the driver's time (the clip's latents are gigabytes at studio sizes): each range's latents are a
tensor of their own that a step replaces and nothing writes after (the known frames are pinned into the step's
result before anything sees it), so the scheduler keeps the sample it was given without a copy, a snapshot is
a reference, and a range's model input is its latents themselves when the scheduler does not scale them; the
whole clip (`z`) is put together only when asked. A range's fusion and scheduler step run on `threads`
threads (torch releases the GIL), each range's arithmetic the same whichever thread runs it; a window becomes
ready once its ranges' steps are collected (`collect`, which the engine calls between the pool's results).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch

from longtake.cluster.checkpoint import restore_scheduler, scheduler_state
from longtake.core.windows import frame_seed, fuse, private_frame, take_window
from longtake.core import SCHEDULES

logger = logging.getLogger(__name__)

# the engine's threads for range steps (module docstring): one per 4 cores, at most 4. On a small machine the
# workers (and Ray) want the cores, and each thread's malloc arena keeps memory: on 2 cores, 2 threads gave the
# same wall time as 1 and a 1.35x larger driver heap (BENCHMARKS.md, Scale)
THREADS = min(4, max(1, (os.cpu_count() or 1) // 4))
STEP_NOISE = -1_000_000  # frame_seed's frame for a step's noise: STEP_NOISE - step (no clash with frames >= 0)


def frame_ranges(plan: list[tuple[int, int]], frames: int, loop: bool) -> list[tuple[int, int]]:
    """The clip's frames [0, frames) cut at every window edge (modulo `frames` for a loop's windows)."""
    cuts = {0, frames}
    for start, end in plan:
        cuts.update({start % frames, end % frames} if loop else {start, end})
    cuts = sorted(c for c in cuts if 0 <= c <= frames)
    return list(zip(cuts, cuts[1:]))


def _covers(window: tuple[int, int], frame: int, frames: int) -> bool:
    start, end = window
    return start <= frame < end or start <= frame + frames < end


def _offset(window: tuple[int, int], frame: int, frames: int) -> int:
    """Where a frame sits in a window (a loop's window past the end holds frames modulo `frames`)."""
    return frame - window[0] if frame >= window[0] else frame + frames - window[0]


@functools.lru_cache(maxsize=None)
def _step_params(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.step).parameters)


def step_kwargs(scheduler, seed: int, step: int, frames: tuple[int, int] | None) -> dict:
    """eta=0 for DDIM-like schedulers (as diffusers' pipelines: no step noise then); for stochastic ones,
    generators seeded from (seed, step): one per frame of `frames` (with the frames on the batch axis, see
    `_step`), or one for the whole sample when `frames` is None (one range over the clip)."""
    params = _step_params(type(scheduler))
    if "eta" in params:
        return {"eta": 0.0}
    kwargs = {}
    if "generator" in params:
        step_seed = frame_seed(seed, STEP_NOISE - step)
        if frames is None:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(step_seed)
        else:
            kwargs["generator"] = [torch.Generator("cpu").manual_seed(frame_seed(step_seed, f))
                                   for f in range(*frames)]
    return kwargs


def _step(scheduler, pred: torch.Tensor, t, sample: torch.Tensor, seed: int, step: int,
          frames: tuple[int, int] | None) -> torch.Tensor:
    """One scheduler step of a (1, C, n, h, w) sample. Per range (`frames` given) a stochastic scheduler
    gets the frames on the batch axis, (n, C, 1, h, w), and a generator per frame, so its noise for a frame
    is the same whichever range the frame is stepped in."""
    kwargs = step_kwargs(scheduler, seed, step, frames)
    if frames is not None and "generator" in kwargs:
        swap = (2, 1, 0, 3, 4)
        out = scheduler.step(pred.permute(swap).contiguous(), t, sample.permute(swap).contiguous(), **kwargs)
        return out.prev_sample.permute(swap).contiguous()
    return scheduler.step(pred, t, sample, **kwargs).prev_sample


def elementwise(scheduler, steps: int = 3) -> bool:
    """Whether stepping per frame range gives the same numbers as one step over the whole sample, for this
    scheduler as configured (its timesteps set): a few steps on a small random (1, 2, 4, 2, 2) sample,
    whole against two ranges, each with its own copy; dynamic thresholding is never elementwise."""
    if getattr(scheduler.config, "thresholding", False):
        return False
    probe = copy.deepcopy(scheduler)
    if hasattr(probe, "set_begin_index"):
        probe.set_begin_index(0)  # from the first step, whatever the job's first (video to video)
    steps = min(steps, len(probe.timesteps))
    gen = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(1, 2, 4, 2, 2, generator=gen) * getattr(probe, "init_noise_sigma", 1.0)
    preds = [torch.randn(1, 2, 4, 2, 2, generator=gen) for _ in range(steps)]
    whole, parts = copy.deepcopy(probe), [copy.deepcopy(probe), copy.deepcopy(probe)]
    ranges = [(0, 1), (1, 4)]
    a = sample.clone()
    b = [sample[:, :, s:e].clone() for s, e in ranges]
    try:
        for i, t in enumerate(probe.timesteps[:steps]):
            a = _step(whole, preds[i], t, _scaled(whole, a, t), 0, i, (0, 4))
            b = [_step(p, preds[i][:, :, s:e], t, _scaled(p, x, t), 0, i, (s, e))
                 for p, x, (s, e) in zip(parts, b, ranges)]
    except Exception as e:  # a scheduler that cannot step a part of a sample: one range, the barrier
        logger.info("%s cannot be stepped per frame range (%s: %s)", type(scheduler).__name__, type(e).__name__, e)
        return False
    return torch.equal(a, torch.cat(b, 2))


def _scaled(scheduler, z: torch.Tensor, t) -> torch.Tensor:
    return scheduler.scale_model_input(z, t) if hasattr(scheduler, "scale_model_input") else z


class Sampler:
    """A job's latents and scheduler state per frame range; `ready()` says which windows may run now.

        sampler = Sampler(z, scheduler, plan, weights, ...)   # z at `first_step`, scheduler prepared
        for window in sampler.ready(limit):                    # marks them dispatched
            x, t = sampler.window_input(window)                # its model input at its step
        sampler.add(window, pred)                              # fuses and steps the ranges it completes
        sampler.collect()                                      # (threads > 1) the range steps that finished
        sampler.done, sampler.z                                # when every range has made every step

    `private`: each window's private latent frames at `first_step` ((1, C, p, h, w) each; module docstring).
    `restore`: the scheduler states of a checkpoint, one per range then (with `private`) one per window.
    `threads`: range steps run on that many threads (1: in `add`, before it returns).
    """

    def __init__(self, z: torch.Tensor, scheduler, plan: list[tuple[int, int]], weights: list[torch.Tensor],
                 steps: int, first_step: int, seed: int, loop: bool = False, schedule: str = "wavefront",
                 pin=None, snapshots: bool = False, restore: list[dict] | None = None,
                 private: list[torch.Tensor] | None = None, threads: int = 1):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: got {schedule!r}, expected one of {', '.join(SCHEDULES)}")
        self.plan, self.weights, self.loop = plan, weights, loop
        self.frames = z.shape[2]
        self.steps, self.seed, self.pin = steps, seed, pin
        self.schedule = schedule
        self.per_range = elementwise(scheduler)
        if not self.per_range:
            logger.warning("%s is not elementwise over the sample (%s): one range over the clip, so the barrier "
                           "schedule", type(scheduler).__name__,
                           "dynamic thresholding" if getattr(scheduler.config, "thresholding", False)
                           else "stepping per frame range changes its numbers")
            self.schedule = "barrier"
        self.ranges = frame_ranges(plan, self.frames, loop) if self.per_range else [(0, self.frames)]
        if self.per_range:
            self.cover = [[w for w, window in enumerate(plan) if _covers(window, a, self.frames)] for a, _ in self.ranges]
        else:  # one range: every window
            self.cover = [list(range(len(plan)))]
        self.ranges_of = [[r for r, cover in enumerate(self.cover) if w in cover] for w in range(len(plan))]
        # each window's ranges in the order of its frames (a loop's window past the end wraps), as (range, offset)
        self.pieces = [sorted(((r, _offset(plan[w], self.ranges[r][0], self.frames)) for r in self.ranges_of[w]),
                              key=lambda p: p[1]) for w in range(len(plan))] if self.per_range else None
        self.schedulers = [copy.deepcopy(scheduler) for _ in self.ranges]
        if private is not None and len(private) != len(plan):
            raise ValueError(f"private: got {len(private)} windows' private frames, expected {len(plan)}")
        self.private = None if private is None else [p.clone() for p in private]
        self.private_schedulers = [] if private is None else [copy.deepcopy(scheduler) for _ in plan]
        if restore is not None:
            expected = len(self.ranges) + len(self.private_schedulers)
            if len(restore) != expected:
                raise ValueError(f"restore: got {len(restore)} scheduler states, expected {expected} (one per "
                                 f"frame range{', then one per window' if private is not None else ''})")
            for s, state in zip(self.schedulers + self.private_schedulers, restore):
                restore_scheduler(s, state)
        self.at = [first_step] * len(self.ranges)  # steps applied to each range
        self._low = first_step  # min(self.at), kept as ranges advance (one step at a time)
        self._at_low = len(self.ranges)  # ranges at that step
        self._candidates = set(range(len(plan)))  # windows that may have become ready since `ready()`
        self.next_step = [first_step] * len(plan)  # the step each window runs next
        self.dispatched = [False] * len(plan)  # its next step is running
        self.preds: list[torch.Tensor | None] = [None] * len(plan)  # its prediction at next_step - 1, until used
        self.parts = [z[:, :, a:b].clone() for a, b in self.ranges]  # each range's latents at at[r] (replaced)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.ranges)  # each range's model input at at[r]
        self.snapshots: list[dict[int, tuple]] | None = [{} for _ in self.ranges] if snapshots else None
        self.private_snapshots: list[dict[int, tuple]] | None = \
            [{} for _ in self.private_schedulers] if snapshots else None
        self.fuse_s = self.scheduler_s = 0.0
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="range-step") if threads > 1 else None
        self._advancing: dict = {}  # future -> (range, step): range steps running on the threads
        for r in range(len(self.ranges)):
            self._entered(r)
        for w in range(len(self.private_schedulers)):
            self._private_entered(w)

    @property
    def done(self) -> bool:
        return self._low >= self.steps

    @property
    def coherent_step(self) -> int:
        """The newest step every range has reached: what a checkpoint holds."""
        return self._low

    @property
    def advancing(self) -> int:
        """Range steps running on the threads (not collected yet)."""
        return len(self._advancing)

    @property
    def z(self) -> torch.Tensor:
        """The clip's latents (1, C, frames, h, w), every range at its step: put together (a copy; with one
        range, its tensor)."""
        return torch.cat(self.parts, 2) if len(self.parts) > 1 else self.parts[0]

    def release(self) -> torch.Tensor:
        """The denoised clip's latents (`z`), and everything else let go: the scheduler states, snapshots,
        predictions and per-range tensors (at studio sizes 3-4 x the clip's latents, which the decode after
        it does not need). The sampler only answers `steps`, `schedule` and `done` after this."""
        self.close()
        z = self.z
        self.parts, self.inputs, self.preds = [z], [], []
        self.schedulers, self.private_schedulers, self.private = [], [], None
        self.snapshots = self.private_snapshots = None
        return z

    def close(self) -> None:
        """Wait for the range steps still running and stop the threads (their results are dropped)."""
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._advancing.clear()

    def _entered(self, r: int) -> None:
        """Range r has reached step at[r]: its model input for that step, a snapshot for checkpoints."""
        step = self.at[r]
        if step < self.steps:
            s = self.schedulers[r]
            self.inputs[r] = _scaled(s, self.parts[r], s.timesteps[step])
        else:
            self.inputs[r] = None
        if self.snapshots is not None:
            self._snapshot(self.snapshots[r], step, self.parts[r], self.schedulers[r])

    def _private_entered(self, w: int) -> None:
        """Window w's private frames have reached its next step: a snapshot for checkpoints."""
        if self.private_snapshots is not None:
            self._snapshot(self.private_snapshots[w], self.next_step[w], self.private[w], self.private_schedulers[w])

    def _snapshot(self, snaps: dict, step: int, z: torch.Tensor, scheduler) -> None:
        """Keep (z, the scheduler's state) at `step`, as references (neither is written after: module
        docstring); drop those before the coherent step (no checkpoint can take them any more)."""
        snaps[step] = (z, scheduler_state(scheduler, copy=False))
        for old in [k for k in snaps if k < self.coherent_step]:
            del snaps[old]

    def ready(self, limit: int | None = None) -> list[int]:
        """Windows that may run their next step now, marked dispatched: the lowest step first, then window
        order; at most `limit` of them (the others stay ready for the next call, their inputs not built yet).
        Only windows next to a range that advanced are looked at (the barrier: all, when the coherent step
        advances)."""
        low = self._low
        out = []
        candidates, self._candidates = sorted(self._candidates, key=lambda w: (self.next_step[w], w)), set()
        for i, w in enumerate(candidates):
            step = self.next_step[w]
            if self.dispatched[w] or step >= self.steps:
                continue
            if any(self.at[r] != step for r in self.ranges_of[w]) or (self.schedule == "barrier" and low < step):
                continue
            if limit is not None and len(out) >= limit:
                self._candidates.update(candidates[i:])  # still ready: looked at again next time
                break
            self.dispatched[w] = True
            out.append(w)
        return out

    def window_input(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model input of window w at its next step (a new tensor; its private frames first), and the
        step's timestep."""
        start, end = self.plan[w]
        step = self.next_step[w]
        t = self.schedulers[self.ranges_of[w][0]].timesteps[step]
        if self.per_range:
            parts = [self.inputs[r] for r, _ in self.pieces[w]]
        else:
            parts = [take_window(self.inputs[0], start, end)]  # a copy
        if self.private is not None:
            parts.insert(0, _scaled(self.private_schedulers[w], self.private[w], t))
        if len(parts) == 1:
            return (parts[0] if not self.per_range else parts[0].clone()), t
        return torch.cat(parts, dim=2), t

    def add(self, w: int, pred: torch.Tensor) -> None:
        """Window w's prediction at its step (its private frames first): its private frames are stepped,
        and every range it completes is fused and stepped (on the threads: `collect`)."""
        step = self.next_step[w]
        if self.private is not None:
            n = self.private[w].shape[2]
            t0 = time.perf_counter()
            s = self.private_schedulers[w]
            self.private[w] = _step(s, pred[:, :, :n], s.timesteps[step], self.private[w],
                                    frame_seed(self.seed, private_frame(w)), step, None)
            self.scheduler_s += time.perf_counter() - t0
            pred = pred[:, :, n:]
        self.preds[w], self.next_step[w], self.dispatched[w] = pred, step + 1, False
        for r in self.ranges_of[w]:
            if self.at[r] == step and all(self.next_step[v] > step for v in self.cover[r]):
                self._advance(r, step)
        if self.private is not None:
            self._private_entered(w)

    def _advance(self, r: int, step: int) -> None:
        """Fuse range r's predictions at `step` and step it: on a thread, or here."""
        a, b = self.ranges[r]
        n = b - a
        if self.per_range:
            parts, weights = [], []
            for v in self.cover[r]:  # window order, as `fuse` over the whole clip
                off = _offset(self.plan[v], a, self.frames)
                parts.append(self.preds[v][:, :, off:off + n])
                weights.append(self.weights[v][off:off + n])
            args = (r, step, parts, [(0, n)] * len(parts), weights, n, False)
        else:
            args = (r, step, list(self.preds), self.plan, self.weights, self.frames, self.loop)
        if self._threads is None:
            self._finish(r, step, self._compute(*args))
        else:
            self._advancing[self._threads.submit(self._compute, *args)] = (r, step)

    def _compute(self, r: int, step: int, parts, plan, weights, n: int, loop: bool):
        """Range r's latents at step + 1 from its predictions at `step` (any thread: reads its arguments
        and its own scheduler only). One window: its prediction is the fusion, exactly ((p w) / w in float64
        is p for a float32 p: the product is exact in 53 bits), without fusion's float64 pass over it."""
        t0 = time.perf_counter()
        fused = parts[0] if len(parts) == 1 and self.per_range else fuse(parts, plan, weights, n, loop=loop)
        t1 = time.perf_counter()
        s = self.schedulers[r]
        a, b = self.ranges[r]
        sample = self.parts[r]
        z = _step(s, fused, s.timesteps[step], sample, self.seed, step, (a, b) if self.per_range else None)
        if z.data_ptr() == sample.data_ptr():
            z = z.clone()  # the scheduler may keep `sample`: the pin below writes z
        if self.pin is not None:
            self.pin(z, a)
        return z, t1 - t0, time.perf_counter() - t1

    def collect(self, timeout: float = 0.0) -> int:
        """Take the range steps that finished on the threads (waiting up to `timeout` seconds for one): the
        windows they complete become ready. Returns how many were taken; a step's error is raised here."""
        if not self._advancing:
            return 0
        finished, _ = wait(list(self._advancing), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in sorted(finished, key=lambda f: self._advancing[f]):
            r, step = self._advancing.pop(future)
            self._finish(r, step, future.result())
        return len(finished)

    def _finish(self, r: int, step: int, result) -> None:
        """Range r reached step + 1: its latents, the coherent step, the windows it may make ready."""
        z, fuse_s, scheduler_s = result
        self.parts[r] = z
        self.fuse_s += fuse_s
        self.scheduler_s += scheduler_s
        self.at[r] = step + 1
        if step == self._low:
            self._at_low -= 1
            if self._at_low == 0:  # the last range of the coherent step: the next is reached by this one
                self._low = step + 1
                self._at_low = sum(1 for x in self.at if x == step + 1)
                if self.schedule == "barrier":
                    self._candidates.update(range(len(self.plan)))
        self._candidates.update(self.cover[r])
        self._entered(r)
        for v in self.cover[r]:
            if all(self.at[q] > step for q in self.ranges_of[v]):
                self.preds[v] = None  # every range it covers is past that step

    def state(self, step: int) -> tuple[torch.Tensor, list[tuple[dict, dict]], torch.Tensor | None]:
        """The latents, each range's (then each window's private) scheduler state, and the windows' private
        frames ((W, C, p, h, w), or None) at `step` (a step every range has reached, from the snapshots):
        what a checkpoint stores."""
        if self.snapshots is None:
            raise ValueError("state: this sampler keeps no snapshots (snapshots=False)")
        parts = [snaps[step] for snaps in self.snapshots]
        private = [snaps[step] for snaps in self.private_snapshots]
        z = torch.cat([z for z, _ in parts], 2)
        states = [state for _, state in parts + private]
        return z, states, torch.cat([p for p, _ in private], 0) if private else None

