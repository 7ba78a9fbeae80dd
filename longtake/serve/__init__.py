"""Serving: a Ray Serve application with an HTTP job API (see app.py) and its API token."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_or_create_token(data_dir: str | Path) -> tuple[str, bool]:
    """The API token: $LONGTAKE_API_TOKEN, else the one in DATA_DIR/api_token, else a new one written
    there readable by the owner only. Returns (token, created_now)."""
    if os.environ.get("LONGTAKE_API_TOKEN"):
        return os.environ["LONGTAKE_API_TOKEN"], False
    path = Path(data_dir) / "api_token"
    if path.is_file():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True
