"""Workers that die or fail: the window is retried on a replacement with identical frames, or the job
fails with a clear error within its retries, never hanging (DESIGN.md contract 7)."""

from __future__ import annotations

import os
import sys
import threading
import time

from ray import cloudpickle
import pytest
import ray

from longtake.actors.pool import InProcessPool, WindowFailed
from longtake.actors.ray_pool import RayPool
from longtake.actors.worker import Worker, WorkerSpec
from longtake.cluster.engine import Cancelled, prepare, run

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)

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
    stale_s = 120.0  # far beyond a replacement actor's start on a loaded machine (CI once took 11 s)
    pool = RayPool(WorkerSpec(tiny_model), 2, worker_cls=Sleeper, stale_timeout_s=2.0)
    try:
        victim = pool.actors[0]
        stopped = pool.imap("predict", [(0.0,), (0.5,)] + [(stale_s,)] * 6)
        # the results come in order: after the first, worker 0 takes task 2 (120 s) while worker 1 ends task 1,
        # and worker 1 may take task 3 (120 s) before the close: then both slots wait for stale_timeout_s
        assert next(stopped) == 0.0 and next(stopped) == 0.5
        stopped.close()  # as the engine does when a job is cancelled or paused
        t0 = time.monotonic()
        assert list(pool.imap("predict", [(0.0,)])) == [0.0]
        first = time.monotonic() - t0
        # past stale_timeout_s the busy worker is replaced: both slots serve again, nothing waits 120 s
        time.sleep(2.5)
        assert list(pool.imap("predict", [(0.0,), (0.0,)])) == [0.0, 0.0]
        second = time.monotonic() - t0
        replaced = pool.actors[0] is not victim
    finally:
        pool.shutdown()
    # at most stale_timeout_s and a new actor's start (seconds, 11 s once on a loaded 2-core machine), never the
    # 120 s task
    assert first < stale_s / 3, f"the new task waited {first:.1f} s behind a cancelled one"
    assert second < stale_s / 2 and replaced and pool.retries == 0


class Napper(Worker):
    """No model. predict(seconds) sleeps that long and returns it, except that the first task given "hang"
    (one per `marker` file, whichever worker takes it) never returns; decode_stream(n, chunk) yields 0, 1, ...
    at once, then hangs before item `chunk`."""

    def __init__(self, spec):
        self.spec = spec
        self.timings = {"predict": [], "decode": []}

    def predict(self, seconds, marker=None):
        if marker is not None:
            try:
                os.unlink(marker)  # the first to take it hangs; a retry finds no marker and returns
            except FileNotFoundError:
                return 0.0
            time.sleep(3600)
        time.sleep(seconds)
        return seconds

    def decode_stream(self, n, chunk, skip=0):
        for i in range(skip, n):
            if i == chunk:
                time.sleep(3600)
            yield i


@pytest.mark.timeout(120)
def test_a_hung_worker_is_replaced_by_the_measured_time_limit_and_its_task_retried(tmp_path, tiny_model, ray_session):
    """No task_timeout_s given (the default of render and farm run): the limit is 10x the slowest task so far,
    at least the floor; a worker alive but hung past it is replaced and its task runs again."""
    marker = tmp_path / "hang"
    marker.touch()
    pool = RayPool(WorkerSpec(tiny_model), 2, worker_cls=Napper, timeout_floor_s=2.0, first_timeout_s=60)
    try:
        t0 = time.monotonic()
        results = list(pool.imap("predict", [(0.05,)] * 4 + [(0.05, str(marker))] + [(0.05,)] * 3))
        took = time.monotonic() - t0
        assert pool.timeout("predict") == 2.0  # 10 x about 0.05 s is below the floor
    finally:
        pool.shutdown()
    assert results == [0.05] * 4 + [0.0] + [0.05] * 3 and pool.retries == 1
    assert took < 30, f"{took:.0f} s: the hung task waited for more than the measured limit"


@pytest.mark.timeout(120)
def test_a_hung_stream_is_stopped_by_its_tick_and_failed_by_its_time_limit(tiny_model, ray_session):
    # the floor above two stop checks (WAIT_S apart): the caller stops it before its time limit can, however
    # fast the first items came (10 x their time may be under the floor); its actor, left sleeping in item 2,
    # is replaced 5 s after (if Ray did not interrupt it)
    pool = RayPool(WorkerSpec(tiny_model), 1, worker_cls=Napper, timeout_floor_s=2.5, max_attempts=2,
                   stale_timeout_s=5.0)
    try:
        ticks = []

        def tick():
            ticks.append(time.monotonic())
            if len(ticks) == 2:
                raise InterruptedError("stop")

        stream = pool.stream("decode_stream", (5, 2), tick=tick)
        assert [next(stream), next(stream)] == [0, 1]
        t0 = time.monotonic()
        with pytest.raises(InterruptedError):  # the caller's stop check runs while item 2 is awaited
            next(stream)
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        with pytest.raises(WindowFailed, match="decode_stream failed 2 times; last error: GetTimeoutError"):
            list(pool.stream("decode_stream", (5, 2)))  # item 2 never comes: replaced, retried, then failed
        assert time.monotonic() - t0 < 60
    finally:
        pool.shutdown()


class HangAfterFirstStep(Worker):
    """Predicts the first window of each step normally, then every prediction hangs (all workers at once, as
    a wedged GPU driver would): nothing comes back to the engine. `flag` is created when the hang begins."""

    flag = ""

    def predict(self, z, t, cond, start, end, guidance):
        if os.path.exists(self.flag) or start > 0:
            open(self.flag, "a").close()
            time.sleep(3600)
        return super().predict(z, t, cond, start, end, guidance)


@pytest.mark.timeout(120)
def test_a_job_whose_workers_all_hang_stops_at_once_when_cancelled(tmp_path, tiny_model, ray_session):
    """Cancel, pause and shutdown reach a job whose windows never come back (the time limit is far away)."""
    HangAfterFirstStep.flag = str(tmp_path / "hung")
    pool = RayPool(WorkerSpec(tiny_model), 2, worker_cls=HangAfterFirstStep, task_timeout_s=600)
    try:
        t0 = time.monotonic()
        with pytest.raises(Cancelled) as stop:
            run(_req(tiny_model, tmp_path, "hung.mp4"), pool, progress=False,
                cancelled=lambda: "paused" if os.path.exists(HangAfterFirstStep.flag) else None)
        took = time.monotonic() - t0
    finally:
        pool.shutdown()
    assert stop.value.reason == "paused" and took < 30
    assert not (tmp_path / "hung.mp4").exists()


class StreamRecorder(Worker):
    """An in-process worker whose decode session records when it is closed."""

    closed = False

    def decode_stream(self, z, chunk, skip=0):
        try:
            yield from super().decode_stream(z, chunk, skip)
        finally:
            self.closed = True


def test_a_decode_stream_is_closed_when_the_job_stops_during_decode(tmp_path, tiny_wan_model):
    """Cancelled mid-decode (or a full disk, an ffmpeg error): the decode session ends at once, not when the
    garbage collector gets to it (the traceback kept below holds the engine's frame and its locals)."""
    pool = InProcessPool(WorkerSpec(tiny_wan_model))
    pool.worker = StreamRecorder(pool.spec)
    phases = []
    request = dict(prompt="a cat", seconds=2, fps=8, steps=2, model=tiny_wan_model, out=str(tmp_path / "w.mp4"))
    with pytest.raises(Cancelled) as stopped:
        run(prepare(request), pool, progress=False, on_progress=lambda p: phases.append(p["phase"]),
            cancelled=lambda: "cancelled" if "decode" in phases else None)
    assert stopped.value.reason == "cancelled" and pool.worker.closed
    pool.shutdown()
