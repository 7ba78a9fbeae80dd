"""Retention and deletion (#17): uploads and outputs are kept as long as allowed, then deleted physically.

What is deleted, and when:
- a job's output (its video, preview, checkpoints and log: the job's directory, and for a farm job the
  `out` and `preview` paths it wrote) once the job has been finished (done, failed or cancelled) for
  `outputs` (default 365 days), or at once on request (`DELETE /v1/videos/{id}`, `longtake delete ID`);
- an uploaded file (`POST /v1/files`) once it is `uploads` old (default 90 days), unless a job that has
  not finished names it (it goes when that job ends and the sweep comes by again).

Files are unlinked. The job's row is scrubbed, not dropped: its request, result and progress are
overwritten (the state becomes `deleted`, `error` says why, so reads answer 410 Gone with that reason and
an id is never reused), on connections with SQLite's `secure_delete` on (`JobStore`), and the WAL is
checkpointed and truncated, so the old text is gone from the database files' bytes too.

Every deletion appends one line to `audit.log` in the data or farm dir: JSON with when, what (output,
upload), the id, why (expired after N days, or on request and by whom), the files' names relative to the
dir and their byte count. Never their content, the prompt or a token.

`sweep` is what `longtake gc` runs (`--dry-run`: what it would delete, nothing touched); `serve` runs it
every `sweep_every_s` and the farm runner between jobs. A clock (`now`) can be set in tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from longtake.cluster.jobs import FINAL, JobStore

logger = logging.getLogger(__name__)

DAY = 86400.0
DEFAULT_UPLOADS = "90d"
DEFAULT_OUTPUTS = "365d"
AUDIT_LOG = "audit.log"
_UNITS = {"d": DAY, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


class RetentionError(ValueError):
    def __init__(self, field: str, value, expected: str):
        self.field, self.value, self.expected = field, value, expected
        super().__init__(f"{field}: got {value!r}, expected {expected}")


def parse_duration(field: str, text) -> float:
    """'90d', '12h', '30m', '45s' -> seconds (> 0); RetentionError naming `field` otherwise."""
    match = _DURATION.fullmatch(str(text).strip()) if isinstance(text, (str, int, float)) else None
    if match is None or float(match.group(1)) <= 0 or not math.isfinite(float(match.group(1))):
        raise RetentionError(field, text, "a duration > 0 such as 90d, 12h, 30m or 45s")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Retention:
    uploads: str = DEFAULT_UPLOADS
    outputs: str = DEFAULT_OUTPUTS

    def __post_init__(self):
        parse_duration("retain_uploads", self.uploads)
        parse_duration("retain_outputs", self.outputs)

    @property
    def uploads_s(self) -> float:
        return parse_duration("retain_uploads", self.uploads)

    @property
    def outputs_s(self) -> float:
        return parse_duration("retain_outputs", self.outputs)


POLICY_FILE = "retention.json"


def save_policy(directory: str | Path, policy: Retention) -> None:
    """Record the policy a server or runner applies, for `longtake gc` on the same directory."""
    path = Path(directory) / POLICY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{POLICY_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps({"uploads": policy.uploads, "outputs": policy.outputs}))
    os.replace(tmp, path)


def load_policy(directory: str | Path, uploads: str | None = None, outputs: str | None = None) -> Retention:
    """The policy for `directory`: what is given, else what its server or runner recorded, else the defaults."""
    try:
        saved = json.loads((Path(directory) / POLICY_FILE).read_text())
    except (OSError, ValueError):
        saved = {}
    return Retention(uploads or saved.get("uploads") or DEFAULT_UPLOADS,
                     outputs or saved.get("outputs") or DEFAULT_OUTPUTS)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Audit:
    """audit.log in `directory`: one JSON line per deletion, appended and flushed to disk."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / AUDIT_LOG

    def write(self, what: str, item_id: str, why: str, files: list[str], size: int, now: float | None = None):
        line = json.dumps({"at": iso(time.time() if now is None else now), "what": what, "id": item_id,
                           "why": why, "files": files, "bytes": size}, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def lines(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []


def files_under(paths: list[Path], root: Path) -> tuple[list[str], int]:
    """The regular files under `paths` (names relative to root where they are under it) and their bytes."""
    names, size = [], 0
    for path in paths:
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() \
            else []
        for f in found:
            try:
                size += f.stat().st_size
            except OSError:
                continue
            try:
                names.append(str(f.relative_to(root)))
            except ValueError:
                names.append(str(f))
    return names, size


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def delete_job(store: JobStore, root: Path, job_id: str, paths: list[Path], why: str, audit: Audit,
               now: float | None = None) -> dict:
    """Delete a job's files and scrub its row; one audit line. Returns what was deleted."""
    names, size = files_under(paths, root)
    _remove(paths)
    store.scrub(job_id, why)
    audit.write("output", job_id, why, names, size, now)
    logger.info("deleted job %s (%s): %d files, %d bytes", job_id, why, len(names), size)
    return {"what": "output", "id": job_id, "why": why, "files": names, "bytes": size}


def _days(seconds: float) -> str:
    return f"{seconds / DAY:g} days" if seconds >= DAY else f"{seconds:g} s"


def sweep(store: JobStore, root: str | Path, job_paths, retention: Retention, uploads=None,
          live_file_ids=None, now: float | None = None, dry_run: bool = False) -> list[dict]:
    """Delete what has expired under `root` (the data or farm dir): outputs of jobs finished more than
    `retention.outputs` ago, uploads older than `retention.uploads` (`uploads`: a serve FileStore, or None)
    that no unfinished job names (`live_file_ids()`: their ids). `job_paths(record)`: a job's paths.
    Returns one dict per deletion (with `dry_run`, per deletion it would make, and nothing is touched)."""
    root = Path(root)
    now = time.time() if now is None else now
    audit = Audit(root)
    done = []
    outputs_s = retention.outputs_s
    for record in store.finished_before(now - outputs_s, states=tuple(s for s in FINAL if s != "deleted")):
        why = f"expired: finished {iso(record.updated)}, outputs are kept {_days(outputs_s)}"
        paths = job_paths(record)
        if dry_run:
            names, size = files_under(paths, root)
            done.append({"what": "output", "id": record.id, "why": why, "files": names, "bytes": size})
        else:
            done.append(delete_job(store, root, record.id, paths, why, audit, now))
    if uploads is not None:
        uploads_s = retention.uploads_s
        in_use = live_file_ids() if live_file_ids is not None else set()
        for meta in uploads.all():
            if meta.get("created_at", now) > now - uploads_s:
                continue
            if meta["id"] in in_use:
                logger.info("upload %s expired but a job that has not finished names it: kept for now", meta["id"])
                continue
            why = f"expired: uploaded {iso(meta['created_at'])}, uploads are kept {_days(uploads_s)}"
            path = uploads.root / meta["id"]
            names, size = files_under([path], root)
            if not dry_run:
                _remove([path])
                audit.write("upload", meta["id"], why, names, size, now)
            done.append({"what": "upload", "id": meta["id"], "why": why, "files": names, "bytes": size})
    return done
