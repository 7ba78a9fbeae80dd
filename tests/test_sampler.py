"""The sampler (#16): windows finishing in any order give the frames of the barrier schedule, and of one
fuse and one scheduler step over the whole clip per step (the engine before the wavefront); checkpoints of a
wavefront hold one coherent step; schedulers that are not elementwise fall back to the barrier.

A stand-in model couples the frames of a window (as a temporal model does), so a window that ran on
frames of the wrong step would change the result."""

from __future__ import annotations

import copy
import logging
import random

import diffusers
import pytest
import torch

from longtake.cluster.sampler import Sampler, elementwise, frame_ranges, step_kwargs
from longtake.core.windows import fuse, plan_loop, plan_windows, take_window, window_weights

SHAPE = (2, 3, 3)  # (C, h, w) of a latent frame


def model(x: torch.Tensor, t) -> torch.Tensor:
    """A window's prediction from its input alone: frames mixed with their neighbours and the window mean."""
    return 0.6 * x + 0.3 * x.roll(1, dims=2) - 0.2 * x.mean(dim=2, keepdim=True) + float(t) / 2000


SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(num_train_timesteps=1000),
    "euler": lambda: diffusers.EulerDiscreteScheduler(num_train_timesteps=1000),
    "unipc-flow": lambda: diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                                            use_flow_sigmas=True, flow_shift=3.0),  # Wan's
    "dpm++": lambda: diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000),
    "flow-euler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    "euler-ancestral": lambda: diffusers.EulerAncestralDiscreteScheduler(num_train_timesteps=1000),  # stochastic
}
STOCHASTIC = {"euler-ancestral"}
PLANS = {  # (frames, plan, loop)
    "one window": (5, plan_windows(5, 8, 2), False),
    "odd count": (23, plan_windows(23, 8, 3), False),
    "even": (16, plan_windows(16, 6, 2), False),
    "loop": (14, plan_loop(14, 6, 2), True),
}
STEPS = 5


def _scheduler(name: str):
    s = SCHEDULERS[name]()
    s.set_timesteps(STEPS)
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(0)
    return s


def _start(frames: int, scheduler) -> torch.Tensor:
    gen = torch.Generator().manual_seed(frames)
    return torch.randn(1, *SHAPE[:1], frames, *SHAPE[1:], generator=gen) * getattr(scheduler, "init_noise_sigma", 1.0)


def _sampler(name: str, plan_name: str, schedule: str, **kw) -> Sampler:
    frames, plan, loop = PLANS[plan_name]
    s = _scheduler(name)
    z = kw.pop("z", None)
    weights = window_weights(plan, "pyramid", frames if loop else 0)
    return Sampler(_start(frames, s) if z is None else z, s, plan, weights, len(s.timesteps), kw.pop("first_step", 0),
                   seed=7, loop=loop, schedule=schedule, **kw)


def drive(sampler: Sampler, order: random.Random | None, stop_after: int | None = None,
          limit: int | None = None) -> int:
    """Run the sampler as a pool would: windows dispatched when ready (at most `limit` running, as the
    engine fills its workers), finishing in a random order (None: the order they were dispatched). Returns
    the predictions made."""
    running, made = [], 0
    while not sampler.done and (stop_after is None or made < stop_after):
        for w in sampler.ready(None if limit is None else limit - len(running)):
            running.append((w, *sampler.window_input(w)))
        if not running and sampler.advancing:  # range steps on the sampler's threads: wait for one
            sampler.collect(timeout=10)
            continue
        assert running, "no window can run: the schedule is stuck"
        w, x, t = running.pop(order.randrange(len(running)) if order else 0)
        sampler.add(w, model(x, t))
        made += 1
    return made


def whole_clip(name: str, plan_name: str) -> torch.Tensor:
    """The engine before the wavefront: every window, one fuse and one scheduler step over the whole clip."""
    frames, plan, loop = PLANS[plan_name]
    s = _scheduler(name)
    z = _start(frames, s)
    weights = window_weights(plan, "pyramid", frames if loop else 0)
    for i, t in enumerate(s.timesteps):
        x = s.scale_model_input(z, t) if hasattr(s, "scale_model_input") else z
        preds = [model(take_window(x, a, b), t) for a, b in plan]
        z = s.step(fuse(preds, plan, weights, frames, loop=loop), t, z, **step_kwargs(s, 7, i, None)).prev_sample
    return z


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_any_finishing_order_gives_the_barrier_frames(name, plan_name):
    barrier = _sampler(name, plan_name, "barrier")
    made = drive(barrier, None)
    assert barrier.schedule == "barrier" and made == len(PLANS[plan_name][1]) * STEPS
    for seed, threads in ((0, 1), (1, 1), (2, 3)):  # (the last: range steps on 3 threads, collected as they end)
        wave = _sampler(name, plan_name, "wavefront", threads=threads)
        drive(wave, random.Random(seed))
        wave.close()
        assert wave.schedule == "wavefront"
        assert torch.equal(wave.z, barrier.z), f"finishing order {seed}, {threads} threads"
    if name not in STOCHASTIC:  # (their step noise is now per frame: not the whole-clip generator's)
        assert torch.equal(barrier.z, whole_clip(name, plan_name))


def test_the_wavefront_runs_ahead_where_the_barrier_waits():
    """With windows 0 and 1 done, the barrier lets nothing run; the wavefront lets window 0 run step 2 (its
    frames are fused), and never a window whose neighbour has not finished."""
    for schedule, expected in (("barrier", []), ("wavefront", [0])):
        sampler = _sampler("ddim", "odd count", schedule)
        first = sampler.ready()
        assert first == list(range(len(PLANS["odd count"][1])))
        for w in (0, 1):
            sampler.add(w, model(*sampler.window_input(w)))
        assert sampler.ready() == expected, schedule
        assert sampler.coherent_step == 0


def test_a_limit_takes_the_lowest_steps_first_and_keeps_the_rest_ready():
    """The engine builds only the inputs its workers can start (`ready(limit)`): the windows left out stay
    ready, the lowest step goes first, and the frames are the barrier's whatever the limit."""
    sampler = _sampler("unipc-flow", "odd count", "wavefront")
    count = len(PLANS["odd count"][1])
    assert sampler.ready(2) == [0, 1] and sampler.ready(1) == [2] and sampler.ready(0) == []
    for w in (0, 1):
        sampler.add(w, model(*sampler.window_input(w)))
    # window 0 may run step 1 now, but the windows still at step 0 come first
    assert sampler.ready(count) == [*range(3, count), 0]
    barrier = _sampler("unipc-flow", "odd count", "barrier")
    drive(barrier, None)
    for limit, seed in ((1, 0), (2, 1), (3, 2)):
        limited = _sampler("unipc-flow", "odd count", "wavefront")
        drive(limited, random.Random(seed), limit=limit)
        assert torch.equal(limited.z, barrier.z), f"at most {limit} running"


def test_frame_ranges_cut_at_every_window_edge():
    assert frame_ranges([(0, 8), (5, 13), (10, 18)], 18, loop=False) == [(0, 5), (5, 8), (8, 10), (10, 13),
                                                                          (13, 18)]
    assert frame_ranges([(0, 8)], 8, loop=False) == [(0, 8)]
    # a loop's last window runs past the end: its edge past the end cuts frame 2
    assert frame_ranges([(0, 6), (4, 10), (8, 14)], 12, loop=True) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10),
                                                                        (10, 12)]


@pytest.mark.parametrize("threads", [1, 3])
def test_a_checkpoint_of_a_wavefront_holds_one_coherent_step_and_resumes_exactly(threads):
    """(Snapshots are the ranges' own tensors, not copies: nothing may write them after their step.)"""
    name, plan_name = "unipc-flow", "odd count"  # a multistep solver: its history is per range
    reference = _sampler(name, plan_name, "barrier", snapshots=True)
    drive(reference, None)
    wave = _sampler(name, plan_name, "wavefront", snapshots=True, threads=threads)
    drive(wave, random.Random(1), stop_after=13)
    while wave.advancing:
        wave.collect(timeout=10)
    wave.close()
    step = wave.coherent_step
    assert 0 < step < STEPS and max(wave.at) > step, (wave.at, "the ranges should be at different steps")
    z, states, private = wave.state(step)
    assert private is None  # no private frames asked for
    ref_z, ref_states, _ = reference.state(STEPS)  # (the reference keeps only its last step)
    barrier_at_step = _sampler(name, plan_name, "barrier", snapshots=True)
    drive(barrier_at_step, None, stop_after=step * len(PLANS[plan_name][1]))
    assert barrier_at_step.coherent_step == step
    assert torch.equal(z, barrier_at_step.state(step)[0])
    resumed = _sampler(name, plan_name, "wavefront", z=z.clone(), first_step=step,
                       restore=[_restore(tensors, scalars) for tensors, scalars in states], threads=threads)
    drive(resumed, random.Random(2))
    resumed.close()
    assert torch.equal(resumed.z, reference.z) and torch.equal(resumed.z, ref_z)


def _restore(tensors: dict, scalars: dict) -> dict:
    """A scheduler state as a checkpoint file gives it back (see Checkpointer.read)."""
    state = {}
    for name, entry in scalars.items():
        if "tensor_list" in entry:
            state[name] = [tensors.get(f"scheduler.{name}.{i}") for i in range(entry["tensor_list"])]
        else:
            state[name] = entry["value"]
    state.update({k.split(".", 1)[1]: v for k, v in tensors.items() if k.count(".") == 1})
    return state


def test_a_checkpoint_file_of_a_wavefront_round_trips(tmp_path):
    from longtake.cluster.checkpoint import Checkpointer

    wave = _sampler("dpm++", "odd count", "wavefront", snapshots=True)
    drive(wave, random.Random(3), stop_after=11)
    step = wave.coherent_step
    ckpt = Checkpointer(tmp_path, every=1, fingerprint="f")
    ckpt.save(step, *wave.state(step))
    state = ckpt.load_latest()
    assert state.step == step and len(state.schedulers) == len(wave.ranges) > 1
    resumed = _sampler("dpm++", "odd count", "wavefront", z=state.z, first_step=step, restore=state.schedulers)
    drive(resumed, random.Random(4))
    straight = _sampler("dpm++", "odd count", "barrier")
    drive(straight, None)
    assert torch.equal(resumed.z, straight.z)


def test_dynamic_thresholding_is_not_elementwise_and_falls_back_to_the_barrier(caplog):
    thresholding = diffusers.DDIMScheduler(num_train_timesteps=1000, thresholding=True)
    thresholding.set_timesteps(STEPS)
    assert not elementwise(thresholding)
    for name in SCHEDULERS:
        assert elementwise(_scheduler(name)), name
    frames, plan, _ = PLANS["odd count"]
    with caplog.at_level(logging.WARNING):
        sampler = Sampler(_start(frames, thresholding), copy.deepcopy(thresholding), plan,
                          window_weights(plan, "pyramid"), STEPS, 0, seed=7, schedule="wavefront")
    assert sampler.schedule == "barrier" and sampler.ranges == [(0, frames)]
    assert "not elementwise" in caplog.text and "dynamic thresholding" in caplog.text
    drive(sampler, random.Random(0))
    z = _start(frames, thresholding)  # the whole-clip reference, quantiles over the whole sample
    for i, t in enumerate(thresholding.timesteps):
        preds = [model(take_window(z, a, b), t) for a, b in plan]
        z = thresholding.step(fuse(preds, plan, window_weights(plan, "pyramid"), frames), t, z, eta=0.0).prev_sample
    assert torch.equal(sampler.z, z)


def test_stochastic_step_noise_is_per_frame():
    """The step noise of a frame is the same whichever range it is stepped in: a generator per frame."""
    s = _scheduler("euler-ancestral")
    a = step_kwargs(s, 7, 2, (0, 6))["generator"]
    b = step_kwargs(s, 7, 2, (4, 9))["generator"]
    assert [g.initial_seed() for g in a[4:]] == [g.initial_seed() for g in b[:2]]
    assert len({g.initial_seed() for g in a}) == 6
    assert step_kwargs(s, 7, 3, (4, 5))["generator"][0].initial_seed() != b[0].initial_seed()  # and per step


def _private(plan_name: str, scheduler) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    return [torch.randn(1, SHAPE[0], 1, *SHAPE[1:], generator=gen) * sigma for _ in PLANS[plan_name][1]]


@pytest.mark.parametrize("name", ["unipc-flow", "euler-ancestral"])
def test_private_frames_are_the_windows_own_state_through_the_steps(tmp_path, name):
    """A window's private frame (Wan-Animate's reference slot) goes first in its input, is stepped with the
    window's own scheduler and never fused: one window equals stepping [private, frames] as one sample (what
    diffusers does with a segment and its slot); any finishing order equals the barrier; a checkpoint file
    taken mid-wavefront (private frames and their solver history in it) resumes exactly."""
    from longtake.cluster.checkpoint import Checkpointer

    s = _scheduler(name)
    one = _sampler(name, "one window", "wavefront", private=_private("one window", s))
    drive(one, None)
    if name not in STOCHASTIC:  # (the private frames' step noise is their own, not a whole-sample generator's)
        whole = torch.cat([_private("one window", s)[0], _start(PLANS["one window"][0], s)], dim=2)
        for t in s.timesteps:
            x = s.scale_model_input(whole, t) if hasattr(s, "scale_model_input") else whole
            whole = s.step(model(x, t), t, whole).prev_sample
        assert torch.equal(torch.cat([one.private[0], one.z], 2), whole)

    plan_name = "odd count"
    barrier = _sampler(name, plan_name, "barrier", private=_private(plan_name, s))
    drive(barrier, None)
    plain = _sampler(name, plan_name, "barrier")
    drive(plain, None)
    assert not torch.equal(barrier.z, plain.z)  # the private frames reach the windows' frames
    wave = _sampler(name, plan_name, "wavefront", private=_private(plan_name, s), snapshots=True)
    drive(wave, random.Random(5), stop_after=13)
    step = wave.coherent_step
    assert 0 < step < STEPS and max(wave.next_step) > step
    ckpt = Checkpointer(tmp_path, every=1, fingerprint="f")
    ckpt.save(step, *wave.state(step))
    state = ckpt.load_latest()
    n = len(PLANS[plan_name][1])
    assert state.private.shape == (n, SHAPE[0], 1, *SHAPE[1:])
    assert len(state.schedulers) == len(wave.ranges) + n
    with pytest.raises(ValueError, match="one per window"):
        _sampler(name, plan_name, "wavefront", z=state.z, first_step=step, restore=state.schedulers[:-1],
                 private=list(state.private.split(1, 0)))
    resumed = _sampler(name, plan_name, "wavefront", z=state.z, first_step=step, restore=state.schedulers,
                       private=list(state.private.split(1, 0)))
    drive(resumed, random.Random(6))
    drive(wave, random.Random(7))
    for other in (wave, resumed):
        assert torch.equal(other.z, barrier.z)
        assert all(torch.equal(a, b) for a, b in zip(other.private, barrier.private))
