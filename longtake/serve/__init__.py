"""Serving: the HTTP job API as a Ray Serve application, and what it keeps in its data dir.

It owns the deployments and how they are composed and started (deployments.py: Denoiser, Manager,
`build_app`, `app_builder` for `serve deploy` / KubeRay), the FastAPI ingress and its routes (routes.py),
streamed uploads (uploads.py) and the uploaded files (files.py), the job manager the Manager deployment runs
(manager.py), the HTTP contract (schema.py), the server's limits (limits.py), API keys (keys.py), event
streams (events.py), the web pages (pages.py, web/), the farm's web monitor (farm_monitor.py), and here the
secrets kept in the data dir: the admin token of earlier versions and the key that signs file links.

It may import Ray Serve (deployments.py and routes.py only), FastAPI, and the public functions of the rest
of the runtime: the request, the cluster (engine, job store, checkpoints, retention), the pure core, media
probing, provenance, and the actors (the ServePool executor its job manager renders on lives in
actors/serve_pool.py); model families only through `inspect_model`. Of the rest of longtake, only the CLI
and the developer tools import it.

The data dir (`private.default_data_dir()`: $LONGTAKE_DATA_DIR, else ~/.local/share/longtake/serve) is private:
created 0700, and refused when another user owns it or its group or others can write it
(longtake/private.py), so no one else can plant the key files read here."""

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


def load_or_create_secret(path: Path, field: str = "data_dir") -> tuple[str, bool]:
    """A random secret kept in `path` (owner-only; created if missing, one winner when racing: private.py's
    `secret_file`). Its directory must be private (a RequestError naming `field` otherwise), so that no other
    user can have put a secret of their own there."""
    from longtake.private import private_dir, secret_file

    private_dir(path.parent, field)
    token, created = secret_file(path, lambda: secrets.token_urlsafe(32))
    if not token:
        raise RuntimeError(f"{path} is empty: delete it" + (", or set $LONGTAKE_API_TOKEN" if path.name == "api_token"
                                                             else ""))
    return token, created
