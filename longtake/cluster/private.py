"""Private directories: the serve data dir and the farm dir hold secrets (api_keys.json, link_key, api_token,
monitor_key, the provenance key) and every client's prompts, uploads and videos, so each must be this user's
alone. A directory another local user could create first (a fixed name under /tmp) or write into would let
that user plant a key file the server then trusts.

`private_dir(path, field)` creates a missing directory with mode 0700, and refuses an existing one that
another user owns or that its group or others can write (a RequestError naming the field, the path, what is
wrong and how to fix it). Plain Python: no Ray, no torch.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from longtake.request import RequestError


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
