"""Private directories and secret files: the serve data dir and the farm dir hold secrets (api_keys.json, link_key, api_token,
monitor_key, the provenance key) and every client's prompts, uploads and videos, so each must be this user's
alone. A directory another local user could create first (a fixed name under /tmp) or write into would let
that user plant a key file the server then trusts.

`private_dir(path, field)` creates a missing directory with mode 0700, and refuses an existing one that
another user owns or that its group or others can write (a RequestError naming the field, the path, what is
wrong and how to fix it). `secret_file(path, make)` reads a secret kept in a file, or makes one there
(owner-only; two processes making it at once agree on one): the API token, the link and monitor keys
(serve/__init__.py) and the provenance key (provenance.py). And where they are when none is given
(`home`, `default_data_dir`, `default_farm_dir`). Plain Python: no Ray, no torch.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable

from longtake.request import RequestError


def home() -> Path:
    """Where the CLI keeps its provenance key: $LONGTAKE_HOME, else ~/.local/share/longtake (the serve data
    dir and the farm dir default to folders of the latter)."""
    return Path(os.environ.get("LONGTAKE_HOME") or _share())


def default_data_dir() -> str:
    """The serve data dir when none is given (the CLI's --data-dir and `app_builder`'s data_dir): a per-user
    directory, never a fixed name under /tmp another user could create first."""
    return os.environ.get("LONGTAKE_DATA_DIR") or str(_share() / "serve")


def default_farm_dir() -> str:
    """The farm dir when none is given (the CLI's --farm-dir)."""
    return os.environ.get("LONGTAKE_FARM_DIR") or str(_share() / "farm")


def _share() -> Path:
    return Path.home() / ".local" / "share" / "longtake"


def private_dir(path: str | os.PathLike, field: str, create: bool = True) -> Path:
    """`path` as a directory only this user can write: created (mode 0700, parents as needed) when missing and
    `create`, else checked. A missing directory with create=False is returned unchecked (the caller says what
    is missing). RequestError naming `field` when it is not a directory, another user owns it, or its group or
    others can write to it."""
    path = Path(path).expanduser()
    if create:
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except OSError as e:
            raise RequestError(field, str(path), f"a directory this user can create ({e.strerror})") from None
    try:
        st = path.stat()
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise RequestError(field, str(path), "a directory (this is a file)")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise RequestError(field, str(path), f"a directory of your own: it belongs to uid {st.st_uid}, and this "
                                             f"process runs as uid {uid} (anyone who can write it can plant keys "
                                             "there); use a directory you own, mode 700")
    writers = [who for bit, who in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if st.st_mode & bit]
    if writers:
        raise RequestError(field, str(path), f"a directory only you can write: its mode is "
                                             f"{stat.S_IMODE(st.st_mode):04o} (writable by {' and '.join(writers)}); "
                                             f"fix it with: chmod 700 {path}")
    return path


def secret_file(path: Path, make: Callable[[], str], create: bool = True) -> tuple[str | None, bool]:
    """(the secret text in `path`, made now): read; or, when missing and `create`, `make()`'s text written
    there owner-only (0600) whole, then linked into place: the first of two processes making it at once wins
    and both read its text. (None, False) when it is missing and not `create`."""
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        if not create:
            return None, False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(make() + "\n")
        os.link(tmp, path)  # atomic, and never replaces a secret another process made
        made = True
    except FileExistsError:
        made = False
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip(), made
