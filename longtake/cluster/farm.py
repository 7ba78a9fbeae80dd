"""The studio farm: a durable queue of render jobs in a farm directory, and the runner that renders them.

    FARM/farm.db                     the job store (SQLite; WAL, or a rollback journal on a network filesystem)
    FARM/jobs/ID/request.json        the request as submitted
    FARM/jobs/ID/checkpoints/        step-NNNNNN.safetensors (latents + scheduler state + checksum)
    FARM/jobs/ID/log.txt             what happened to the job: runs, retries, checkpoints, errors
    FARM/jobs/ID/out.mp4, preview.png, result.json   (unless the request names its own `out`)

`submit` validates every request of every spec before queueing any, and refuses an `out` or `preview`
path that another job (not deleted) writes. A finished job's result records the size and mtime of the
video and preview it wrote (`written`): retention deletes one outside the job's directory only while it is
still that file. `longtake delete` scrubs a job's row: `status` no longer lists it, and `status ID`
says it was deleted and why.

`Runner` claims the best queued job (priority, then submit time), renders it on a Ray actor pool with
checkpoints every k steps, and keeps going. cancel / pause / resume / retry are store updates that a busy
runner notices within a window: a paused job is checkpointed at its current step; a cancelled one frees its
workers. A runner that dies (SIGKILL, lost machine) leaves its job "running"; the next runner to start sees
that the owner is gone (its process gone from this host, boot and process namespace, or no heartbeat for
the lease time: jobs.py) and requeues it, and it resumes from its newest valid checkpoint; the local Ray it
started dies with it (actors/ray_boot.py). Every state change a runner makes is fenced by its
lease (jobs.py): a runner whose lease was taken over or could not be renewed stops rendering and changes
nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import yaml

from longtake.actors import ray_boot
from longtake.actors.worker import Worker
from longtake.cluster.engine import prepare
from longtake.cluster.job_runner import JobLog, Stops, check_free, run_leased
from longtake.cluster import retention
from longtake.cluster.jobs import SQLITE_INT_MAX, JobRecord, JobStore, append_log, new_runner_id
from longtake.private import private_dir
from longtake.provenance import Provenance
from longtake.request import MEDIA_FIELDS, RequestError, load_timeline

logger = logging.getLogger(__name__)
# one logger for every job: a running job's messages reach its log.txt through a handler on "longtake"
JOB_LOGGER = logging.getLogger("longtake.job")

SPEC_KEYS = ("priority", "token")  # per-job keys of a spec that are not request fields
OUTPUT_FIELDS = ("out", "preview")  # request fields naming a file the job writes (default: in its directory)


def open_store(farm_dir: str | Path, create: bool = True) -> JobStore:
    """The farm's job store; with create=False, a RequestError when there is no farm at farm_dir."""
    private_dir(farm_dir, "farm_dir", create=create)  # created 0700; another user's or a shared one is refused
    try:
        return JobStore(Path(farm_dir) / "farm.db", create=create)
    except FileNotFoundError:
        raise RequestError("farm_dir", str(farm_dir), "a farm directory (no farm.db there: submit a job first, "
                                                       "or give --farm-dir / $LONGTAKE_FARM_DIR)") from None


def job_dir(farm_dir: str | Path, job_id: str) -> Path:
    return Path(farm_dir) / "jobs" / job_id


# ---------------------------------------------------------------- submit

def read_specs(path: str) -> list[dict]:
    """A spec (YAML or JSON): one job mapping, a list of them, or {jobs: [...]}. Each job is a
    render request plus optional `priority` (higher first) and `token` (makes the submit idempotent).
    A `timeline` may be a list of keys or the path of a timeline file (relative to the spec), and media
    paths (`image`, `keyframes[].image`, `extend`, `lead_into`, `video`, `pose`, `reference`, `reference_pose`,
    `face`, `background`, `mask`) are relative to the spec too. `out` and `preview` are relative to the
    current directory. `path` may be a file (JSON if it ends in .json, else YAML), `-` (standard input) or
    a pipe such as bash's `<(...)`: those are read once, YAML unless they parse as JSON, and their relative
    paths are relative to the current directory."""
    p = Path(path)
    try:
        if path == "-":
            text = sys.stdin.read()
        elif p.is_dir() or not p.exists():
            raise RequestError("spec", path, "an existing YAML or JSON file, `-` (standard input) or a pipe")
        else:
            text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError("spec", path, f"a readable YAML or JSON file ({e})") from None
    regular = path != "-" and p.is_file()
    base = p.parent if regular else Path.cwd()  # a pipe's directory (/dev/fd) says nothing of its paths
    try:
        if regular:
            data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        else:
            data = _json_or_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RequestError("spec", path, f"valid YAML or JSON ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and set(data) == {"jobs"}:
        data = data["jobs"]
    jobs = [data] if isinstance(data, dict) else data
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise RequestError("spec", path, "a job mapping, a non-empty list of them, or {jobs: [...]}")
    out = []
    for job in jobs:
        job = dict(job)
        if isinstance(job.get("timeline"), str):
            keys, negative = load_timeline(str(base / job["timeline"]))
            job["timeline"] = keys
            if negative is not None:
                job.setdefault("negative_prompt", negative)
        for field in OUTPUT_FIELDS:
            if isinstance(job.get(field), str):
                job[field] = str((Path.cwd() / job[field]).resolve())
        for field in (*MEDIA_FIELDS, "reference_pose"):  # every media path (keyframes: below)
            if field != "keyframes" and isinstance(job.get(field), str):
                job[field] = str((base / job[field]).resolve())
        if isinstance(job.get("keyframes"), list):
            job["keyframes"] = [{**k, "image": str((base / k["image"]).resolve())}
                                if isinstance(k, dict) and isinstance(k.get("image"), str) else k
                                for k in job["keyframes"]]
        out.append(job)
    return out


def _json_or_yaml(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def split_spec(job: dict, default_priority: int = 0) -> tuple[dict, int, str | None]:
    """A spec job -> (request dict, priority, client token). Raises RequestError."""
    request = {k: v for k, v in job.items() if k not in SPEC_KEYS}
    priority = job.get("priority", default_priority)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
        raise RequestError("priority", priority, "an integer from -1000 to 1000 (higher runs first)")
    token = job.get("token")
    if token is not None and (not isinstance(token, str) or not 1 <= len(token) <= 200):
        raise RequestError("token", token, "a string of 1 to 200 characters (the same token submits once)")
    return request, priority, token


def validate(farm_dir: str | Path, request: dict) -> None:
    """Every check `longtake render` makes, before anything is queued (outputs default to the job dir)."""
    check = dict(request)
    private_dir(farm_dir, "farm_dir")  # created 0700; another user's or a shared one is refused
    check.setdefault("out", str(Path(farm_dir) / "validate.mp4"))
    prepare(check)


def _outputs(request: dict) -> dict[str, str]:
    """{field: real path} of the files a request names for its outputs (the default ones are its own)."""
    return {f: os.path.realpath(request[f]) for f in OUTPUT_FIELDS if isinstance(request.get(f), str)}


def check_outputs(store: JobStore, jobs: list[tuple[dict, int, str | None]]) -> None:
    """Refuse (RequestError naming the field and the other job) a job whose `out` or `preview` another job
    that is not deleted writes, or another job of the same submit: retention would delete one job's video
    with the other's. A token already used for the same request is that job again, not a new owner; one used
    for another request is refused here too, before anything is queued."""
    owners: dict[str, str] = {}
    for record in store.list(limit=SQLITE_INT_MAX, hide=("deleted",)):
        for path in _outputs(record.request).values():
            owners.setdefault(path, f"job {record.id} does (`longtake delete {record.id}` frees it)")
    for n, (request, _, token) in enumerate(jobs):
        same = store.get_by_key(f"submit:{token}") if token else None
        if same is not None:
            if same.request != json.loads(json.dumps(request, sort_keys=True)):
                raise RequestError("token", token, f"a token not used before (job {same.id} was submitted with it "
                                                   "and another request)")
            continue
        claims = _outputs(request)
        for field, path in claims.items():
            if path in owners:
                raise RequestError(field, request[field], f"a path no other job writes ({owners[path]})")
        for path in claims.values():
            owners[path] = f"job {n + 1} of this submit does"


def submit(farm_dir: str | Path, jobs: list[tuple[dict, int, str | None]]) -> list[tuple[JobRecord, bool]]:
    """Queue validated jobs. Returns [(job, created)]; created is False for a token already used. Raises
    RequestError, queueing nothing, when a job's output path is another's (`check_outputs`)."""
    store = open_store(farm_dir)
    check_outputs(store, jobs)
    results = []
    for request, priority, token in jobs:
        record, created = store.create(request, priority=priority, idempotency_key=token and f"submit:{token}")
        if created:
            d = job_dir(farm_dir, record.id)
            d.mkdir(parents=True, exist_ok=True)
            (d / "request.json").write_text(json.dumps(request, indent=2))
            append_log(d, f"submitted (priority {priority})")
        results.append((record, created))
    return results


# ---------------------------------------------------------------- control

TRANSITIONS = {  # command -> (states it applies to, new state)
    "cancel": (("queued", "running", "paused"), "cancelled"),
    "pause": (("queued", "running"), "paused"),
    "resume": (("paused",), "queued"),
    "retry": (("failed", "cancelled"), "queued"),
}


def control(farm_dir: str | Path, command: str, job_id: str) -> JobRecord:
    """Apply cancel / pause / resume / retry. Raises RequestError naming the job and its state."""
    store = open_store(farm_dir, create=False)
    record = store.get(job_id)
    if record is None:
        raise RequestError("id", job_id, "the id of a job in this farm (see `longtake status`)")
    sources, target = TRANSITIONS[command]
    changed = store.update(job_id, state=target, only_from=sources, **({"error": ""} if command == "retry" else {}))
    if not changed:
        now = store.get(job_id).state
        raise RequestError("id", job_id, f"a job that is {' or '.join(sources)} to {command} it (it is {now})")
    d = job_dir(farm_dir, job_id)
    if d.is_dir():
        append_log(d, f"{command}: {record.state} -> {target}")
        if command == "cancel" and record.state != "running":  # a running job's runner cleans up itself
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
    return store.get(job_id)


# ---------------------------------------------------------------- retention (cluster/retention.py)

def job_paths(farm_dir: str | Path, record: JobRecord) -> list:
    """What a farm job wrote: its directory (log, checkpoints, and its video and preview by default) and,
    once done, a video or preview it wrote elsewhere (`out:` / `preview:` of its spec) as retention.Written:
    deleted only while it is still the file the job recorded in its result (`written`)."""
    d = job_dir(farm_dir, record.id)
    paths: list = [d]
    result = record.result or {}
    for key in OUTPUT_FIELDS:
        if result.get(key) and not _inside(Path(result[key]), d):
            seen = (result.get("written") or {}).get(key) or {}
            paths.append(retention.Written(Path(result[key]), seen.get("size"), seen.get("mtime_ns")))
    return paths


def _inside(path: Path, directory: Path) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def written(result: dict) -> dict:
    """{field: {"size", "mtime_ns"}} of the files a finished render wrote (its `out` and `preview`): what
    retention later checks before it deletes one outside the job's directory."""
    seen = {}
    for key in OUTPUT_FIELDS:
        if result.get(key):
            try:
                st = os.stat(result[key])
            except OSError:
                continue
            seen[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return seen


def delete(farm_dir: str | Path, job_id: str) -> dict:
    """`longtake delete ID`: the job's files deleted and its row scrubbed at once, with an audit line.
    A running job is refused (cancel it first: its runner is still writing)."""
    store = open_store(farm_dir, create=False)
    record = store.get(job_id)
    if record is None:
        raise RequestError("id", job_id, "the id of a job in this farm (see `longtake status`)")
    if record.state in ("running", "deleted"):
        raise RequestError("id", job_id, f"a job that is not {record.state} (it is"
                                         + (": `longtake cancel` it first)" if record.state == "running" else ")"))
    return retention.delete_job(store, Path(farm_dir), job_id, job_paths(farm_dir, record),
                                "deleted on request (longtake delete)", retention.Audit(farm_dir))


def gc(farm_dir: str | Path, policy: retention.Retention, now: float | None = None, dry_run: bool = False):
    """The retention sweep over a farm (no uploads: farm jobs read their inputs where they are)."""
    store = open_store(farm_dir, create=False)
    return retention.sweep(store, farm_dir, lambda r: job_paths(farm_dir, r), policy, now=now, dry_run=dry_run)


# ---------------------------------------------------------------- runner

class Runner:
    """Renders queued jobs on this runner's workers, several at once: each job it claims gets a share of the
    workers that are free (split evenly between the jobs ready to start, at most what the job can use: one
    per window, in groups of its cp) on a pool of its own, kept for the next job of the same model and share.
    Jobs are claimed in priority order, a job whose dependencies (a story's shots) are not done waits, and
    one that waits for a failed job fails."""

    def __init__(self, farm_dir: str | Path, address: str | None = None, workers: int | None = None,
                 checkpoint_every: int = 5, max_attempts: int = 3, blocklist_after: int = 3,
                 task_timeout_s: float | None = None, min_free_mb: float = 256, lease_s: float = 120,
                 poll_s: float = 1.0, worker_cls: type = Worker, progress: bool = False,
                 keep: retention.Retention | None = None, sweep_every_s: float = 3600.0, max_jobs: int | None = None):
        if checkpoint_every < 1:
            raise RequestError("checkpoint_every", checkpoint_every, "an integer >= 1 (steps between checkpoints)")
        if max_jobs is not None and max_jobs < 1:
            raise RequestError("max_jobs", max_jobs, "an integer >= 1 (jobs rendered at once)")
        self.farm_dir = Path(farm_dir)
        self.store = open_store(farm_dir)
        self.address, self.workers, self.max_jobs = address, workers, max_jobs
        self.checkpoint_every, self.max_attempts, self.blocklist_after = checkpoint_every, max_attempts, blocklist_after
        self.task_timeout_s, self.min_free_mb, self.lease_s, self.poll_s = task_timeout_s, min_free_mb, lease_s, poll_s
        self.worker_cls, self.progress = worker_cls, progress
        self.keep, self.sweep_every_s, self._swept = keep or retention.Retention(), sweep_every_s, -math.inf
        retention.save_policy(self.farm_dir, self.keep)
        self.id = new_runner_id()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}  # job id -> the thread rendering it
        self._reserved: dict[str, int] = {}  # job id -> workers it holds
        self._held: dict[str, dict] = {}  # job id -> {"pool": the pool rendering it}
        self._idle: list = []  # pools of finished jobs, reused by the next job of the same spec
        self._ray_started = False
        self._total = workers or 1
        self._loop: int | None = None  # the thread of serve_forever's loop
        self._recovered = -math.inf  # when recover() last ran

    # -- recovery of jobs whose runner is gone
    def recover(self) -> list[str]:
        """Requeue running jobs whose runner is gone (same host: process gone; else: lease expired). A job
        leased to this runner that it is not rendering is requeued too."""
        requeued = []
        with self._lock:
            mine = tuple(self._running)
        for job_id, owner in self.store.recover(self.id, self.lease_s, mine=mine):
            d = job_dir(self.farm_dir, job_id)
            if d.is_dir():
                append_log(d, f"runner {owner or '?'} is gone; requeued by {self.id}")
            logger.warning("job %s: runner %s is gone; requeued", job_id, owner or "?")
            requeued.append(job_id)
        return requeued

    def serve_forever(self, exit_when_idle: bool = False) -> None:
        """Claim and render jobs until `stop` is set (or, with exit_when_idle, nothing is running and no
        queued job can start)."""
        self._loop = threading.get_ident()
        self._ray_started = ray_boot.start_ray(self.address)
        if not self.workers:
            resources = ray_boot.cluster_resources()
            self._total = max(1, int(resources.get("GPU", 0)) or int(resources.get("CPU", 1)))
        try:
            self.recover()
            while not self.stop.is_set():
                self.sweep()
                self._reap()
                for job_id, dep in self.store.fail_orphans():
                    append_log(job_dir(self.farm_dir, job_id), f"failed: job {dep}, which it waits for, did not "
                                                               "finish")
                    logger.warning("job %s: failed (job %s, which it waits for, did not finish)", job_id, dep)
                if self._start_next():
                    continue
                with self._lock:
                    busy = bool(self._running)
                if exit_when_idle and not busy and self.store.count_ready() == 0:
                    break
                self.stop.wait(self.poll_s)
                if not busy or time.monotonic() - self._recovered > min(10.0, self.lease_s / 4):
                    self._recovered = time.monotonic()
                    self.recover()
        finally:
            self._join()
            self.close()

    def _start_next(self) -> bool:
        """Claim the best ready job if this runner has workers for it, and start it in a thread."""
        with self._lock:
            if self.max_jobs is not None and len(self._running) >= self.max_jobs:
                return False
            free = self._total - sum(self._reserved.values())
        best = self.store.next_ready()
        if best is None or free < 1:
            return False
        cp = int(best.request.get("cp") or 1)
        asked = best.request.get("workers")
        ready = max(1, min(self.store.count_ready(), free))
        share = min(asked, self._total) if asked else max(cp, free // ready // cp * cp)
        if share > free:  # waits for workers to come free (the best job first: no overtaking)
            return False
        record = self.store.claim_next(self.id, job_id=best.id)
        if record is None:  # taken by another runner meanwhile
            return True
        with self._lock:
            self._reserved[record.id] = share
            thread = threading.Thread(target=self._run_safely, args=(record,), name=f"job-{record.id}", daemon=True)
            self._running[record.id] = thread
        thread.start()
        return True

    def _run_safely(self, record: JobRecord) -> None:
        """run_job in a job's thread: an error it does not handle fails the job (not the runner, and not a
        requeue that would meet the same error again)."""
        try:
            self.run_job(record)
        except Exception as e:  # noqa: BLE001 - one job's bug must not stop the others
            logger.exception("job %s failed", record.id)
            if self.store.update(record.id, state="failed", error=f"{type(e).__name__}: {e}", only_from=("running",),
                                 owner=(self.id, record.lease)):
                append_log(job_dir(self.farm_dir, record.id), f"failed: {type(e).__name__}: {e}")

    def _reap(self) -> None:
        with self._lock:
            for job_id, thread in list(self._running.items()):
                if not thread.is_alive():
                    del self._running[job_id]
                    self._reserved.pop(job_id, None)

    def _join(self) -> None:
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join()
        self._reap()

    def sweep(self) -> None:
        """The retention sweep, between jobs, at most every `sweep_every_s`."""
        if time.monotonic() - self._swept < self.sweep_every_s:
            return
        self._swept = time.monotonic()
        try:
            gc(self.farm_dir, self.keep)
        except OSError as e:
            logger.warning("retention sweep failed (retried in %g s): %s", self.sweep_every_s, e)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for pool in idle:
            pool.shutdown()
        if self._ray_started:
            ray_boot.stop_ray()
            self._ray_started = False

    # -- one job
    def run_job(self, record: JobRecord) -> str:
        """Render a claimed job (job_runner.run_leased: lease, checkpoints, the stop policy); returns its
        state after this run. Its log.txt gets the runner's lines and, while it runs, the pool's (retries,
        exclusions: what the farm monitor shows): the lines of this thread only."""
        d = job_dir(self.farm_dir, record.id)
        d.mkdir(parents=True, exist_ok=True)
        request = dict(record.request)
        request.setdefault("out", str(d / "out.mp4"))
        request.setdefault("preview", str(d / "preview.png"))
        with self._lock:
            held = self._held.setdefault(record.id, {})  # this job's pool: {"pool"}
        logger.info("job %s: running (priority %d)", record.id, record.priority)
        try:
            with _logged_to(d / "log.txt", record.id, self._loop):
                JOB_LOGGER.info("run by %s", self.id)
                state, _ = run_leased(
                    self.store, record, self.id, d, lambda: request, lambda job: self._get_pool(record.id, job, held),
                    self.checkpoint_every, self.lease_s, Provenance.local(self.farm_dir, produce_id=record.id),
                    Stops(self.stop, poll_s=0.2,
                          space=lambda: check_free((d, Path(request["out"]).parent), self.min_free_mb)),
                    JobLog(d, to_logger=JOB_LOGGER), summarize=lambda result: _summary(d, result),
                    on_trouble=lambda: self._drop(held),
                    retry_hint=f"`longtake retry {record.id}` once space or access is back", progress=self.progress)
        finally:
            with self._lock:
                if held.get("pool") is not None:
                    self._idle.append(held["pool"])
                self._reserved.pop(record.id, None)
                self._held.pop(record.id, None)
        logger.info("job %s: %s", record.id, state)
        return state

    # -- the job's actor pool: its share of the workers, kept across jobs of the same model, share and group size
    def _get_pool(self, job_id: str, job, held: dict):
        from longtake.actors.ray_pool import RayPool
        from longtake.cluster.runtime import worker_plan

        if held.get("pool") is not None:
            return held["pool"]
        resources = ray_boot.cluster_resources()
        spec, slots = worker_plan(job, resources.get("GPU", 0), resources.get("CPU", 1))
        with self._lock:
            share = self._reserved.get(job_id, self._total)
            if not job.request.workers:  # its share, in groups of cp, at most one group per window
                slots = max(1, min(share // spec.cp, len(job.windows)))
            # an idle pool of this spec with at least half the slots wanted starts at once (a new one starts its
            # actors and loads the model); the slots it lacks stay free for the next job. A job that names its
            # workers gets that many.
            least = slots if job.request.workers else slots / 2
            fits = [(p.num_workers, n) for n, p in enumerate(self._idle)
                    if p.spec == spec and least <= p.num_workers <= slots]
            pool = self._idle.pop(max(fits)[1]) if fits else None
            slots = pool.num_workers if pool is not None else slots
            if not job.request.workers:
                self._reserved[job_id] = slots * spec.cp  # what it does not use is free for the next job
            stale, self._idle = (self._idle, []) if pool is None else ([], self._idle)
        for old in stale:  # another model or share: its actors free their resources first
            old.shutdown()
        if pool is None:
            pool = RayPool(spec, slots, max_attempts=self.max_attempts, worker_cls=self.worker_cls,
                           blocklist_after=self.blocklist_after, task_timeout_s=self.task_timeout_s)
        held["pool"] = pool
        return pool

    def pool(self, job_id: str):
        """The pool rendering a running job (None before it has one)."""
        with self._lock:
            return self._held.get(job_id, {}).get("pool")

    def _drop(self, held: dict) -> None:
        """After a cancel, a lost lease or a failed render: the job's workers start fresh for the next job."""
        if held.get("pool") is not None:
            held.pop("pool").shutdown()


def table_rows(records: list[JobRecord]) -> list[str]:
    """The human table of `longtake status`: short lines (the JSON has everything)."""
    lines = [f"{'ID':16}  {'STATE':9}  {'PRI':>4}  {'STEP':>7}  {'SUBMITTED':16}  WHAT"]
    for r in records:
        p, req = r.progress or {}, r.request
        step = f"{p.get('step') or 0}/{p['steps']}" if p.get("steps") else "-"
        what = req.get("prompt") or f"timeline ({len(req.get('timeline') or [])} keys)"
        if r.story:  # a story's shot: which, and the job it waits for
            what = f"{r.story['film']}:{r.story['shot']}" + (f" after {r.depends[0][:8]}" if r.depends else "") \
                + f" {what}"
        what = what if len(what) <= 48 else what[:47] + "…"
        submitted = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))
        lines.append(f"{r.id:16}  {r.state:9}  {r.priority:>4}  {step:>7}  {submitted:16}  {what}")
    return lines


@contextlib.contextmanager
def _logged_to(path: Path, job_id: str, loop: int | None = None):
    """While the block runs, longtake's log records at INFO and above (whatever the console shows) also go to
    `path`: a job's log.txt. A runner renders each job in a thread of its own: the records of this thread and
    of the job's lease thread go there, and those of any thread but other jobs' and the runner's loop
    (`loop`: a thread ident)."""
    handler = logging.FileHandler(path)
    mine, lease = threading.get_ident(), f"lease-{job_id}"

    def keep(record: logging.LogRecord) -> bool:
        if record.thread == mine or record.threadName == lease:
            return True
        return record.thread != loop and not record.threadName.startswith(("job-", "lease-"))

    handler.addFilter(keep)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("longtake")
    with _LOGGED["lock"]:
        if _LOGGED["count"] == 0:
            _LOGGED["level"] = root.level
            if root.getEffectiveLevel() > logging.INFO:
                root.setLevel(logging.INFO)
        _LOGGED["count"] += 1
        root.addHandler(handler)
    try:
        yield
    finally:
        with _LOGGED["lock"]:
            root.removeHandler(handler)
            _LOGGED["count"] -= 1
            if _LOGGED["count"] == 0:  # the last job of those running at once restores the level
                root.setLevel(_LOGGED["level"])
        handler.close()


_LOGGED = {"lock": threading.Lock(), "count": 0, "level": logging.NOTSET}  # jobs logging to their log.txt now


def _summary(d: Path, result) -> dict:
    """A done farm job's result: the render's summary and what it wrote (`written`: what retention may
    delete outside the job's directory), also in the job's result.json."""
    summary = result.to_dict()
    summary["written"] = written(summary)
    (d / "result.json").write_text(json.dumps(summary, indent=2))
    return summary
