"""Serving: a Ray Serve application with an HTTP job API (see app.py), its API keys (keys.py) and the
secrets kept in the data dir: the admin token of earlier versions and the key that signs file links.

The data dir (`default_data_dir()`: $LONGTAKE_DATA_DIR, else ~/.local/share/longtake/serve) is private:
created 0700, and refused when another user owns it or its group or others can write it
(cluster/private.py), so no one else can plant the key files read here."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def default_data_dir() -> str:
    """The serve data dir when none is given (the CLI's --data-dir and `app_builder`'s data_dir): a per-user
    directory, never a fixed name under /tmp another user could create first."""
    return os.environ.get("LONGTAKE_DATA_DIR") or str(Path.home() / ".local" / "share" / "longtake" / "serve")


def load_or_create_token(data_dir: str | Path) -> tuple[str, bool]:
    """The API token: $LONGTAKE_API_TOKEN, else the one in DATA_DIR/api_token, else a new one written
    there readable by the owner only. Returns (token, created_now).

    Two processes starting at once agree on one token: the new token is written in full to a private
    temporary file, then linked to api_token, which fails if the name exists (then that one is read)."""
    if os.environ.get("LONGTAKE_API_TOKEN"):
        return os.environ["LONGTAKE_API_TOKEN"], False
    return load_or_create_secret(Path(data_dir) / "api_token")


def load_or_create_secret(path: Path, field: str = "data_dir") -> tuple[str, bool]:
    """A random secret kept in `path` (owner-only; created if missing, one winner when racing). Its directory
    must be private (cluster/private.py: a RequestError naming `field` otherwise), so that no other user can
    have put a secret of their own there."""
    from longtake.cluster.private import private_dir

    private_dir(path.parent, field)
    if not path.is_file():
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
