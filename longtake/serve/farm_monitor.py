"""The farm's web monitor (`longtake farm monitor`): a read-only view of a farm directory's jobs, their
priorities, states and steps (each job's window x step grid), from each job's log.txt its worker retries and
the workers excluded, and the workers of every running job (node, what window and step each computes now,
utilisation, window-steps, bytes, failures, restarts: `/api/workers`, and as Prometheus series at `/metrics`).

Plain FastAPI on uvicorn, reading the job store (SQLite, shared with the runners) at every request: no Ray,
no torch. Bound to 127.0.0.1 by default; on any other address it needs a key ($LONGTAKE_MONITOR_KEY, else
one generated into FARM/monitor_key and printed), sent as 'Authorization: Bearer KEY' by the page's login.
It answers only to the Host names it serves (pages.py: loopback names, --host's, --allowed-host), so a web
page rebound to 127.0.0.1 cannot read it; the farm dir must be private (longtake/private.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import secrets
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Response
from fastapi import Path as PathParam

from longtake.cluster.jobs import JobStore
from longtake.private import private_dir
from longtake.serve.pages import install, known_query

RETRY = re.compile(r"retrying (.+?) \(attempt (\d+) of (\d+)\) after: (.*)")
EXCLUDED = re.compile(r"excluding worker (\d+)")
LOG_TAIL = 200_000  # characters of a job's log shown


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_log(farm_dir: Path, job_id: str) -> str:
    try:
        text = (farm_dir / "jobs" / job_id / "log.txt").read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-LOG_TAIL:]


def farm_job(record, log: str) -> dict:
    """A farm job as the monitor shows it: the job-status shape, its runner, and from its log the window
    retries and the workers excluded (blocklist)."""
    blocklist = sorted({f"worker {m.group(1)}" for m in EXCLUDED.finditer(log)}, key=lambda w: int(w.split()[1]))
    return {**record.to_dict(), "state": record.state, "runner": record.runner,
            "retries": len(RETRY.findall(log)), "blocklist": blocklist}


def running_workers(records) -> list[dict]:
    """Each running job's workers (its progress's `workers`: pool.WorkerBook), with the job and its runner."""
    rows = []
    for r in records:
        if r.state == "running":
            rows += [{**w, "job": r.id, "runner": r.runner} for w in (r.progress.get("workers") or [])]
    return rows


# the per-worker series, Prometheus names -> (the WorkerBook field, help); one source for the farm monitor and
# serve's /metrics
WORKER_SERIES = {
    "longtake_worker_busy_seconds": ("busy_s", "Seconds the worker computed tasks"),
    "longtake_worker_utilisation": ("utilisation", "The worker's busy share of the last 5 minutes"),
    "longtake_worker_window_steps": ("window_steps", "Window predictions the worker returned"),
    "longtake_worker_bytes": ("bytes", "Bytes to and from the worker"),
    "longtake_worker_failed_tasks": ("failures", "The worker's tasks that failed"),
    "longtake_worker_restarts": ("restarts", "Times the worker was replaced"),
}


def worker_metrics(rows: list[dict]) -> bytes:
    """The workers' series in Prometheus' text format, labelled by job, worker (a replica's id on serve) and
    node (and runner)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    labels = ("job", "worker", "node", "runner")
    gauges = {name: Gauge(name, text, labels, registry=registry) for name, (_, text) in WORKER_SERIES.items()}
    for w in rows:
        values = (w.get("job", ""), str(w.get("replica") or w.get("worker", "")), w.get("node") or "",
                  w.get("runner") or "")
        for name, (field, _) in WORKER_SERIES.items():
            gauges[name].labels(*values).set(float(w.get(field) or 0))
    return generate_latest(registry)


def build_monitor(farm_dir: str | Path, key: str | None = None, hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The monitor app of `farm_dir` (a RequestError if that directory is not private); `key`: needed as a
    bearer key when set; `hosts`: the Host names it answers to (pages.served_hosts; default loopback only)."""
    farm_dir = private_dir(farm_dir, "farm_dir", create=False)
    app = FastAPI(dependencies=[Depends(known_query)], title="longtake farm monitor",
                  description="Read-only: the jobs of one farm directory.")
    install(app, "farm.html", hosts)

    def store() -> JobStore:
        try:
            return JobStore(farm_dir / "farm.db", create=False)
        except FileNotFoundError:
            raise HTTPException(404, f"no farm at {farm_dir} (no farm.db: submit a job first)") from None

    def check(authorization: str | None) -> None:
        if key is None:
            return
        if not authorization or not authorization.startswith("Bearer ") or not secrets.compare_digest(
                authorization[7:].encode(), key.encode()):
            raise HTTPException(401, {"field": "Authorization", "error": "a monitor key is needed: send "
                                      "'Authorization: Bearer KEY'"}, headers={"WWW-Authenticate": "Bearer"})

    def jobs() -> dict:
        records = store().list(limit=500, hide=("deleted",))
        return {"jobs": [farm_job(r, read_log(farm_dir, r.id)) for r in records], "farm_dir": str(farm_dir)}

    def job(job_id: str) -> dict:
        record = store().get(job_id)
        if record is None or record.state == "deleted":
            raise HTTPException(404, f"no job {job_id}")
        log = read_log(farm_dir, job_id)
        return {**farm_job(record, log), "log": log}

    def workers() -> dict:
        return {"workers": running_workers(store().list(limit=500, state="running"))}

    @app.get("/api/workers")
    async def list_workers(authorization: str | None = Header(None)):
        """The workers of every running job (each runner's pool, as its job's progress last said)."""
        check(authorization)
        return await asyncio.to_thread(workers)

    @app.get("/metrics")
    async def metrics(authorization: str | None = Header(None)):
        """Prometheus: the per-worker series (worker_metrics) of the running jobs."""
        check(authorization)
        rows = (await asyncio.to_thread(workers))["workers"]
        return Response(worker_metrics(rows), media_type="text/plain; version=0.0.4")

    @app.get("/api/jobs")
    async def list_jobs(authorization: str | None = Header(None)):
        check(authorization)
        return await asyncio.to_thread(jobs)

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: str = PathParam(pattern=r"^[0-9a-f]{16}$"), authorization: str | None = Header(None)):
        check(authorization)
        return await asyncio.to_thread(job, job_id)

    return app


def monitor_key(farm_dir: str | Path, host: str) -> tuple[str | None, bool]:
    """(key, created now): $LONGTAKE_MONITOR_KEY, else none on a loopback address, else FARM/monitor_key."""
    from longtake.serve import load_or_create_secret

    if os.environ.get("LONGTAKE_MONITOR_KEY"):
        return os.environ["LONGTAKE_MONITOR_KEY"], False
    if is_loopback(host):
        return None, False
    return load_or_create_secret(Path(farm_dir) / "monitor_key", "farm_dir")
