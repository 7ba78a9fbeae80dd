"""Uploaded files (`POST /v1/files`): images and videos a client sends once and names by id in requests.

Each file lives in DATA_DIR/uploads/<id>/ as `content` (the bytes as sent) and `meta.json` (its id, kind,
size, SHA-256, upload time, the client's file name and its owner). The kind (image or video) comes from
probing the content (media.probe_media), never from the name. A file belongs to the token that uploaded
it: `owner` is a hash of that token (the token itself is never stored), and a file asked for under
another owner is answered as missing. A file is moved into place whole (rename), so a reader never sees
half of one.

An upload is written to DATA_DIR/uploads/.incoming/ first (`receive`: a file that its upload holds locked,
an exclusive flock, until it is kept or dropped). `sweep_incoming` removes what no live upload holds there
any more (a server or client that died mid-upload), at every server start and every retention sweep. What
one owner may hold (files and bytes: the per-key upload quotas) is checked by `add`'s `admit` under a lock
on uploads/.lock, so that concurrent uploads of one owner, on any server of the data dir, cannot pass it.
Everything here is created owner-only (directories 0700, files 0600).

A request sent over HTTP names files by id in its media fields (`image`, `keyframes[].image`, `video`,
`extend`, `lead_into`); `local_request` swaps ids for paths before the engine opens them. The stored job
keeps the ids. Plain Python (no Ray Serve): the ingress writes files, the manager reads them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from longtake.media import probe_media
from longtake.request import MEDIA_FIELDS, MEDIA_KINDS, RequestError

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
INCOMING_GRACE_S = 60.0  # an unheld entry of .incoming younger than this is left (it may be being created)


def owner_of(token: str) -> str:
    """The owner key of a token: a hash, so that no token is written to disk with the files."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _held(path: Path) -> bool:
    """Whether a live upload holds `path` (an exclusive flock on it; see Incoming)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # gone, or not a file: nothing holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases the lock if we took it)


class Incoming:
    """A new upload's file in .incoming, created empty (0600) and held (an exclusive flock) until `close`,
    which removes whatever is left at `path` (nothing once `add` has kept it). A context manager."""

    def __init__(self, directory: Path):
        self.path = directory / secrets.token_hex(12)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def close(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Incoming":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileStore:
    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir) / "uploads"

    def _incoming_dir(self) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.root / ".incoming"
        tmp.mkdir(mode=0o700, exist_ok=True)
        return tmp

    def incoming(self) -> Path:
        """A new private path to write an upload to before `add` (same file system as the store). Nothing
        holds it: `sweep_incoming` removes it once INCOMING_GRACE_S old; a server uses `receive`."""
        return self._incoming_dir() / secrets.token_hex(12)

    def receive(self) -> Incoming:
        """A new upload's file, held until closed (`sweep_incoming` never removes a held one)."""
        return Incoming(self._incoming_dir())

    def sweep_incoming(self, now: float | None = None, grace_s: float = INCOMING_GRACE_S) -> list[str]:
        """Remove from .incoming what no live upload holds (a partial upload left by a server or client that
        died, or a file that was being moved into place: NAME.d/content) and that has not changed for
        `grace_s` seconds. Returns the names removed."""
        tmp = self.root / ".incoming"
        if not tmp.is_dir():
            return []
        now = time.time() if now is None else now
        removed = []
        for entry in sorted(tmp.iterdir()):
            content = entry / "content" if entry.is_dir() else entry
            try:
                changed = max(p.stat().st_mtime for p in (entry, content) if p.exists())
            except (OSError, ValueError):  # gone meanwhile
                continue
            if now - changed < grace_s or _held(content):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        return removed

    def usage(self, owner: str) -> tuple[int, int]:
        """(files, bytes) that `owner` holds."""
        mine = [m for m in self.all() if secrets.compare_digest(m.get("owner", ""), owner)]
        return len(mine), sum(m.get("bytes", 0) for m in mine)

    def add(self, path: Path, owner: str, filename: str | None = None, admit=None) -> dict:
        """Probe the file at `path` (written by the caller) and keep it; its metadata. RequestError
        (field `file`) when it is not an image or a video within the limits; the file is removed then.
        `admit(files, bytes)`, if given, is called with what `owner` would hold with this file, under a lock
        on the store (every process of the data dir), and raises to refuse it (the file is removed then)."""
        try:
            info = probe_media("file", str(path))
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            file_id = f"file-{secrets.token_hex(12)}"
            meta = {"id": file_id, "object": "file", "kind": info["kind"], "bytes": path.stat().st_size,
                    "sha256": digest.hexdigest(), "created_at": int(time.time()),
                    "filename": (filename or "")[:200], **{k: info[k] for k in ("width", "height", "seconds") if k in info},
                    "owner": owner}
            with os.fdopen(os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one add at a time: what `admit` counts stays true
                if admit is not None:
                    files, size = self.usage(owner)
                    admit(files + 1, size + meta["bytes"])
                staging = path.with_name(path.name + ".d")
                staging.mkdir(mode=0o700)
                os.replace(path, staging / "content")
                fd = os.open(staging / "meta.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(meta))
                os.replace(staging, self.root / file_id)
            return public(meta)
        finally:
            path.unlink(missing_ok=True)

    def _meta(self, file_id: str, owner: str | None) -> dict | None:
        if not isinstance(file_id, str) or not FILE_ID.fullmatch(file_id):
            return None
        try:
            meta = json.loads((self.root / file_id / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if owner is None or secrets.compare_digest(meta.get("owner", ""), owner) else None

    def all(self) -> list[dict]:
        """Every stored file's metadata (owners included: for retention, never for clients)."""
        if not self.root.is_dir():
            return []
        found = (self._meta(p.name, None) for p in sorted(self.root.iterdir()) if FILE_ID.fullmatch(p.name))
        return [m for m in found if m is not None]

    def get(self, file_id: str, owner: str | None) -> dict | None:
        """The file's metadata as clients see it; None if there is none of this owner's."""
        meta = self._meta(file_id, owner)
        return public(meta) if meta else None

    def delete(self, file_id: str, owner: str) -> bool:
        if self._meta(file_id, owner) is None:
            return False
        shutil.rmtree(self.root / file_id, ignore_errors=True)
        return True

    def path(self, field: str, file_id, owner: str | None) -> str:
        """The local path of the file `file_id` named in request field `field`, checked to be one of
        `owner`'s (None: any owner, for a job accepted earlier) and of the kind the field takes."""
        meta = self._meta(file_id, owner)
        if meta is None:
            raise RequestError(field, file_id, "the id of a file you uploaded (POST /v1/files)")
        kind = MEDIA_KINDS[field.split("[")[0]]
        if meta["kind"] != kind:
            raise RequestError(field, file_id, f"{_a(kind)} file (this one is {_a(meta['kind'])})")
        return str(self.root / file_id / "content")

    def local_request(self, body: dict, owner: str | None) -> tuple[dict, dict]:
        """The request with every file id in its media fields replaced by the file's path, and a map from
        those paths back to the ids (errors name ids, never paths)."""
        body, ids = dict(body), {}
        if isinstance(body.get("keyframes"), list):
            body["keyframes"] = [dict(k) if isinstance(k, dict) else k for k in body["keyframes"]]
        for holder, key, field in media_slots(body):
            path = self.path(field, holder[key], owner)
            ids[path] = holder[key]
            holder[key] = path
        return body, ids


def media_slots(body: dict):
    """(holder, key, field name) of every media reference a request body makes."""
    for field in MEDIA_FIELDS:
        if field != "keyframes" and body.get(field) is not None:
            yield body, field, field
        elif field == "keyframes" and isinstance(body.get(field), list):
            for i, key in enumerate(body[field]):
                if isinstance(key, dict) and key.get("image") is not None:
                    yield key, "image", f"keyframes[{i}].image"


def file_ids(body: dict) -> set:
    """The file ids (or paths) a request body names."""
    return {holder[key] for holder, key, _ in media_slots(body) if isinstance(holder[key], str)}


def _a(kind: str) -> str:
    return f"an {kind}" if kind == "image" else f"a {kind}"


def public(meta: dict) -> dict:
    """What a client sees of a file: no owner, no path."""
    return {k: v for k, v in meta.items() if k != "owner"}
