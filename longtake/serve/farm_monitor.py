"""The farm's web monitor (`longtake farm monitor`): a read-only view of a farm directory's jobs, their
priorities, states and steps, and from each job's log.txt its worker retries and the workers excluded.

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

from fastapi import Depends, FastAPI, Header, HTTPException
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
