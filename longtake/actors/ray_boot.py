"""The one place longtake starts, joins and stops Ray (the executors, `ray_pool.py` and `serve_pool.py`, and
`serve/` use it; nothing else imports Ray).

- `start_ray` / `stop_ray` / `cluster_resources`: a local Ray (or a cluster joined at an address), what it has.
- Importable anywhere: Ray puts the driver's working directory first on every worker's sys.path (and Serve's
  replicas'). Run from the directory above a clone, that holds a folder named `longtake` without
  __init__.py, which the workers would import as an empty namespace package instead of the installed one;
  while ray.init reads it, the working directory is the one that holds the installed package.
- Quiet start: while `ray.init` runs, Ray's log records below ERROR (the token-authentication notice,
  "Generated new authentication token", "Started a local Ray instance") go to longtake's log at DEBUG
  (`longtake.lib.<logger>`, as the CLI's quiet_libraries routes them), not to the user's stderr; errors still
  reach Ray's own handlers. A local Ray has token authentication on (Ray >= 2.59: pyproject.toml's floor).
- Fate sharing: Ray's GCS and raylet die with the process that started them (Ray sets PR_SET_PDEATHSIG), but
  the processes the raylet starts (ray::DashboardAgent, ray::RuntimeEnvAgent, the workers) notice only a
  minute or so later after a SIGKILL: they try to report the raylet's death to the dead GCS first. So every
  process of that Ray carries a mark in its environment (LONGTAKE_RAY_GUARD=<pid>-<token>, set while
  `ray.init` starts them; the raylet passes it to the workers it starts), and a watchdog process holds the
  read end of a pipe from the starter and notes, every second, the marked children of the starter and all
  their descendants (the agents). When the starter exits or dies, even by SIGKILL, the pipe reaches end of
  file and the watchdog SIGKILLs every process of this user that carries the mark and every process it noted
  that is still the same process (pid and start time, from /proc; Linux only, elsewhere there is no
  watchdog). A stopped runner thus leaves no half-dead Ray for the next one.

This file is also the watchdog's program (`python -I ray_boot.py MARK`, its stdin the pipe): its top level
uses the standard library only (Ray is imported inside the functions that need it), so the watchdog starts at
once and imports nothing of longtake, torch or Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ENV = "LONGTAKE_RAY_GUARD"
_watchdog: dict = {}  # this process's watchdog: {"proc": Popen, "mark": str}


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start a local Ray (or join `address`, else $RAY_ADDRESS) unless one is up. Returns True if this call
    started it (and its caller stops it: `stop_ray`). Quiet, importable from any directory, dying with this
    process (module docstring)."""
    import ray

    if ray.is_initialized():
        return False
    on_term = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS") or None
    with quiet_start(), _installed_first():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a new local Ray: never one a `ray start` elsewhere on this machine left its address for
            with marked(watch()):
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                         log_to_driver=False, logging_level=logging.WARNING)
    # ray.init installs its own SIGTERM handler (log and exit); keep the caller's, so a CLI that turns
    # SIGTERM into a clean stop still cleans up
    if on_term not in (None, signal.SIG_DFL) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    return True


def stop_ray() -> None:
    """Stop the Ray this process started or joined (nothing when none is up)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def cluster_resources() -> dict[str, float]:
    """What the Ray this process is connected to has in all: {"CPU": ..., "GPU": ..., ...}."""
    import ray

    return ray.cluster_resources()


@contextlib.contextmanager
def _installed_first():
    """The working directory, while ray.init reads it, is the one holding the installed longtake (module
    docstring)."""
    here = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[2])  # the directory holding longtake/
    try:
        yield
    finally:
        os.chdir(here)


def watch() -> str | None:
    """Start this process's watchdog once (Linux); returns the mark its Ray processes must carry, or None
    where there is no /proc to find them in."""
    if not os.path.isdir("/proc/self"):
        return None
    proc = _watchdog.get("proc")
    if proc is not None and proc.poll() is None:
        return _watchdog["mark"]
    mark = f"{os.getpid()}-{secrets.token_hex(8)}"
    # its own session: a terminal's Ctrl-C reaches the starter (which stops Ray itself), not the watchdog; the
    # pipe's write end stays here, not inheritable, so only this process's end closes it
    proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), mark], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _watchdog.update(proc=proc, mark=mark)
    return mark


@contextlib.contextmanager
def marked(mark: str | None):
    """The environment mark set while Ray starts its processes (they inherit it), then this process's
    environment as it was."""
    if mark is None:
        yield
        return
    before = os.environ.get(ENV)
    os.environ[ENV] = mark
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


class _Route(logging.Handler):
    """Ray's records: below ERROR to longtake's log at DEBUG, ERROR and above to Ray's own handlers."""

    def __init__(self, handlers: list[logging.Handler]):
        super().__init__()
        self.saved = handlers or [logging.lastResort]

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            for handler in self.saved:
                if handler is not None and record.levelno >= handler.level:
                    handler.handle(record)
            return
        target = logging.getLogger(f"longtake.lib.{record.name}")
        if target.isEnabledFor(logging.DEBUG):
            target.handle(logging.makeLogRecord({**record.__dict__, "name": target.name, "levelno": logging.DEBUG,
                                                 "levelname": "DEBUG"}))


@contextlib.contextmanager
def quiet_start():
    """Ray's start-up chatter to longtake's debug log while the block runs (module docstring)."""
    ray_logger = logging.getLogger("ray")
    handlers, propagate = list(ray_logger.handlers), ray_logger.propagate
    route = _Route(handlers)
    for handler in handlers:
        ray_logger.removeHandler(handler)
    ray_logger.addHandler(route)
    ray_logger.propagate = False
    try:
        yield
    finally:
        ray_logger.removeHandler(route)
        for handler in handlers:
            if handler not in ray_logger.handlers:
                ray_logger.addHandler(handler)
        ray_logger.propagate = propagate


# ---------------------------------------------------------------- the watchdog process

def _has_mark(pid: int, mark: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{ENV}={mark}".encode() in f.read().split(b"\0")
    except OSError:  # gone, a zombie, or another user's
        return False


def marked_pids(mark: str) -> list[int]:
    """This user's processes (not this one) whose environment carries the mark."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != os.getpid() and _has_mark(int(n), mark)]


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks since boot), from /proc/PID/stat."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state ppid ... starttime
            table[int(name)] = (int(fields[1]), int(fields[19]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def ray_tree(starter: int, mark: str) -> dict[int, int]:
    """pid -> start time of the starter's marked children (GCS, raylet, ...) and all their descendants (the
    raylet's agents, which do not always keep the mark: setproctitle may overwrite their environment)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    stack = [c for c in children.get(starter, []) if _has_mark(c, mark)]
    found = {}
    while stack:
        pid = stack.pop()
        found[pid] = table[pid][1]
        stack += children.get(pid, [])
    return found


def main(mark: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    starter, known = os.getppid(), {}
    while True:  # until end of file: the starter has exited or died
        ready, _, _ = select.select([0], [], [], 1.0)
        if ready and not os.read(0, 65536):
            break
        known.update(ray_tree(starter, mark))
    deadline = time.monotonic() + 10  # what a dying raylet still starts is caught by the next rounds
    while time.monotonic() < deadline:
        table = _processes()
        pids = set(marked_pids(mark)) | {p for p, start in known.items() if table.get(p, (0, None))[1] == start}
        pids.discard(os.getpid())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


if __name__ == "__main__":
    main(sys.argv[1])


@contextlib.contextmanager
def local_cluster(nodes: int, cpus_per_node: int, store_mb: int, head_store_mb: int):
    """A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head without CPUs, where
    drivers run, and `nodes` nodes of `cpus_per_node` logical CPUs, each with its own object store of
    `store_mb`), for `bench --simulate`: transfers between nodes go through Ray's object manager as they would
    between machines. Yields the cluster; its `address` is what a driver joins (`start_ray(address)`)."""
    from ray.cluster_utils import Cluster

    with quiet_start():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": head_store_mb * 2**20, "include_dashboard": False})
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node, object_store_memory=store_mb * 2**20)
        cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def object_store_used(cluster) -> int | None:
    """Bytes in the object stores of a `local_cluster`'s nodes now (None when a node does not answer)."""
    from ray._private.internal_api import node_stats

    try:
        return sum(node_stats(node.node_ip_address, node.node_manager_port, include_memory_info=False)
                   .store_stats.object_store_bytes_used for node in cluster.list_all_nodes())
    except Exception:  # a node shutting down, a timeout: a missed sample
        return None
