"""The job store: SQLite, one row per job (DESIGN.md contract 8), shared by the farm and serve.

Journal: WAL on a local filesystem. WAL's index is memory shared between the processes of one machine,
so it is unsafe on a network filesystem (NFS, SMB, 9p, CephFS, Lustre, sshfs, gcsfuse, ...: `NETWORK_FS`,
read from /proc/self/mountinfo): there the store falls back to a rollback journal (journal_mode=DELETE) and
logs a warning naming the path. That mode is safe where the filesystem's locks work across machines;
keep the store on a local disk of one machine where you can (deploy/rayservice.yaml does).

A job has an id, a state, its request, progress, an error or a result, an optional idempotency key and
a lease. Every write is one short transaction on a connection opened and closed for it, so several
processes (a server, runners, `longtake status`) can share the file. No Ray here.

Leases (fencing). `claim_next(runner)` moves a queued job to running and gives it to `runner` with a
new lease generation. The runner's own writes (progress, done, failed, requeue) pass `owner=(runner,
generation)` and change nothing once the job was taken from it; `Lease` heartbeats in a thread and sets
`lost` when the lease was taken over or could not be renewed, and the runner then stops rendering.
`recover()` requeues the jobs of runners that are gone: process gone (judged only for a runner of the same
host, boot id and pid namespace: a runner id is host:pid:token:boot:pidns, since pods share host names and
have their own pids), or no heartbeat for `lease_s` (a reused process id cannot keep a dead runner's job;
runner ids of older versions are judged by their lease only).

The job-status JSON (`JobRecord.to_dict`, the one shape of `longtake status --json` and the HTTP API):
    {"id", "status", "priority", "created", "updated" (ISO 8601 UTC), "request" (as submitted, full prompt),
     "progress": {"phase", "step" (steps completed), "steps", "window_steps_done", "window_steps_total",
                  "frames_done", "frames", "eta_s", "windows" (each window's steps predicted: the window x step
                  grid), "running" (windows predicting now), "workers" (pool.WorkerBook's, where the pool
                  keeps one)}, "error", "result", "client" (the API client that submitted it, serve.keys;
     None on the farm), "depends" (ids of the jobs it waits for), "story" (a story's shot: {"film", "shot",
     "begin"}, else None)}
Over HTTP an idempotency key belongs to its client: the store keeps it as "CLIENT/KEY" (`scoped_key`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "paused", "done", "failed", "cancelled", "deleted")
FINAL = ("done", "failed", "cancelled", "deleted")
ACTIVE = ("queued", "running")  # what counts against a queue limit
SQLITE_INT_MAX = 2**63 - 1
PROGRESS_KEYS = ("phase", "step", "steps", "window_steps_done", "window_steps_total", "frames_done", "frames", "eta_s",
                 "windows", "running", "workers")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    result TEXT,
    runner TEXT,
    lease INTEGER NOT NULL DEFAULT 0,
    client TEXT,
    depends TEXT NOT NULL DEFAULT '[]',
    story TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, created);
"""


class Conflict(Exception):
    """An idempotency key already used for a different request."""


def scoped_key(client: str | None, key: str | None) -> str | None:
    """An idempotency key as stored: one client's key never names another client's job (no client: as is)."""
    return key if key is None or client is None else f"{client}/{key}"


class QueueFull(Exception):
    """Too many jobs queued or running; retry later."""


class ClientFull(QueueFull):
    """One client has as many jobs queued, running or paused as its key allows; retry later."""


def append_log(directory: Path, message: str) -> None:
    """One line in a job's log (DIR/log.txt: the farm's and serve's), stamped with the local time."""
    with open(Path(directory) / "log.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def iso(t: float) -> str:
    """A Unix time as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_first(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def this_machine() -> tuple[str, str, str]:
    """(host name, boot id, pid namespace) of this process: pids are comparable only where all three match
    (pods share a host name and have their own pid namespaces; a reboot reuses pids). An id that cannot be
    read (no /proc) is "", which matches nothing."""
    boot = _read_first("/proc/sys/kernel/random/boot_id").replace("-", "")[:12]
    try:
        pidns = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        pidns = ""
    return socket.gethostname(), boot, pidns


def new_runner_id(kind: str = "") -> str:
    """host:pid:KINDtoken:boot:pidns. The random token tells a process apart from a later one that reuses its
    pid; the boot id and pid namespace say where that pid means something (`recover`)."""
    host, boot, pidns = this_machine()
    return f"{host}:{os.getpid()}:{kind}{uuid.uuid4().hex[:12]}:{boot}:{pidns}"


def _gone_here(owner: str) -> bool:
    """True when `owner` (a runner id) names a process of this host, boot and pid namespace that is not
    alive. Any other owner (another machine or container, or an id of an older format without boot id and
    namespace) is never judged by its pid: its lease decides."""
    parts = owner.split(":")
    if len(parts) != 5 or not parts[1].isdigit():
        return False
    host, boot, pidns = this_machine()
    return bool(boot and pidns) and (parts[0], parts[3], parts[4]) == (host, boot, pidns) \
        and not _pid_alive(int(parts[1]))


@dataclass
class JobRecord:
    id: str
    state: str
    request: dict
    priority: int = 0
    idempotency_key: str | None = None
    created: float = 0.0
    updated: float = 0.0
    progress: dict = field(default_factory=dict)
    error: str | None = None
    result: dict | None = None
    runner: str | None = None  # runner_id of the process rendering it
    lease: int = 0  # lease generation: grows at every claim
    client: str | None = None  # the API client (serve.keys) that submitted it
    depends: list = field(default_factory=list)  # ids of the jobs it waits for (a story's shots: story.py)
    story: dict | None = None  # a story's shot: {"film", "shot", "begin"} (what the monitors show)

    def to_dict(self) -> dict:
        """The one job-status shape (module docstring)."""
        progress = {k: self.progress.get(k) for k in PROGRESS_KEYS}
        return {"id": self.id, "status": self.state, "priority": self.priority, "created": iso(self.created),
                "updated": iso(self.updated), "request": self.request, "progress": progress,
                "error": self.error or None, "result": self.result, "client": self.client,
                "depends": self.depends, "story": self.story}


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], state=row["state"], request=json.loads(row["request"]), priority=row["priority"],
        idempotency_key=row["idempotency_key"], created=row["created"], updated=row["updated"],
        progress=json.loads(row["progress"]), error=row["error"],
        result=json.loads(row["result"]) if row["result"] else None, runner=row["runner"], lease=row["lease"],
        client=row["client"], depends=json.loads(row["depends"]), story=json.loads(row["story"]) if row["story"] else None)


def _check_int(name: str, value, low: int, high: int = SQLITE_INT_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}: got {value!r}, expected an integer from {low} to {high}")
    return value


MOUNTINFO = "/proc/self/mountinfo"
# filesystem types (mountinfo's) where SQLite's WAL is unsafe: a network or cluster filesystem, or FUSE over one
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "afs",
              "ocfs2", "gfs2", "beegfs", "orangefs", "fuse.sshfs", "fuse.gcsfuse", "fuse.s3fs", "fuse.rclone",
              "fuse.goofys", "fuse.juicefs", "fuse.glusterfs", "fuse.ceph-fuse", "fuse.blobfuse2",
              "fuse.mountpoint-s3", "fuse.geesefs")


def mount_type(path: str, mountinfo: str) -> str | None:
    """The filesystem type of the mount that holds `path` (absolute, symlinks resolved), read from the text of
    /proc/self/mountinfo: the longest mount point that contains it, the last mounted where several share it."""
    best, found = -1, None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 is a space
        inside = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:
            best, found = len(point), right.split()[0]
    return found


def network_fs(path: str | Path) -> str | None:
    """The type of the network filesystem that holds `path` (which exists), or None for a local one or where
    mounts cannot be read (no /proc)."""
    try:
        with open(MOUNTINFO) as f:
            text = f.read()
    except OSError:
        return None
    kind = mount_type(os.path.realpath(path), text)
    return kind if kind in NETWORK_FS else None


_warned: set[str] = set()


class JobStore:
    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no job store at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remote = network_fs(self.path.parent)
        if remote and str(self.path) not in _warned:
            _warned.add(str(self.path))
            logger.warning("job store %s is on a network filesystem (%s): using a rollback journal, not WAL (WAL "
                           "needs memory shared by the processes of one machine); keep it on a local disk if you "
                           "can", self.path, remote)
        with self._db() as db:
            db.execute(f"PRAGMA journal_mode={'DELETE' if remote else 'WAL'}")
            db.executescript(SCHEMA)
            columns = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            if "runner" not in columns:  # a store made before the farm existed
                db.execute("ALTER TABLE jobs ADD COLUMN runner TEXT")
            if "lease" not in columns:  # a store made before leases
                db.execute("ALTER TABLE jobs ADD COLUMN lease INTEGER NOT NULL DEFAULT 0")
            if "client" not in columns:  # a store made before API keys
                db.execute("ALTER TABLE jobs ADD COLUMN client TEXT")
            if "depends" not in columns:  # a store made before stories
                db.execute("ALTER TABLE jobs ADD COLUMN depends TEXT NOT NULL DEFAULT '[]'")
                db.execute("ALTER TABLE jobs ADD COLUMN story TEXT")

    @contextmanager
    def _db(self):
        """A connection for one operation, closed when it ends (autocommit; explicit BEGIN where needed)."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA secure_delete=ON")  # what a scrub overwrites is zeroed, not left in free space
            yield db
        finally:
            db.close()

    def create(self, request: dict, priority: int = 0, idempotency_key: str | None = None,
               max_active: int | None = None, client: str | None = None,
               client_max_active: int | None = None, depends: list[str] = (),
               story: dict | None = None) -> tuple[JobRecord, bool]:
        """Insert a queued job; returns (job, created). An idempotency key already used for the same request
        returns that job (created False); for another request it raises Conflict. With `max_active`, raises
        QueueFull when that many jobs are queued or running; with `client_max_active`, when `client` has that
        many queued, running or paused (ClientFull); the checks and the insert are one transaction. `depends`:
        the ids of jobs that must be done before this one is claimed (`claim_next`, `fail_orphans`)."""
        _check_int("priority", priority, -SQLITE_INT_MAX)
        now = time.time()
        job_id = uuid.uuid4().hex[:16]
        text = json.dumps(request, sort_keys=True)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency_key is not None:
                    row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                    if row is not None:
                        if json.loads(row["request"]) != json.loads(text):
                            raise Conflict(f"idempotency key {idempotency_key!r} was used for job {row['id']} with "
                                           "a different request")
                        return _record(row), False
                if max_active is not None:
                    marks = ",".join("?" * len(ACTIVE))
                    active = db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", ACTIVE).fetchone()[0]
                    if active >= max_active:
                        raise QueueFull(f"{active} jobs queued or running, at most {max_active}")
                if client_max_active is not None:
                    states = (*ACTIVE, "paused")
                    mine = db.execute(f"SELECT COUNT(*) FROM jobs WHERE client = ? AND state IN "
                                      f"({','.join('?' * len(states))})", (client, *states)).fetchone()[0]
                    if mine >= client_max_active:
                        raise ClientFull(f"client {client!r} has {mine} jobs queued, running or paused, at most "
                                         f"{client_max_active}")
                db.execute("INSERT INTO jobs (id, state, request, priority, idempotency_key, created, updated, client, "
                           "depends, story) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                           (job_id, text, priority, idempotency_key, now, now, client, json.dumps(list(depends)),
                            json.dumps(story) if story is not None else None))
            finally:
                db.execute("COMMIT")
        return self.get(job_id), True

    def scrub(self, job_id: str, why: str) -> None:
        """Delete a job for good (retention.py): its request, result and progress overwritten, the state
        `deleted` and `why` as its error (what a read answers with 410); then the WAL is checkpointed and
        truncated, so the old text is in neither database file."""
        with self._db() as db:
            db.execute("UPDATE jobs SET state = 'deleted', request = '{}', result = NULL, progress = '{}', "
                       "error = ?, idempotency_key = NULL, runner = NULL, updated = ? WHERE id = ?",
                       (why, time.time(), job_id))
        self.checkpoint()

    def checkpoint(self) -> None:
        with self._db() as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def finished_before(self, t: float, states: tuple[str, ...] = FINAL) -> list[JobRecord]:
        """Jobs in `states` whose last change is older than `t` (seconds since the epoch), oldest first."""
        marks = ",".join("?" * len(states))
        with self._db() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) AND updated < ? ORDER BY updated",
                              (*states, t)).fetchall()
        return [_record(r) for r in rows]

    def get(self, job_id: str) -> JobRecord | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def get_by_key(self, idempotency_key: str) -> JobRecord | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return _record(row) if row else None

    def list(self, limit: int = 20, offset: int = 0, state: str | None = None,
             hide: tuple[str, ...] = (), client: str | None = None) -> list[JobRecord]:
        """Newest first (with `client`: that client's only). Raises ValueError for a limit or offset SQLite
        cannot take."""
        _check_int("limit", limit, 0)
        _check_int("offset", offset, 0)
        where, args = [], []
        if state is not None:
            where, args = ["state = ?"], [state]
        if client is not None:
            where.append("client = ?")
            args.append(client)
        if hide:
            where.append(f"state NOT IN ({','.join('?' * len(hide))})")
            args += list(hide)
        query = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        with self._db() as db:
            rows = db.execute(query + " ORDER BY created DESC, id LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [_record(r) for r in rows]

    def count(self, states: tuple[str, ...] = STATES, client: str | None = None) -> int:
        marks = ",".join("?" * len(states))
        mine, args = (" AND client = ?", (client,)) if client is not None else ("", ())
        with self._db() as db:
            return db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks}){mine}", (*states, *args)).fetchone()[0]

    READY = ("state = 'queued' AND NOT EXISTS (SELECT 1 FROM json_each(jobs.depends) AS d WHERE NOT EXISTS "
             "(SELECT 1 FROM jobs AS j WHERE j.id = d.value AND j.state = 'done'))")  # every dependency done

    def next_ready(self) -> JobRecord | None:
        """The best queued job whose dependencies are all done (priority, then submit time), not claimed."""
        with self._db() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE {self.READY} ORDER BY priority DESC, created, id LIMIT 1"
                             ).fetchone()
        return _record(row) if row else None

    def count_ready(self) -> int:
        """How many queued jobs could start now (their dependencies done)."""
        with self._db() as db:
            return db.execute(f"SELECT COUNT(*) FROM jobs WHERE {self.READY}").fetchone()[0]

    def claim_next(self, runner: str | None = None, job_id: str | None = None) -> JobRecord | None:
        """Atomically move the best ready queued job (priority, then submit time; every job it depends on
        done), or the job `job_id` if it is still one, to running, leased to `runner` with a new lease
        generation."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            only = " AND id = ?" if job_id is not None else ""
            row = db.execute(f"SELECT id FROM jobs WHERE {self.READY}{only} ORDER BY priority DESC, created, id "
                             "LIMIT 1", (job_id,) if job_id is not None else ()).fetchone()
            if row is not None:
                db.execute("UPDATE jobs SET state = 'running', updated = ?, runner = ?, lease = lease + 1 WHERE id = ?",
                           (time.time(), runner, row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"]) if row else None

    def fail_orphans(self) -> list[tuple[str, str]]:
        """Fail the queued jobs that wait for a job that failed, was cancelled or deleted (and so on down the
        graph: a failed shot fails only what depends on it). Returns [(job id, the job it waited for)]."""
        failed = []
        while True:
            with self._db() as db:
                rows = db.execute("SELECT jobs.id, j.id AS dep, j.state FROM jobs, json_each(jobs.depends) AS d "
                                  "JOIN jobs AS j ON j.id = d.value WHERE jobs.state = 'queued' AND j.state IN "
                                  "('failed', 'cancelled', 'deleted')").fetchall()
            if not rows:
                return failed
            for row in rows:
                if self.update(row["id"], state="failed", only_from=("queued",),
                               error=f"job {row['dep']}, which it waits for, is {row['state']} (retry that job, "
                                     "then this one; or run the story again)"):
                    failed.append((row["id"], row["dep"]))

    def update(self, job_id: str, *, state: str | None = None, progress: dict | None = None,
               error: str | None = None, result: dict | None = None, only_from: tuple[str, ...] | None = None,
               owner: tuple[str, int] | None = None) -> bool:
        """Set fields of a job; with `only_from`, only if its state is one of those; with `owner` (runner,
        lease generation), only if the job is still leased to it. Returns True if changed.
        (error="" clears the error; a job leaving `running` loses its runner.)"""
        if state is not None and state not in STATES:
            raise ValueError(f"state: got {state!r}, expected one of {', '.join(STATES)}")
        sets, args = ["updated = ?"], [time.time()]
        for column, value in (("state", state), ("progress", progress), ("error", error), ("result", result)):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(json.dumps(value) if isinstance(value, dict) else value)
        if state is not None and state != "running":
            sets.append("runner = NULL")
        where, wargs = "id = ?", [job_id]
        if only_from:
            where += f" AND state IN ({','.join('?' * len(only_from))})"
            wargs += list(only_from)
        if owner is not None:
            where += " AND runner = ? AND lease = ?"
            wargs += list(owner)
        with self._db() as db:
            return db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}", (*args, *wargs)).rowcount == 1

    def heartbeat(self, job_id: str, owner: tuple[str, int]) -> bool:
        """Renew a lease; False when the job is no longer leased to `owner` (requeued or taken over)."""
        with self._db() as db:
            return db.execute("UPDATE jobs SET updated = ? WHERE id = ? AND runner = ? AND lease = ?",
                              (time.time(), job_id, *owner)).rowcount == 1

    def recover(self, me: str, lease_s: float, mine: tuple[str, ...] = ()) -> list[tuple[str, str]]:
        """Requeue running jobs whose runner is gone: this process's own jobs that it is not rendering
        (`mine`), jobs of a process gone from this host, boot and pid namespace (`_gone_here`), and jobs whose
        lease was not renewed for `lease_s`. Returns [(job id, old runner)]."""
        requeued = []
        for record in self.list(limit=SQLITE_INT_MAX, state="running"):
            owner = record.runner or ""
            if owner == me:
                gone = record.id not in mine
            else:
                gone = _gone_here(owner) or time.time() - record.updated > lease_s
            if gone and self.update(record.id, state="queued", progress={}, only_from=("running",),
                                    owner=(record.runner, record.lease) if record.runner else None):
                requeued.append((record.id, owner))
        return requeued


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """Keeps a claimed job's lease alive from a thread. `lost` is set (and `reason` says why) when the
    job was taken from this runner, or when the heartbeat could not be written for half the lease (the
    store is unreachable: another runner will requeue the job, so this one must stop rendering)."""

    def __init__(self, store: JobStore, job_id: str, owner: tuple[str, int], lease_s: float, log=None):
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.log = log or logger
        self.lost = threading.Event()
        self.reason = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{job_id}")

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _lose(self, reason: str) -> None:
        self.reason = reason
        self.log.error("job %s: lease lost (%s); stopping", self.job_id, reason)
        self.lost.set()

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._done.wait(min(10.0, self.lease_s / 4)):
            try:
                if not self.store.heartbeat(self.job_id, self.owner):
                    return self._lose("the job was requeued or taken over by another runner")
                last_ok = time.monotonic()
            except Exception as e:  # an SQLite error, a full disk: keep trying until the lease is at risk
                silent = time.monotonic() - last_ok
                self.log.error("job %s: heartbeat failed (%s: %s), last renewed %.0f s ago", self.job_id,
                               type(e).__name__, e, silent)
                if silent > self.lease_s / 2:
                    return self._lose(f"no heartbeat for {silent:.0f} s: {type(e).__name__}: {e}")


class ProgressWriter:
    """on_progress for a leased job: writes at most every `interval` s, and always on a phase change."""

    def __init__(self, store: JobStore, job_id: str, owner: tuple[str, int] | None, interval: float = 0.5):
        self.store, self.job_id, self.owner, self.interval = store, job_id, owner, interval
        self.last, self.phase = 0.0, None

    def __call__(self, p: dict) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval or p.get("phase") != self.phase:
            self.last, self.phase = now, p.get("phase")
            self.store.update(self.job_id, progress=p, only_from=("running",), owner=self.owner)
