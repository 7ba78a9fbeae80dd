"""job_runner.run_leased, the one leased-job runner under the farm's Runner and serve's JobManager: its
policy for every outcome (done, cancelled, paused, shutdown, a lost lease, a full disk, a bad request, a
failed render), on the in-process pool with the tiny model. Each stop is asked for from the job's own
progress report of step 2 (of 4), so it lands mid-job whatever this machine's speed."""

from __future__ import annotations

import errno
import re
import threading

import pytest

from longtake.actors.pool import InProcessPool, WindowFailed
from longtake.actors.worker import WorkerSpec
from longtake.cluster.checkpoint import Checkpointer
from longtake.cluster.job_runner import DiskFull, JobLog, Stops, run_leased
from longtake.cluster.jobs import JobStore

STEPS = 4


@pytest.fixture(scope="module")
def pool(tiny_model):
    pool = InProcessPool(WorkerSpec(tiny_model))
    yield pool
    pool.shutdown()


class Harness:
    """One claimed job in a fresh store, run by run_leased; `at_step(n, action)` acts once the job has
    finished step n (from its progress)."""

    def __init__(self, tmp_path, tiny_model, pool, **request):
        self.store = JobStore(tmp_path / "jobs.db")
        self.dir = tmp_path / "job"
        self.dir.mkdir(parents=True)  # the caller's (the farm's job directory, serve's output directory)
        self.request = dict(prompt="a red ball moving right", seconds=1, fps=8, steps=STEPS, window=8, overlap=2,
                            model=tiny_model, out=str(self.dir / "out.mp4"), **request)
        record, _ = self.store.create(self.request)
        self.record = self.store.claim_next("runner-a")
        assert self.record.id == record.id
        self.pool, self.stop, self.troubles, self.actions = pool, threading.Event(), [], {}
        self.actions_done: list[int] = []

    def at_step(self, step: int, action) -> "Harness":
        self.actions[step] = action
        return self

    def _progress(self, p: dict) -> None:
        action = self.actions.pop(p.get("step", 0), None) if p.get("phase") == "denoise" else None
        if action is not None:
            self.actions_done.append(p["step"])
            action()

    def run(self, request=None, space=None, lease_s: float = 30.0, pool_for=None, log=None):
        return run_leased(self.store, self.record, "runner-a", self.dir, request or (lambda: self.request),
                          pool_for or (lambda job: self.pool), 1, lease_s, None,
                          Stops(self.stop, space=space, poll_s=0.0), log or JobLog(self.dir),
                          on_progress=self._progress,
                          on_trouble=lambda: self.troubles.append(True), retry_hint="retry it")

    @property
    def checkpoints(self) -> list[str]:
        return [p.name for p in Checkpointer(self.dir / "checkpoints", 1, "").paths()]

    @property
    def row(self):
        return self.store.get(self.record.id)

    @property
    def log(self) -> str:
        return (self.dir / "log.txt").read_text()

    def stopped_at(self, said: str) -> int:
        """The step the log says the job stopped at: mid-job, after the step the test acted at."""
        step = int(re.search(said + r" at step (\d+)", self.log)[1])
        assert min(self.actions_done) <= step < STEPS, (step, self.log)
        return step


def test_done_stores_the_result_and_removes_the_checkpoints(tmp_path, tiny_model, pool):
    h = Harness(tmp_path, tiny_model, pool)
    state, result = h.run()
    assert state == "done" and h.row.state == "done", h.row.error
    assert h.row.result["frames_sha256"] == result.frames_sha256
    assert h.checkpoints == [] and not h.troubles and "done: 8 frames" in h.log


def test_cancel_frees_the_workers_and_removes_the_checkpoints(tmp_path, tiny_model, pool):
    h = Harness(tmp_path, tiny_model, pool)
    h.at_step(2, lambda: h.store.update(h.record.id, state="cancelled"))
    state, result = h.run()
    assert state == "cancelled" and result is None and h.row.state == "cancelled"
    assert h.checkpoints == [] and h.troubles == [True] and h.stopped_at("cancelled")
    assert "workers freed, checkpoints removed" in h.log


def test_pause_keeps_a_checkpoint_of_the_step_it_stopped_at_and_a_resume_starts_there(tmp_path, tiny_model, pool):
    h = Harness(tmp_path, tiny_model, pool)
    h.at_step(2, lambda: h.store.update(h.record.id, state="paused"))
    assert h.run() == ("paused", None)
    paused_at = h.stopped_at("paused")
    assert h.row.state == "paused" and h.checkpoints[0] == f"step-{paused_at:06d}.safetensors" and not h.troubles
    assert f"paused at step {paused_at}; checkpoint saved" in h.log
    h.store.update(h.record.id, state="queued")
    h.record = h.store.claim_next("runner-a")
    state, result = h.run()
    assert state == "done" and result.resumed_from_step == paused_at
    assert result.frames_sha256 == Harness(tmp_path / "ref", tiny_model, pool).run()[1].frames_sha256


def test_shutdown_requeues_the_job_with_its_checkpoint(tmp_path, tiny_model, pool):
    h = Harness(tmp_path, tiny_model, pool)
    h.at_step(2, h.stop.set)
    assert h.run() == ("shutdown", None)
    assert h.row.state == "queued" and h.row.runner is None and h.checkpoints and not h.troubles
    assert h.stopped_at("runner stopping; requeued") and "requeued" in h.log


def test_a_lost_lease_touches_nothing_of_the_job_and_frees_the_workers(tmp_path, tiny_model, pool):
    h = Harness(tmp_path, tiny_model, pool)

    def taken_over():  # another runner recovered the job and claimed it: this lease is over
        h.store.update(h.record.id, state="queued")
        assert h.store.claim_next("runner-b").runner == "runner-b"
        assert not h.store.heartbeat(h.record.id, ("runner-a", h.record.lease))
        threading.Event().wait(0.3)  # the job waits here; its lease thread beats every lease_s / 4 and sees it

    h.at_step(2, taken_over)
    assert h.run(lease_s=0.2) == ("lost", None)
    assert h.row.state == "running" and h.row.runner == "runner-b"  # runner-b's job now, untouched
    assert h.checkpoints and h.troubles == [True] and "taken over by another runner" in h.log


def test_a_full_disk_fails_the_job_and_keeps_its_checkpoints_for_a_retry(tmp_path, tiny_model, pool):
    h = Harness(tmp_path, tiny_model, pool)
    full = threading.Event()
    h.at_step(2, full.set)

    def space():
        if full.is_set():
            raise DiskFull(errno.ENOSPC, "disk full: 0 MB free in /farm")

    assert h.run(space=space) == ("failed", None)
    assert h.row.state == "failed" and h.row.error.startswith("cannot write (")
    assert "2 checkpoints kept: retry it" in h.row.error and len(h.checkpoints) == 2 and not h.troubles


def test_a_bad_request_fails_the_job_naming_the_field_and_keeps_the_workers(tmp_path, tiny_model, pool):
    h = Harness(tmp_path, tiny_model, pool)
    assert h.run(request=lambda: {**h.request, "fps": -8}) == ("failed", None)
    assert h.row.error.startswith("request: fps: got -8") and not h.troubles and "failed: request: fps" in h.log


def test_the_failed_state_is_stored_before_the_log_says_failed(tmp_path, tiny_model, pool):
    """Whoever reads "failed: " in a job's log (an operator, a test) finds the job failed in the store."""
    h = Harness(tmp_path, tiny_model, pool)
    states = []

    class Watching(JobLog):
        def __call__(self, message, level=20):
            states.append((message.split(":")[0], h.row.state))
            super().__call__(message, level)

    assert h.run(request=lambda: {**h.request, "fps": -8}, log=Watching(h.dir)) == ("failed", None)
    assert states == [("failed", "failed")]


def test_a_failed_render_fails_the_job_and_frees_the_workers(tmp_path, tiny_model, pool):
    class Failing(InProcessPool):
        def poll(self, timeout=None):
            raise WindowFailed("window at 0 failed 3 times: injected")

    failing = Failing(WorkerSpec(tiny_model))
    h = Harness(tmp_path, tiny_model, pool)
    try:
        assert h.run(pool_for=lambda job: failing) == ("failed", None)
    finally:
        failing.shutdown()
    assert h.row.error == "render failed: window at 0 failed 3 times: injected" and h.troubles == [True]
