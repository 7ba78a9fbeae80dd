"""The wavefront schedule through the engine and the pools (#16): the same frames as the barrier on the
in-process and Ray pools (a single window, odd window counts, a loop; a killed worker: test_faults), the
fallback of a scheduler that is not elementwise, a resume from a checkpoint taken mid-wavefront, and a
cancel mid-wavefront that leaves the pool free for the next job."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest

from longtake.actors.pool import InProcessPool
from longtake.actors.ray_pool import RayPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.checkpoint import Checkpointer
from longtake.cluster.engine import Cancelled, prepare, run
from longtake.cluster.checkpoint import fingerprint

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)

CASES = {  # 8 frames a window, 2 shared: 1, 5 and 4 (circular) windows
    "one window": {"seconds": 1},
    "five windows": {"seconds": 3.5},
    "loop": {"seconds": 3, "loop": True},
}


def _request(model, tmp_path, name, **kw) -> dict:
    return {"prompt": "a red ball", "fps": 8, "steps": 3, "window": 8, "overlap": 2, "model": model, "seed": 5,
            "out": str(tmp_path / f"{name}.mp4"), **kw}


class NewestFirstPool(InProcessPool):
    """One worker that runs the newest ready window first: the wavefront runs far ahead on the left while
    the right waits (a worst case for the order results arrive in)."""

    def submit(self, method, args, key=(), label=None):
        return super().submit(method, args, tuple(-k for k in key), label)


@pytest.fixture(scope="module")
def pools(tiny_model, ray_session):
    """The in-process pool, the newest-first one and 2 Ray workers, shared by the cases."""
    made = {"in-process": InProcessPool(WorkerSpec(tiny_model)), "newest first": NewestFirstPool(WorkerSpec(tiny_model)),
            "ray": RayPool(WorkerSpec(tiny_model), 2)}
    yield made
    for pool in made.values():
        pool.shutdown()


@pytest.mark.parametrize("case", list(CASES))
def test_wavefront_frames_equal_barrier_frames_on_every_pool(tmp_path, tiny_model, pools, case):
    results = {}
    for pool_name, pool in pools.items():
        for schedule in ("barrier", "wavefront"):
            req = _request(tiny_model, tmp_path, f"{pool_name}-{schedule}", schedule=schedule, **CASES[case])
            results[pool_name, schedule] = run(prepare(req), pool, progress=False)
    shas = {key: r.frames_sha256 for key, r in results.items()}
    assert len(set(shas.values())) == 1, shas
    assert {r.schedule for (_, schedule), r in results.items() if schedule == "wavefront"} == {"wavefront"}
    assert {r.model_evaluations for r in results.values()} == {3 * results["ray", "barrier"].windows}


def test_a_scheduler_that_is_not_elementwise_falls_back_to_the_barrier(tmp_path, tiny_model, caplog):
    model = tmp_path / "thresholding"
    shutil.copytree(tiny_model, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "thresholding": True}))
    pool = InProcessPool(WorkerSpec(str(model)))
    with caplog.at_level(logging.WARNING):
        wave = run(prepare(_request(str(model), tmp_path, "wave", seconds=3.5)), pool, progress=False)
    barrier = run(prepare(_request(str(model), tmp_path, "barrier", seconds=3.5, schedule="barrier")), pool,
                  progress=False)
    assert wave.schedule == "barrier" and wave.frames_sha256 == barrier.frames_sha256
    assert "DDIMScheduler is not elementwise over the sample (dynamic thresholding)" in caplog.text


def test_resume_from_a_checkpoint_taken_mid_wavefront_gives_the_same_frames(tmp_path, tiny_model, ray_session):
    req = _request(tiny_model, tmp_path, "straight", seconds=3.5)
    straight = run(prepare(req), InProcessPool(WorkerSpec(tiny_model)), progress=False)
    job = prepare({**req, "out": str(tmp_path / "resumed.mp4")})
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, fingerprint=fingerprint(job, "float32", "cpu"))
    events = []
    # newest first: the right of the clip runs ahead (window 5 has made all 3 steps after 6 predictions) while
    # window 1 has not begun; after 11 predictions every frame has made step 1, and some frames 2 or 3
    with pytest.raises(Cancelled) as stopped:
        run(job, NewestFirstPool(WorkerSpec(tiny_model)), progress=False, checkpoint=ckpt, on_progress=events.append,
            cancelled=lambda: "paused" if len(events) >= 11 else None)
    steps_seen = [e["step"] for e in events]
    assert steps_seen == [0] * 9 + [1] * 2 and stopped.value.step == 1, steps_seen
    assert events[-1]["window_steps_done"] == 11 > 5 * 1  # windows ran ahead of the step the checkpoint holds
    saved = ckpt.load_latest()
    assert saved.step == 1 and len(saved.schedulers) > 1  # one coherent step, a scheduler state per range
    pool = RayPool(WorkerSpec(tiny_model), 2)
    try:
        resumed = run(job, pool, progress=False, checkpoint=ckpt)
    finally:
        pool.shutdown()
    assert resumed.resumed_from_step == 1 and resumed.frames_sha256 == straight.frames_sha256


def test_cancel_mid_wavefront_frees_the_workers(tmp_path, tiny_model, ray_session):
    reference = run(prepare(_request(tiny_model, tmp_path, "ref", seconds=3.5, seed=6)),
                    InProcessPool(WorkerSpec(tiny_model)), progress=False)
    stale_s = 300.0  # how long a worker may finish a cancelled window before it is replaced: far above `took`
    pool = RayPool(WorkerSpec(tiny_model), 2, stale_timeout_s=stale_s)
    try:
        events = []
        with pytest.raises(Cancelled):
            run(prepare(_request(tiny_model, tmp_path, "cancelled", seconds=3.5)), pool, progress=False,
                on_progress=events.append, cancelled=lambda: len(events) >= 3)
        assert not (tmp_path / "cancelled.mp4").exists()
        assert pool.outstanding == 0 and not pool.tickets.queued and pool._inflight == {}  # nothing of it left
        t0 = time.monotonic()
        after = run(prepare(_request(tiny_model, tmp_path, "after", seconds=3.5, seed=6)), pool, progress=False)
        took = time.monotonic() - t0
    finally:
        pool.shutdown()
    assert after.frames_sha256 == reference.frames_sha256 and after.workers == 2
    assert took < stale_s / 10, f"the next job took {took:.0f} s: it waited for the cancelled job's workers"
