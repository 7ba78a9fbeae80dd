"""The job manager behind the HTTP API: a queue in the job store, a few jobs running at once in
threads, each rendered by the engine on a shared pool (the autoscaled denoiser deployment).

Plain Python (no Ray Serve imports), so it is testable with any pool.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from longtake.cluster.engine import Cancelled, prepare, run
from longtake.cluster.jobs import FINAL, STATES, JobStore
from longtake.request import RequestError, parse_request

logger = logging.getLogger(__name__)


def _same_model(asked, served: str) -> bool:
    from longtake.pipelines import resolve_model_path

    try:
        return isinstance(asked, str) and Path(resolve_model_path(asked)).resolve() == Path(served).resolve()
    except RequestError:
        return False


class QueueFull(Exception):
    """Too many jobs waiting; retry later."""


@dataclass(frozen=True)
class Limits:
    max_seconds: float = 120.0
    max_steps: int = 50
    max_side: int = 512  # pixels, height and width
    max_queued: int = 16  # queued + running jobs
    max_running: int = 2
    max_body_bytes: int = 64 * 1024


class JobManager:
    def __init__(self, data_dir: str | Path, pool, model: str, limits: Limits = Limits()):
        self.data_dir = Path(data_dir)
        self.store = JobStore(self.data_dir / "jobs.db")
        self.pool, self.model, self.limits = pool, model, limits
        self._cancel: set[str] = set()
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.registry = CollectorRegistry()
        self.m_jobs = Gauge("longtake_jobs", "Jobs by state", ["state"], registry=self.registry)
        self.m_duration = Histogram("longtake_job_duration_seconds", "Wall time of finished jobs",
                                    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800), registry=self.registry)
        self.m_window = Histogram("longtake_window_step_seconds", "Time between window results in a step",
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=self.registry)
        self.m_queue_jobs = Gauge("longtake_queue_jobs", "Queued jobs", registry=self.registry)
        self.m_queue_windows = Gauge("longtake_queue_windows", "Window predictions left in running jobs",
                                     registry=self.registry)
        self.m_busy = Gauge("longtake_workers_busy", "Workers busy (estimate: running jobs' in-flight windows)",
                            registry=self.registry)
        self.m_idle = Gauge("longtake_workers_idle", "Workers idle (estimate)", registry=self.registry)
        self.m_frames = Counter("longtake_frames_rendered_total", "Frames written to finished videos",
                                registry=self.registry)
        for job in self.store.list(limit=10**6, state="running"):  # a restart: running jobs start again
            self.store.update(job.id, state="queued")
        self._left: dict[str, int] = {}
        self._scheduler = threading.Thread(target=self._schedule, daemon=True, name="longtake-scheduler")
        self._scheduler.start()

    # -- API --------------------------------------------------------------------------------------
    def submit(self, body: dict, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Validate and queue a render request. Raises RequestError (bad input) or QueueFull."""
        for field in ("out", "preview"):
            if field in body:
                raise RequestError(field, body[field], "no value: the server chooses output paths")
        if "model" in body and not _same_model(body["model"], self.model):
            raise RequestError("model", body["model"], f"{self.model!r}, the model this server runs")
        body = {**body, "model": self.model}
        req = parse_request({**body, "out": str(self.data_dir / "check.mp4")})
        lim = self.limits
        for field, value, top in (("seconds", req.seconds, lim.max_seconds), ("steps", req.steps, lim.max_steps),
                                  ("height", req.height, lim.max_side), ("width", req.width, lim.max_side)):
            if value is not None and value > top:
                raise RequestError(field, value, f"at most {top:g} on this server")
        prepare(req)  # model-dependent checks (size factor, window), before anything is queued
        existing = self.store.get_by_key(idempotency_key) if idempotency_key is not None else None
        if existing is not None:
            return existing.to_dict(), False
        if self.store.count(("queued", "running")) >= lim.max_queued:
            raise QueueFull(f"{lim.max_queued} jobs queued or running")
        record, created = self.store.create(body, idempotency_key=idempotency_key)
        self._wake.set()
        return record.to_dict(), created

    def get(self, job_id: str) -> dict | None:
        job = self.store.get(job_id)
        return job.to_dict() if job else None

    def list(self, limit: int = 20, offset: int = 0) -> dict:
        jobs = self.store.list(limit=limit, offset=offset)
        return {"data": [j.to_dict() for j in jobs], "limit": limit, "offset": offset, "total": self.store.count()}

    def cancel(self, job_id: str) -> bool:
        """Cancel (if not finished) and delete the job's files. False if there is no such job."""
        job = self.store.get(job_id)
        if job is None:
            return False
        self._cancel.add(job_id)
        self.store.update(job_id, state="cancelled", only_from=("queued", "running", "paused"))
        thread = self._running.get(job_id)
        if thread is not None:
            thread.join(timeout=10)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return True

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def file(self, job_id: str, name: str) -> str | None:
        job = self.store.get(job_id)
        path = self.job_dir(job_id) / name
        return str(path) if job is not None and job.state == "done" and path.is_file() else None

    def metrics(self) -> bytes:
        for state in STATES:
            self.m_jobs.labels(state).set(self.store.count((state,)))
        self.m_queue_jobs.set(self.store.count(("queued",)))
        left = sum(self._left.values())
        workers = getattr(self.pool, "num_workers", 1)
        self.m_queue_windows.set(left)
        self.m_busy.set(min(left, workers))
        self.m_idle.set(max(0, workers - min(left, workers)))
        return generate_latest(self.registry)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        for job_id in list(self._running):
            self._cancel.add(job_id)
        for thread in list(self._running.values()):
            thread.join(timeout=10)

    # -- running jobs -----------------------------------------------------------------------------
    def _schedule(self) -> None:
        while not self._stop:
            with self._lock:
                self._running = {k: t for k, t in self._running.items() if t.is_alive()}
                while len(self._running) < self.limits.max_running:
                    job = self.store.claim_next()
                    if job is None:
                        break
                    thread = threading.Thread(target=self._run_job, args=(job.id, job.request), daemon=True)
                    self._running[job.id] = thread
                    thread.start()
            self._wake.wait(timeout=1.0)
            self._wake.clear()

    def _run_job(self, job_id: str, body: dict) -> None:
        out_dir = self.job_dir(job_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = last = time.perf_counter()

        def on_progress(p: dict) -> None:
            nonlocal last
            now = time.perf_counter()
            if p["phase"] == "denoise":
                self.m_window.observe(now - last)
            last = now
            self._left[job_id] = p["windows_total"] - p["windows_done"]
            self.store.update(job_id, progress=p, only_from=("running",))

        try:
            job = prepare({**body, "out": str(out_dir / "video.mp4"), "preview": str(out_dir / "preview.png")})
            result = run(job, self.pool, progress=False, on_progress=on_progress,
                         cancelled=lambda: job_id in self._cancel or self._stop)
            self.m_duration.observe(time.perf_counter() - t0)
            self.m_frames.inc(result.frames)
            summary = {k: v for k, v in result.to_dict().items() if k not in ("out", "preview")}
            if not self.store.update(job_id, state="done", result=summary, only_from=("running",)):
                shutil.rmtree(out_dir, ignore_errors=True)  # cancelled at the last moment
        except Cancelled:
            logger.info("job %s cancelled", job_id)
        except Exception as e:  # the job fails; the server goes on
            logger.exception("job %s failed", job_id)
            self.store.update(job_id, state="failed", error=f"{type(e).__name__}: {e}", only_from=("running",))
        finally:
            self._left.pop(job_id, None)
            self._cancel.discard(job_id)
            self._wake.set()

    @staticmethod
    def is_final(state: str) -> bool:
        return state in FINAL
