"""The local Ray that longtake starts (actors/ray_boot.py): token authentication on,
a quiet start (Ray's notices in longtake's debug log, not on stderr), and no process of it left alive a few
seconds after the process that started it is killed with SIGKILL. One Ray is started, in a subprocess with
a fresh home (so Ray generates a new token, as on a first run)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)

ROOT = Path(__file__).resolve().parent.parent

STARTER = textwrap.dedent("""
    import json, logging, os, time
    routed = []
    class Keep(logging.Handler):
        def emit(self, record):
            routed.append(record.getMessage())
    logging.getLogger("longtake.lib").addHandler(Keep())
    logging.getLogger("longtake.lib").setLevel(logging.DEBUG)
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    from longtake.actors.ray_boot import start_ray
    assert start_ray(num_cpus=1)
    print(json.dumps({"pid": os.getpid(), "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN,
                      "routed": routed}), flush=True)
    time.sleep(600)
""")


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A process that started a local Ray: (its Popen, what it printed, its stderr so far, its process tree)."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    err = home / "stderr.txt"
    proc = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, stderr=open(err, "wb"),
                            env=env, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, f"the starter exited: {err.read_text()[-3000:]}"
        info = json.loads(line)
        tree = psutil.Process(proc.pid).children(recursive=True)
        yield proc, info, err, tree
    finally:
        if proc.poll() is None:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        proc.wait()


def test_pyproject_needs_a_ray_that_turns_token_auth_on():
    """A local `ray.init` listens on every interface: safe only with token authentication, on by default for
    local clusters from Ray 2.59 (docs.ray.io: "Ray 2.59 enables token authentication by default for local
    clusters")."""
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"ray\[serve\]>=([\d.]+)"', text)[1]
    assert tuple(int(x) for x in floor.split(".")) >= (2, 59)


def test_a_local_ray_has_token_auth_on(local_ray):
    _, info, _, tree = local_ray
    assert info["token_auth"]
    gcs = [p for p in tree if p.name() == "gcs_server"]
    assert gcs and all(p.environ().get("RAY_AUTH_MODE") == "token" for p in gcs)  # the server enforces it


def test_a_local_ray_starts_quietly(local_ray):
    _, info, err, _ = local_ray
    stderr = err.read_text()
    assert "Token authentication" not in stderr and "authentication token" not in stderr, stderr
    assert any("Token authentication is enabled" in m for m in info["routed"])  # in longtake's debug log


def test_ray_errors_still_reach_rays_handler():
    from longtake.actors.ray_boot import quiet_start

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.seen = []

        def emit(self, record):
            self.seen.append((record.levelname, record.getMessage()))

    ray_logger, ours, debug = logging.getLogger("ray"), Keep(), Keep()
    # only this test's handler on Ray's logger: an in-process CLI test earlier in this worker may have routed
    # it to longtake's debug log (cli.output.quiet_libraries), which would see the error and the later line too
    before = list(ray_logger.handlers)
    for handler in before:
        ray_logger.removeHandler(handler)
    ray_logger.addHandler(ours)
    logging.getLogger("longtake.lib").addHandler(debug)
    old = logging.getLogger("longtake.lib").level
    logging.getLogger("longtake.lib").setLevel(logging.DEBUG)
    try:
        with quiet_start():
            logging.getLogger("ray._private.worker").warning("a notice")
            logging.getLogger("ray._private.worker").error("a real error")
        logging.getLogger("ray._private.worker").warning("after the start")
    finally:
        ray_logger.removeHandler(ours)
        for handler in before:
            ray_logger.addHandler(handler)
        logging.getLogger("longtake.lib").removeHandler(debug)
        logging.getLogger("longtake.lib").setLevel(old)
    assert ours.seen == [("ERROR", "a real error"), ("WARNING", "after the start")]
    assert debug.seen == [("DEBUG", "a notice")]


def test_a_killed_starter_leaves_no_ray_process(local_ray):
    """kill -9 of a runner: its GCS and raylet die with it (Ray's PR_SET_PDEATHSIG), and the watchdog kills
    what the raylet started (ray::DashboardAgent, ray::RuntimeEnvAgent, workers), which on their own linger a
    minute or more."""
    proc, _, _, tree = local_ray
    names = {p.name() for p in tree}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
    time.sleep(2)  # the watchdog notes the Ray processes every second
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    while _alive(tree) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert not _alive(tree), f"alive {time.monotonic() - t0:.0f} s after the kill: {_alive(tree)}"


def test_workers_import_the_installed_package_from_any_directory(tmp_path):
    """Ray puts the driver's working directory first on its workers' sys.path: started from the directory
    above a clone (a folder named longtake without __init__.py), the workers still import the installed
    longtake, not an empty namespace package (serve's replicas then failed every job at its last step)."""
    (tmp_path / "longtake" / "tests").mkdir(parents=True)
    script = textwrap.dedent("""
        import ray
        from longtake.actors.ray_boot import start_ray
        start_ray(num_cpus=1)
        @ray.remote
        def where():
            import longtake
            return getattr(longtake, "__file__", None), hasattr(longtake, "__version__")
        print(ray.get(where.remote()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == repr((str(ROOT / "longtake" / "__init__.py"), True)), proc.stdout
