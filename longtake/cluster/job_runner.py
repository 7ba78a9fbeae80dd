"""One claimed job's execution, the same for the farm and serve: `run_leased`.

The farm's `Runner` (farm.py) and serve's `JobManager` (serve/manager.py) only pick jobs (claim_next in
the job store) and hold pools; what running a claimed job needs is here, once:

    1. its lease, renewed from a thread for as long as it runs (jobs.Lease: a runner that lost it stops)
    2. the request the caller prepared (outputs in the job's directory; an upload's id as its path)
    3. a pool for it (the caller's), the job's fingerprint and a Checkpointer (every k steps; the newest
       valid checkpoint is resumed from)
    4. engine.run, stopping when (`Stops`): the lease is lost ("lost"; or "cancelled" / "paused" when that is
       the job's state now), the runner stops ("shutdown"), the caller cancels ("cancelled"), the job's row
       says cancelled, deleted or paused (polled), or its disks are nearly full (a write error)
    5. one policy for every outcome:
         done       the result stored, the checkpoints removed (a job deleted at the last moment: its
                    directory removed)
         cancelled  the checkpoints removed, the workers freed (`on_trouble`), the log kept
         paused     a checkpoint of the step it stopped at kept (the engine saves it)
         lost       nothing touched (another runner has the job), the workers freed
         shutdown   back in the queue, its checkpoint kept: it resumes there
         failed     the error stored: a window that failed its retries ("render failed"), a bad request
                    ("request"), a write error (a full disk, an unwritable output: "cannot write", the
                    checkpoints kept for a retry), or anything else (logged with its traceback); the workers
                    freed but after a bad request

No Ray here: the pool is the caller's.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from longtake.actors.pool import WindowFailed
from longtake.cluster.checkpoint import Checkpointer, fingerprint
from longtake.cluster.engine import Cancelled, prepare, run
from longtake.cluster.jobs import JobRecord, JobStore, Lease, ProgressWriter, append_log
from longtake.request import RequestError

logger = logging.getLogger(__name__)


class DiskFull(OSError):
    """Less free space than the runner keeps (`Stops.min_free_mb`)."""


class JobLog:
    """A job's log.txt (jobs.append_log), `public` applied to every line (serve cuts server paths out of
    what its clients read); with `logger`, the lines go to that logger instead (the farm's, whose records a
    handler writes to the job's log.txt with those of the pool: retries, exclusions)."""

    def __init__(self, directory: Path, public=None, to_logger: logging.Logger | None = None):
        self.directory, self.public, self.to_logger = Path(directory), public or (lambda text: text), to_logger

    def __call__(self, message: str, level: int = logging.INFO) -> None:
        if self.to_logger is not None:
            self.to_logger.log(level, "%s", message)
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            append_log(self.directory, self.public(message))
        except OSError as e:  # a log line is never worth failing a job for
            logger.warning("job %s: cannot write its log: %s", self.directory.name, e)


@dataclass
class Stops:
    """When a running job stops (module docstring, 4). `stop`: the runner is stopping; `cancel()`: the
    caller's own cancel (serve's, at once); `space()`: raises DiskFull when a disk the job writes to is
    nearly full (`check_free`); `poll_s`: how often the job's row (and the space) is read."""

    stop: object  # threading.Event
    cancel: object = None  # () -> bool
    space: object = None  # () -> None, or raises DiskFull
    poll_s: float = 0.5


def check_free(directories, min_free_mb: float) -> None:
    """DiskFull when one of `directories` (those that exist) has less than `min_free_mb` MB free."""
    for directory in directories:
        if not Path(directory).is_dir():
            continue
        free_mb = shutil.disk_usage(directory).free / 2**20
        if free_mb < min_free_mb:
            raise DiskFull(errno.ENOSPC, f"disk full: {free_mb:.0f} MB free in {directory}, the runner keeps "
                                         f"{min_free_mb:g} MB free (--min-free-mb)")


def run_leased(store: JobStore, record: JobRecord, runner_id: str, directory: Path, request, pool_for,
               checkpoint_every: int, lease_s: float, provenance, stops: Stops, log: JobLog,
               on_progress=None, summarize=None, on_trouble=None, retry_hint: str = "",
               progress: bool = False) -> tuple[str, object]:
    """Run a claimed job (module docstring): (its state after this run, the RenderResult when done).
    `request()`: the render request (a dict: may raise RequestError); `pool_for(job)`: the pool to render it on; `on_progress(dict)`: the engine's progress (the store's is
    written here); `summarize(result)`: the result stored (default: result.to_dict()); `on_trouble()`: free
    the workers after a cancel, a lost lease or a failed render; `retry_hint`: what a write error's message
    tells the operator to do."""
    owner = (runner_id, record.lease)
    fail = _Fail(store, record.id, owner, log, public=log.public)
    on_trouble = on_trouble or (lambda: None)
    with Lease(store, record.id, owner, lease_s, logging.getLogger("longtake.job")) as lease:
        try:
            job = prepare(request())
        except RequestError as e:
            return fail(f"request: {e}"), None
        ckpt = None
        try:
            pool = pool_for(job)
            ckpt = Checkpointer(directory / "checkpoints", checkpoint_every,
                                fingerprint(job, pool.spec.dtype, pool.spec.device),
                                log=log.to_logger or logger)
            write = ProgressWriter(store, record.id, owner)  # the job's row: at most twice a second
            writer = write if on_progress is None else (lambda p: (on_progress(p), write(p)))
            result = run(job, pool, progress=progress, on_progress=writer, checkpoint=ckpt, provenance=provenance,
                         cancelled=_StopReason(store, record.id, lease, stops))
        except Cancelled as e:
            return _stopped(store, record.id, owner, e, ckpt, lease, log, on_trouble), None
        except WindowFailed as e:
            on_trouble()  # workers may be excluded or dead: the next job starts fresh
            return fail(f"render failed: {e}"), None
        except OSError as e:
            if e.errno is None:  # not a write error (an error a library raised as OSError)
                logger.exception("job %s failed", record.id)
                return fail(f"{type(e).__name__}: {e}"), None
            kept = len(ckpt.paths()) if ckpt is not None else 0
            return fail(f"cannot write ({e}); {kept} checkpoint{'s' * (kept != 1)} kept"
                        + (f": {retry_hint}" if retry_hint else "")), None
        except RequestError as e:
            return fail(f"request: {e}"), None
        except Exception as e:  # a bug or a model error: fail this job, keep the runner going
            logger.exception("job %s failed", record.id)
            on_trouble()
            return fail(f"{type(e).__name__}: {e}"), None
    summary = summarize(result) if summarize is not None else result.to_dict()
    if store.update(record.id, state="done", result=summary, only_from=("running",), owner=owner):
        ckpt.clear()
        log(f"done: {result.frames} frames in {result.wall_s:.1f} s (resumed from step {result.resumed_from_step}, "
            f"{result.checkpoints_saved} checkpoints in {result.checkpoint_s:.2f} s), sha256 {result.frames_sha256}")
        return "done", result
    now = store.get(record.id)
    if now is None or now.state == "deleted":  # deleted at the last moment: nothing of it stays
        shutil.rmtree(directory, ignore_errors=True)
    return (now.state if now is not None else "deleted"), None


class _Fail:
    """A failed run: the error in the job's row (fenced by the lease), then in its log."""

    def __init__(self, store: JobStore, job_id: str, owner, log: JobLog, public):
        self.store, self.job_id, self.owner, self.log, self.public = store, job_id, owner, log, public

    def __call__(self, message: str) -> str:
        message = self.public(message)
        # the row first: whoever reads "failed: " in the log then finds the job failed in the store
        self.store.update(self.job_id, state="failed", error=message, only_from=("running",), owner=self.owner)
        self.log(f"failed: {message}", logging.ERROR)
        return "failed"


def _stopped(store: JobStore, job_id: str, owner, e: Cancelled, ckpt: Checkpointer, lease: Lease, log: JobLog,
             on_trouble) -> str:
    """The policy for a job the engine stopped (module docstring, 5)."""
    if e.reason == "cancelled":
        on_trouble()  # frees the workers now, whatever they were doing
        ckpt.clear()  # its latents are no use now: only the log stays, until retention
        log(f"cancelled at step {e.step}; workers freed, checkpoints removed")
    elif e.reason == "paused":
        log(f"paused at step {e.step}; checkpoint saved")
    elif e.reason == "lost":  # another runner has the job now: touch nothing of it
        on_trouble()
        log(f"stopped at step {e.step}: {lease.reason}", logging.ERROR)
    else:  # the runner is stopping: the job goes back to the queue and resumes from its checkpoint
        store.update(job_id, state="queued", progress={}, only_from=("running",), owner=owner)
        log(f"runner stopping; requeued at step {e.step}")
    return e.reason


class _StopReason:
    """engine.run's `cancelled()` for a leased job: why it is to stop now, or None (module docstring, 4)."""

    def __init__(self, store: JobStore, job_id: str, lease: Lease, stops: Stops):
        self.store, self.job_id, self.lease, self.stops = store, job_id, lease, stops
        self.polled_at, self.state = 0.0, "running"

    def __call__(self) -> str | None:
        if self.lease.lost.is_set():  # a cancel or a pause also ends the lease, and may reach it before a poll
            return lost_reason(self.store, self.job_id)
        if self.stops.cancel is not None and self.stops.cancel():
            return "cancelled"
        if self.stops.stop.is_set():
            return "shutdown"
        if time.monotonic() - self.polled_at >= self.stops.poll_s:
            self.polled_at = time.monotonic()
            current = self.store.get(self.job_id)
            self.state = current.state if current is not None else "deleted"
            if self.stops.space is not None:
                self.stops.space()
        return _reason(self.state)


def lost_reason(store: JobStore, job_id: str) -> str:
    """Why a job's lease ended: "cancelled" or "paused" when that is its state now (the job is then handled
    as such: checkpoints removed, or saved), else "lost" (another runner has it, or the store cannot be
    reached: touch nothing)."""
    try:
        current = store.get(job_id)
    except Exception:  # the store is unreachable: the job is lost to this runner
        return "lost"
    return _reason(current.state if current is not None else "deleted") or "lost"


def _reason(state: str) -> str | None:
    """The stop reason a job's state asks for: its row says cancelled (or deleted), or paused."""
    return {"cancelled": "cancelled", "deleted": "cancelled", "paused": "paused"}.get(state)

