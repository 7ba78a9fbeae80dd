"""Workers that die or fail: the window is retried on a replacement with identical frames, or the job
fails with a clear error within its retries, never hanging (DESIGN.md contract 7)."""

from __future__ import annotations

import sys
import threading
import time

from ray import cloudpickle
import pytest
import ray

from longtake.actors.pool import InProcessPool, WindowFailed
from longtake.actors.ray_pool import RayPool
from longtake.actors.worker import Worker, WorkerSpec
from longtake.cluster.engine import prepare, run

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


class SlowWorker(Worker):
    """Predicts normally but slowly, so a test can kill it mid-step."""

    def predict(self, *args):
        time.sleep(0.2)
        return super().predict(*args)


class BrokenWindowWorker(Worker):
    """Fails every prediction of the window that starts at frame 5."""

    def predict(self, z, t, cond, start, end, guidance):
        if start == 5:
            raise RuntimeError("injected fault in window 5")
        return super().predict(z, t, cond, start, end, guidance)


def _req(model, tmp_path, name, schedule="wavefront"):
    return prepare(dict(prompt="a red ball", seconds=3, fps=8, steps=3, window=8, overlap=3, model=model,
                        out=str(tmp_path / name), schedule=schedule))


def test_killed_worker_is_replaced_and_frames_are_identical(tmp_path, tiny_model, ray_session):
    ref_pool = InProcessPool(WorkerSpec(tiny_model))
    ref = run(_req(tiny_model, tmp_path, "ref.mp4", "barrier"), ref_pool, progress=False)  # the reference schedule
    ref_pool.shutdown()

    pool = RayPool(WorkerSpec(tiny_model), 2, worker_cls=SlowWorker)
    victim = pool.actors[0]
    killer = threading.Timer(1.0, lambda: ray.kill(victim, no_restart=True))  # mid-render, mid-step
    killer.start()
    try:
        res = run(_req(tiny_model, tmp_path, "killed.mp4"), pool, progress=False)
    finally:
        killer.cancel()
        pool.shutdown()
    assert pool.retries >= 1
    assert res.frames_sha256 == ref.frames_sha256


def test_window_failing_every_retry_fails_the_job_clearly(tmp_path, tiny_model, ray_session):
    pool = RayPool(WorkerSpec(tiny_model), 2, max_attempts=3, worker_cls=BrokenWindowWorker)
    t0 = time.monotonic()
    try:
        with pytest.raises(WindowFailed, match=r"^window 2 of 5 at step 1 of 3 failed 3 times; last error: RuntimeError: "
                                                 r"injected fault in window 5$"):
            run(_req(tiny_model, tmp_path, "broken.mp4"), pool, progress=False)
    finally:
        pool.shutdown()
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "broken.mp4").exists()


class NoWeightsWorker(Worker):
    def __init__(self, spec):
        raise RuntimeError("no weights here")


class SlowStartWorker(SlowWorker):
    def __init__(self, spec):
        time.sleep(1.5)
        super().__init__(spec)


def test_a_worker_that_cannot_start_is_excluded_with_its_error(ray_session, tiny_model):
    t0 = time.monotonic()
    with pytest.raises(WindowFailed, match=r"^no worker could start: RuntimeError: no weights here \(raised as the "
                                             r"worker started\)$"):  # the pool waits for its workers: fails at once
        RayPool(WorkerSpec(tiny_model), 2, max_attempts=2, worker_cls=NoWeightsWorker, start_timeout_s=60)
    assert time.monotonic() - t0 < 60


def test_a_worker_killed_while_it_starts_is_started_again_not_excluded(tmp_path, tiny_model, ray_session, caplog):
    """A starting actor killed (its node lost, a process killed) is not the worker's fault: with max_attempts 3,
    three such losses of one slot used to exclude it."""
    ref_pool = InProcessPool(WorkerSpec(tiny_model))
    ref = run(_req(tiny_model, tmp_path, "ref.mp4"), ref_pool, progress=False)
    ref_pool.shutdown()
    pool = RayPool(WorkerSpec(tiny_model), 2, max_attempts=3, worker_cls=SlowStartWorker)
    killed, stop = [], threading.Event()

    def killer():
        ray.kill(pool.actors[0], no_restart=True)  # the first actor, still starting: slot 0 is replaced
        killed.append("first")
        while len(killed) < 4 and not stop.is_set():
            starting = [a for a in list(pool.starting.values())]
            actor = pool.actors[0]
            if 0 in starting and actor is not None and actor not in killed:
                time.sleep(0.3)  # well inside its 1.5 s start
                ray.kill(actor, no_restart=True)
                killed.append(actor)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        res = run(_req(tiny_model, tmp_path, "restarted.mp4"), pool, progress=False)
    finally:
        stop.set()
        thread.join(10)
        pool.shutdown()
    assert len(killed) == 4, killed  # the first actor, then three replacements while they started
    assert pool.excluded == 0 and pool.start_failures[0] == 0 and pool.start_losses[0] == 3
    assert caplog.text.count("worker 0 was lost while starting") == 3 and "excluding" not in caplog.text
    assert res.frames_sha256 == ref.frames_sha256


class Sleeper(Worker):
    """No model: predict(seconds) sleeps that long and returns it (only the pool's dispatch is under test)."""

    def __init__(self, spec):
        self.spec = spec
        self.timings = {"predict": [], "decode": []}

    def predict(self, seconds):
        time.sleep(seconds)
        return seconds


def test_a_pool_reused_after_a_closed_imap_does_not_queue_behind_its_stale_tasks(tiny_model, ray_session):
    """A job stopped mid-step (cancelled or paused) closes its imap; ray.cancel does not stop an actor task
    already running, so the farm's pool, kept for the next job, must not queue that job's work behind it:
    the busy worker is left alone until it is done, or replaced after stale_timeout_s."""
    stale_s = 30.0
    pool = RayPool(WorkerSpec(tiny_model), 2, worker_cls=Sleeper, stale_timeout_s=2.0)
    try:
        victim = pool.actors[0]
        stopped = pool.imap("predict", [(0.0,), (0.5,)] + [(stale_s,)] * 6)
        # the results come in order: after the first, worker 0 takes task 2 (30 s) while worker 1 ends task 1
        assert next(stopped) == 0.0 and next(stopped) == 0.5
        stopped.close()  # as the engine does when a job is cancelled or paused
        t0 = time.monotonic()
        assert list(pool.imap("predict", [(0.0,)])) == [0.0]
        first = time.monotonic() - t0
        # past stale_timeout_s the busy worker is replaced: both slots serve again, nothing waits 30 s
        time.sleep(2.5)
        assert list(pool.imap("predict", [(0.0,), (0.0,)])) == [0.0, 0.0]
        second = time.monotonic() - t0
        replaced = pool.actors[0] is not victim
    finally:
        pool.shutdown()
    assert first < 5, f"the new task waited {first:.1f} s behind a cancelled one"
    assert second < stale_s / 2 and replaced and pool.retries == 0
