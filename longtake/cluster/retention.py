"""Retention and deletion (#17): uploads and outputs are kept as long as allowed, then deleted physically.

What is deleted, and when:
- a job's output (its video, preview, checkpoints and log: the job's directory, and for a farm job the
  `out` and `preview` paths it wrote) once the job has been finished (done, failed or cancelled) for
  `outputs` (default 365 days), or at once on request (`DELETE /v1/videos/{id}`, `longtake delete ID`).
  A file outside the job's directory (`Written`) is deleted only while it is still the file the job wrote
  (the size and mtime it recorded when it finished); otherwise it is kept, and the deletion says so;
- an uploaded file (`POST /v1/files`) once it is `uploads` old (default 90 days), unless a job that has
  not finished names it (it goes when that job ends and the sweep comes by again).

Files are unlinked. The job's row is scrubbed, not dropped: its request, result and progress are
overwritten (the state becomes `deleted`, `error` says why, so reads answer 410 Gone with that reason and
an id is never reused), on connections with SQLite's `secure_delete` on (`JobStore`), and the WAL is
checkpointed and truncated, so the old text is gone from the database files' bytes too.

Every deletion appends one line to `audit.log` in the data or farm dir: JSON with when, what (output,
upload), the id, why (expired after N days, or on request and by whom), the files' names relative to the
dir and their byte count (each file once, however many of the job's paths name it), and `kept`: the files
of the job left in place and why. Never their content, the prompt or a token.

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
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from longtake.cluster.jobs import FINAL, JobStore, iso

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


class Audit:
    """audit.log in `directory`: one JSON line per deletion, appended and flushed to disk."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / AUDIT_LOG

    def write(self, what: str, item_id: str, why: str, files: list[str], size: int, now: float | None = None,
              kept: list[dict] | None = None):
        entry = {"at": iso(time.time() if now is None else now), "what": what, "id": item_id, "why": why,
                 "files": files, "bytes": size}
        if kept is not None:
            entry["kept"] = kept
        line = json.dumps(entry, sort_keys=True)
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


@dataclass(frozen=True)
class Written:
    """A file a job wrote outside its own directory (a farm job's `out` or `preview`) and what it was when the
    job finished (its size and mtime_ns, recorded then; None for a job that recorded nothing). It is deleted
    only while it is still that file: another job, or a person, may have written that path since."""
    path: Path
    size: int | None = None
    mtime_ns: int | None = None

    def changed(self) -> str | None:
        """Why the file at `path` is not (provably) the one the job wrote; None when it still is, or is gone."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if self.size is None or self.mtime_ns is None:
            return "the job recorded no size and time for it"
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            return "changed since the job wrote it"
        return None


def _name(path: Path, root: Path) -> str:
    """A file's name in the audit: relative to root where it is under it, else absolute."""
    for base, p in ((root, path), (Path(os.path.realpath(root)), Path(os.path.realpath(path)))):
        try:
            return str(p.relative_to(base))
        except ValueError:
            continue
    return str(path)


def owned(paths: list) -> tuple[list[Path], list[dict]]:
    """A job's paths (Path: deleted whatever is there; Written: only while unchanged) -> (the paths to
    delete, [{"file", "why"}] of the files kept)."""
    remove, kept = [], []
    for path in paths:
        if isinstance(path, Written):
            reason = path.changed()
            if reason is None:
                remove.append(path.path)
            else:
                kept.append({"file": str(path.path), "why": reason})
        else:
            remove.append(Path(path))
    return remove, kept


def files_under(paths: list[Path], root: Path) -> tuple[list[str], int]:
    """The regular files under `paths`, each once however many of the paths name it (a job's video inside
    its directory, also named on its own), with names relative to root where they are under it, and their
    bytes."""
    names, size, seen = [], 0, set()
    for path in paths:
        path = Path(path)
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() \
            else []
        for f in found:
            key = os.path.realpath(f)
            if key in seen:
                continue
            seen.add(key)
            try:
                size += f.stat().st_size
            except OSError:
                continue
            names.append(_name(f, Path(root)))
    return names, size


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def delete_job(store: JobStore, root: Path, job_id: str, paths: list, why: str, audit: Audit,
               now: float | None = None) -> dict:
    """Delete a job's files and scrub its row; one audit line. `paths`: Path (deleted) or Written (deleted
    while unchanged, else kept). Returns what was deleted: {"what", "id", "why", "files", "bytes", "kept"}."""
    remove, kept = owned(paths)
    for item in kept:
        item["file"] = _name(Path(item["file"]), Path(root))
    names, size = files_under(remove, root)
    _remove(remove)
    store.scrub(job_id, why)
    audit.write("output", job_id, why, names, size, now, kept=kept)
    logger.info("deleted job %s (%s): %d files, %d bytes%s", job_id, why, len(names), size,
                "".join(f"; kept {k['file']}: {k['why']}" for k in kept))
    return {"what": "output", "id": job_id, "why": why, "files": names, "bytes": size, "kept": kept}


def _days(seconds: float) -> str:
    return f"{seconds / DAY:g} days" if seconds >= DAY else f"{seconds:g} s"


def sweep(store: JobStore, root: str | Path, job_paths, retention: Retention, uploads=None,
          live_file_ids=None, now: float | None = None, dry_run: bool = False) -> list[dict]:
    """Delete what has expired under `root` (the data or farm dir): outputs of jobs finished more than
    `retention.outputs` ago, uploads older than `retention.uploads` (`uploads`: a serve FileStore, or None)
    that no unfinished job names (`live_file_ids()`: their ids). `job_paths(record)`: a job's paths (Path or
    Written, as `delete_job` takes them).
    What a deleted job left on disk (a runner or server that died while it deleted it, a file written after)
    goes too, with an audit line of its own.
    Returns one dict per deletion (with `dry_run`, per deletion it would make, and nothing is touched)."""
    root = Path(root)
    now = time.time() if now is None else now
    audit = Audit(root)
    done = []
    for record in store.finished_before(math.inf, states=("deleted",)):
        left = [p for p in job_paths(record) if isinstance(p, Path) and p.exists()]
        if left:
            names, size = files_under(left, root)
            why = "left by a deleted job"
            if not dry_run:
                _remove(left)
                audit.write("output", record.id, why, names, size, now)
            done.append({"what": "output", "id": record.id, "why": why, "files": names, "bytes": size})
    outputs_s = retention.outputs_s
    for record in store.finished_before(now - outputs_s, states=tuple(s for s in FINAL if s != "deleted")):
        why = f"expired: finished {iso(record.updated)}, outputs are kept {_days(outputs_s)}"
        paths = job_paths(record)
        if dry_run:
            remove, kept = owned(paths)
            names, size = files_under(remove, root)
            kept = [{**k, "file": _name(Path(k["file"]), root)} for k in kept]
            done.append({"what": "output", "id": record.id, "why": why, "files": names, "bytes": size, "kept": kept})
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
