"""What reaches the terminal: stdout kept for a command's result (`reserved_stdout`), library logs and warnings
routed to longtake's debug log (`setup_logging`, `quiet_libraries`), Ctrl-C / SIGTERM (`stop_on_signals`),
progress bars, strict JSON, and a stdout whose reader has gone (`stdout_gone`, for main)."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import os
import select
import signal
import sys


class _StdoutToLog(io.TextIOBase):
    """sys.stdout while a command runs: what Python code prints there (Ray's driver prints the raylet's
    messages, e.g. "A worker died or was killed while executing a task...", and Serve's shut-down notices)
    goes line by line to longtake's log at DEBUG (`longtake.lib.stdout`), like the libraries' log records."""

    encoding, errors = "utf-8", "strict"

    def __init__(self):
        super().__init__()
        self._partial = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1  # (pointed at stderr meanwhile)

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        log = logging.getLogger("longtake.lib.stdout")
        for line in lines:
            if line.strip() and log.isEnabledFor(logging.DEBUG):
                log.debug("%s", line)
        return len(text)


@contextlib.contextmanager
def reserved_stdout():
    """Keep stdout for the command's own result. Until the block ends, file descriptor 1 (where C libraries
    and child processes write) points at stderr, and sys.stdout (where Ray's driver prints the raylet's
    messages, such as "A worker died...") at stderr too, or, unless --log-level DEBUG, at longtake's debug
    log; the yielded `emit(text)` writes a line to the real stdout. Every command that prints JSON runs
    inside it, so `longtake ... --json | jq` parses whatever a library printed on the way:

        with reserved_stdout() as emit:
            ...
            emit(json.dumps(result))
    """
    sys.stdout.flush()
    real = sys.stdout
    try:
        to_fd = real.fileno() == 1  # the process's stdout (not a capture such as pytest's or a StringIO)
    except (AttributeError, OSError, ValueError):
        to_fd = False
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = _StdoutToLog() if _routing["on"] else sys.stderr
    out = os.fdopen(os.dup(saved), "w") if to_fd else real

    def emit(text: str) -> None:
        sys.stderr.flush()
        out.write(text + "\n")
        out.flush()

    try:
        yield emit
    finally:
        sys.stdout = real
        try:
            if to_fd:
                out.close()  # (BrokenPipeError when stdout's reader has gone: main handles it)
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def strict_json(value):
    """`value` with NaN and infinities as null: what a JSON parser other than Python's accepts (an eval
    summary has NaN for a motion no clip had)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals(handler=_raise_interrupt) -> None:
    """SIGINT and SIGTERM stop a long-running command. Installed explicitly: a command started in the
    background by a script (`longtake render ... &`) inherits SIGINT as ignored, and Ctrl-C must still work."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def close_progress_bars() -> None:
    """Finish any progress bar left open by an interrupted phase, so that a message starts on a fresh line
    and no bar is redrawn after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def interrupted(command: str, what: str) -> int:
    """A long-running command stopped by a signal: the message on a line of its own, exit status 130."""
    close_progress_bars()
    print(f"longtake {command}: interrupted; {what}", file=sys.stderr)
    return 130


@contextlib.contextmanager
def log_above_progress_bars():
    """Log lines (a worker replaced, a retry) printed above the progress bars rather than inside them."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


# library loggers whose records go to longtake's log at DEBUG (`longtake.lib.NAME`), shown only with
# --log-level DEBUG: a user sees longtake's own lines
LIBRARY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.tune", "ray.train", "diffusers", "transformers",
                   "huggingface_hub", "torch", "filelock", "urllib3", "httpx", "uvicorn", "uvicorn.error",
                   "uvicorn.access", "fastapi", "py.warnings")
_routing = {"on": False}


class _LibraryToDebug(logging.Handler):
    """A library's record, re-emitted at DEBUG on longtake's logger `longtake.lib.NAME`."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(f"longtake.lib.{record.name}")
        if target.isEnabledFor(logging.DEBUG):
            target.handle(logging.makeLogRecord({**record.__dict__, "name": target.name, "levelno": logging.DEBUG,
                                                 "levelname": "DEBUG"}))


_TO_DEBUG = _LibraryToDebug()


def setup_logging(level: str) -> None:
    """longtake's log on stderr at `level`. Unless that is DEBUG, the long-running commands send library
    chatter (Ray's token-authentication warning, Serve's start-up lines, diffusers' and transformers' warnings
    and loading bars, Python warnings) to longtake's log at DEBUG: see `quiet_libraries`."""
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the console keeps its level while a farm job logs INFO to its file
        handler.setLevel(level.upper())
    _routing["on"] = logging.getLogger("longtake").getEffectiveLevel() > logging.DEBUG


def quiet_libraries(*modules: str) -> None:
    """Import `modules` (a library configures its loggers when imported), then route every library logger
    and Python's warnings to longtake's debug log and turn off the libraries' progress bars (unless
    --log-level DEBUG). A command calls it once its input is checked (importing Ray or diffusers earlier
    would slow down a bad-input exit) and before it starts Ray."""
    if not _routing["on"]:
        return
    logging.captureWarnings(True)  # to the py.warnings logger, routed below
    # read when huggingface_hub is imported (transformers' loading bars), here and in the Ray workers, which
    # inherit this environment when this process starts Ray
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for module in modules:
        importlib.import_module(module)
    if "diffusers" in sys.modules:
        importlib.import_module("diffusers.utils.logging").disable_progress_bar()  # "Loading pipeline components"
    if "transformers" in sys.modules:
        importlib.import_module("transformers.utils.logging").disable_progress_bar()  # "Loading weights"
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if handler is not _TO_DEBUG:
                lib.removeHandler(handler)
        if _TO_DEBUG not in lib.handlers:
            lib.addHandler(_TO_DEBUG)
        lib.propagate = False


def stdout_gone() -> bool:
    """Whether the process's stdout is a pipe whose reader has gone (`longtake verify x.mp4 | head`): poll
    reports POLLERR on such a pipe's write end."""
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(1, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))
