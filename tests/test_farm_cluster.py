"""Farm faults that need whole processes or nodes: a runner killed with SIGKILL, a node lost without
grace on a multi-node `ray.cluster_utils.Cluster`, and the chaos script. The runner is the real
`longtake farm run` in a subprocess; frames are compared with the undisturbed in-process render."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from longtake.cluster import farm

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def job_request(model, **kw) -> dict:
    # long enough (steps x windows) for the test to act mid-job on a 2-core machine
    base = dict(prompt="a red ball moving right", seconds=4, fps=8, steps=8, window=8, overlap=2, model=model)
    return {**base, **kw}


_REFERENCES: dict[str, str] = {}  # the request's JSON -> its frames_sha256 (both runner tests render the same)


def reference_sha(request: dict, tmp_path: Path, render_in_process) -> str:
    key = json.dumps(request, sort_keys=True)
    if key not in _REFERENCES:
        _REFERENCES[key] = render_in_process({**request, "out": str(tmp_path / "reference.mp4")}).frames_sha256
    return _REFERENCES[key]


def start_runner(farm_dir: Path, *extra: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "longtake", "farm", "run", "--farm-dir", str(farm_dir), "--workers", "2",
           "--checkpoint-every", "2", "--min-free-mb", "0", "--exit-when-idle", "-q", *extra]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"runner exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (its Ray processes too): a crashed machine."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()  # reap the runner here, so its returncode is the signal
    psutil.wait_procs(tree[1:], timeout=30)


def test_runner_killed_with_sigkill_is_resumed_by_the_next_runner(tmp_path, tiny_model, render_in_process):
    farm_dir, log = tmp_path / "farm", tmp_path / "runner.log"
    request = job_request(tiny_model)
    (record, _), = farm.submit(farm_dir, [(request, 0, None)])
    store = farm.open_store(farm_dir)
    first = start_runner(farm_dir, log=log)
    try:
        ckpts = farm.job_dir(farm_dir, record.id) / "checkpoints"
        wait_for(lambda: len(list(ckpts.glob("step-*.safetensors"))) >= 2 and
                 (store.get(record.id).progress or {}).get("step", 0) >= 4, 300, "two checkpoints", first, log)
    finally:
        kill_tree(first)  # no chance to clean up or requeue
    assert first.returncode == -signal.SIGKILL
    killed_at = store.get(record.id).progress["step"]  # written at most every 0.5 s: it may lag a step behind
    newest = max(int(p.name[5:11]) for p in ckpts.glob("step-*.safetensors"))
    assert store.get(record.id).state == "running" and killed_at < request["steps"]
    second = start_runner(farm_dir, log=log)
    try:
        assert second.wait(300) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(second)
    done = store.get(record.id)
    assert done.state == "done", done.error
    assert done.result["frames_sha256"] == reference_sha(request, tmp_path, render_in_process)
    # resumed from the newest checkpoint, at most k=2 steps behind what the job last reported
    assert done.result["resumed_from_step"] == newest and killed_at - 2 <= newest
    job_log = (farm.job_dir(farm_dir, record.id) / "log.txt").read_text()
    assert "is gone; requeued" in job_log and "resumed from checkpoint step-" in job_log


def test_lost_node_job_completes_on_what_is_left(tmp_path, tiny_model, render_in_process):
    from ray.cluster_utils import Cluster

    farm_dir, log = tmp_path / "farm", tmp_path / "runner.log"
    request = job_request(tiny_model)
    (record, _), = farm.submit(farm_dir, [(request, 0, None)])
    store = farm.open_store(farm_dir)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # workers only on the two nodes
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    runner = start_runner(farm_dir, "--address", cluster.address, log=log)
    try:
        wait_for(lambda: (store.get(record.id).progress or {}).get("step", 0) >= 3, 300, "step 3", runner, log)
        cluster.remove_node(nodes[1], allow_graceful=False)  # mid-job, no grace
        assert runner.wait(300) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(runner)
        cluster.shutdown()
    done = store.get(record.id)
    assert done.state == "done", done.error
    assert done.result["frames_sha256"] == reference_sha(request, tmp_path, render_in_process)
    job_log = (farm.job_dir(farm_dir, record.id) / "log.txt").read_text()
    assert "died during window" in job_log and "retrying window" in job_log


def test_chaos_script_every_job_finishes_with_its_frames(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--jobs", "2", "--nodes", "3",
                           "--limit", "400", "--kill-every", "3", "--max-faults", "2", "--steps", "4",
                           "--farm-dir", str(tmp_path / "farm"), "--out", str(tmp_path / "chaos.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "chaos.json").read_text())
    assert summary["ok"] and len(summary["jobs"]) == 2
    assert all(j["state"] == "done" and j["same_frames"] for j in summary["jobs"])
    # the run was really disturbed (then left to finish): a worker killed and a node lost without grace (a run
    # with --max-faults has every kind of fault; without it, faults keep coming at random)
    kinds = [k for fault in summary["faults"] for k in fault if k != "t"]
    assert sorted(kinds) == ["killed_worker_pid", "replaced_node"], summary["faults"]
