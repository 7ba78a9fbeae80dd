"""Serving: a Ray Serve application with an HTTP job API (see app.py), its API keys (keys.py) and the
secrets kept in the data dir: the admin token of earlier versions and the key that signs file links."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_or_create_token(data_dir: str | Path) -> tuple[str, bool]:
    """The API token: $LONGTAKE_API_TOKEN, else the one in DATA_DIR/api_token, else a new one written
    there readable by the owner only. Returns (token, created_now).

    Two processes starting at once agree on one token: the new token is written in full to a private
    temporary file, then linked to api_token, which fails if the name exists (then that one is read)."""
    if os.environ.get("LONGTAKE_API_TOKEN"):
        return os.environ["LONGTAKE_API_TOKEN"], False
    return load_or_create_secret(Path(data_dir) / "api_token")


def load_or_create_secret(path: Path) -> tuple[str, bool]:
    """A random secret kept in `path` (owner-only; created if missing, one winner when racing)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            os.link(tmp, path)  # atomic, and never replaces a token another process made
            return token, True
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    token = path.read_text().strip()
    if not token:
        raise RuntimeError(f"{path} is empty: delete it" + (", or set $LONGTAKE_API_TOKEN" if path.name == "api_token"
                                                             else ""))
    return token, False
