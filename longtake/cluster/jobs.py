"""The job store: SQLite in WAL mode, one row per job (DESIGN.md contract 8).

A job has an id, a state, its request, progress, an error or a result, an optional idempotency key
and a directory for its files. Every write is one short transaction, so several processes (a server,
a runner, `longtake status`) can share the file. No Ray here.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("queued", "running", "paused", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")

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
    runner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, created);
"""


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
    runner: str | None = None  # "host:pid" of the process rendering it (farm runner)

    def to_dict(self) -> dict:
        return {"id": self.id, "status": self.state, "request": self.request, "priority": self.priority,
                "created": self.created, "updated": self.updated, "progress": self.progress,
                "error": self.error or None, "result": self.result}


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], state=row["state"], request=json.loads(row["request"]), priority=row["priority"],
        idempotency_key=row["idempotency_key"], created=row["created"], updated=row["updated"],
        progress=json.loads(row["progress"]), error=row["error"],
        result=json.loads(row["result"]) if row["result"] else None, runner=row["runner"])


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            columns = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            if "runner" not in columns:  # a store made before the farm existed
                db.execute("ALTER TABLE jobs ADD COLUMN runner TEXT")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # autocommit; explicit BEGIN below
        db.row_factory = sqlite3.Row
        return db

    def create(self, request: dict, priority: int = 0, idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
        """Insert a queued job. With an idempotency key already used, return that job instead.
        Returns (job, created)."""
        now = time.time()
        job_id = uuid.uuid4().hex[:16]
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    db.execute("COMMIT")
                    return _record(row), False
            db.execute("INSERT INTO jobs (id, state, request, priority, idempotency_key, created, updated) "
                       "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                       (job_id, json.dumps(request), priority, idempotency_key, now, now))
            db.execute("COMMIT")
        return self.get(job_id), True

    def get(self, job_id: str) -> JobRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def get_by_key(self, idempotency_key: str) -> JobRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return _record(row) if row else None

    def list(self, limit: int = 20, offset: int = 0, state: str | None = None) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs", []
        if state is not None:
            query, args = query + " WHERE state = ?", [state]
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created DESC, id LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [_record(r) for r in rows]

    def count(self, states: tuple[str, ...] = STATES) -> int:
        marks = ",".join("?" * len(states))
        with self._connect() as db:
            return db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", states).fetchone()[0]

    def claim_next(self, runner: str | None = None) -> JobRecord | None:
        """Atomically move the best queued job (priority, then submit time) to running."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY priority DESC, created, id LIMIT 1"
                             ).fetchone()
            if row is not None:
                db.execute("UPDATE jobs SET state = 'running', updated = ?, runner = ? WHERE id = ?",
                           (time.time(), runner, row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"]) if row else None

    def update(self, job_id: str, *, state: str | None = None, progress: dict | None = None,
               error: str | None = None, result: dict | None = None, only_from: tuple[str, ...] | None = None) -> bool:
        """Set fields of a job; with `only_from`, only if its state is one of those. Returns True if changed.
        (error="" clears the error.)"""
        if state is not None and state not in STATES:
            raise ValueError(f"state: got {state!r}, expected one of {', '.join(STATES)}")
        sets, args = ["updated = ?"], [time.time()]
        for column, value in (("state", state), ("progress", progress), ("error", error), ("result", result)):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(json.dumps(value) if isinstance(value, dict) else value)
        where, wargs = "id = ?", [job_id]
        if only_from:
            where += f" AND state IN ({','.join('?' * len(only_from))})"
            wargs += list(only_from)
        with self._connect() as db:
            cur = db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}", (*args, *wargs))
        return cur.rowcount == 1

    def delete(self, job_id: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 1
