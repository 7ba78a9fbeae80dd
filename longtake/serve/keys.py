"""API keys: one per client, stored hashed in DATA_DIR/api_keys.json (never in plain text).

    longtake keys add NAME [--admin] [--max-jobs N]    prints the new key once
    longtake keys list                                  names, admin, limits, when created (no key, no hash)
    longtake keys revoke NAME

A key is `lt_` + 32 random bytes (URL-safe base64): its SHA-256 is what is stored, so a lookup is one hash
and a dict lookup (a key this long needs no salt or slow hash: it cannot be guessed). The file is written
owner-only by rename, so every ingress replica (sharing the data dir) sees a whole file; they re-read it
when its modification time changes, so a key added or revoked takes effect without a restart.

The single API token of earlier versions (`api_token`, or $LONGTAKE_API_TOKEN) keeps working as an admin
key named `admin`. A job, its files and its uploads belong to the client (the key's name) that created them;
an admin key sees every client's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from longtake.request import RequestError

FILE = "api_keys.json"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
LEGACY = "admin"  # the client name of the single token of earlier versions
DEFAULT_MAX_JOBS = 4  # a client's jobs queued, running or paused at once (429 past it)


@dataclass(frozen=True)
class Client:
    """Who a key belongs to."""

    name: str
    admin: bool = False
    max_jobs: int = DEFAULT_MAX_JOBS
    created: float = 0.0


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, data_dir: str | Path, legacy_token: str | None = None):
        self.path = Path(data_dir) / FILE
        self.legacy = digest(legacy_token) if legacy_token else None
        self._lock = threading.Lock()
        self._seen: tuple | None = None  # (inode, mtime, size) of the file last read
        self._by_hash: dict[str, Client] = {}

    # -- reading --------------------------------------------------------------------------------
    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"keys": []}

    def _fresh(self) -> dict[str, Client]:
        try:
            st = self.path.stat()
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)  # every save is a new file (a rename): a new inode
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._seen:
                entries = self._load()["keys"]
                self._by_hash = {e["sha256"]: Client(e["name"], e["admin"], e["max_jobs"], e["created"])
                                 for e in entries}
                self._seen = seen
            return self._by_hash

    def lookup(self, key: str) -> Client | None:
        """The client a key belongs to, or None."""
        h = digest(key)
        if self.legacy is not None and secrets.compare_digest(h, self.legacy):
            return Client(LEGACY, admin=True, max_jobs=1_000_000)
        return self._fresh().get(h)

    def list(self) -> list[Client]:
        return sorted(self._fresh().values(), key=lambda c: c.name)

    # -- writing (the CLI) ------------------------------------------------------------------------
    def _save(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": entries}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, name: str, admin: bool = False, max_jobs: int = DEFAULT_MAX_JOBS) -> str:
        """A new key for client `name` (printed once; only its hash is kept). Raises RequestError for a bad or
        taken name."""
        if not isinstance(name, str) or not NAME.match(name):
            raise RequestError("name", name, "1 to 63 characters: lower-case letters, digits, '_', '.', '-', starting "
                                          "with a letter or digit")
        if name == LEGACY:
            raise RequestError("name", name, f"another name ({LEGACY!r} is the single token of earlier versions)")
        if not isinstance(max_jobs, int) or not 1 <= max_jobs <= 10_000:
            raise RequestError("max_jobs", max_jobs, "an integer from 1 to 10000")
        entries = self._load()["keys"]
        if any(e["name"] == name for e in entries):
            raise RequestError("name", name, "a name no key has yet (revoke it first to issue a new key)")
        key = "lt_" + secrets.token_urlsafe(32)
        entries.append(asdict(Client(name, admin, max_jobs, time.time())) | {"sha256": digest(key)})
        self._save(entries)
        return key

    def revoke(self, name: str) -> None:
        entries = self._load()["keys"]
        kept = [e for e in entries if e["name"] != name]
        if len(kept) == len(entries):
            raise RequestError("name", name, "the name of a key (see `longtake keys list`)")
        self._save(kept)
