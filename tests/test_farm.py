"""The studio farm: checkpoints, the queue commands, and the faults a job must survive with the frames of
an undisturbed run (issue: studio batch farm). Runner-process and multi-node cases are in
test_farm_cluster.py."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from ray import cloudpickle

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import Worker, WorkerSpec
from longtake.cli import main
from longtake.cluster import farm
from longtake.cluster.checkpoint import Checkpointer, CheckpointError
from longtake.cluster.engine import Cancelled, prepare, run
from longtake.cluster.checkpoint import fingerprint
from longtake.video import ffmpeg_exe

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module

STEPS = 8


def job_request(model, **kw) -> dict:
    base = dict(prompt="a red ball moving right", seconds=4, fps=8, steps=STEPS, window=8, overlap=2, model=model)
    return {**base, **kw}


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """frames_sha256 of the undisturbed in-process render of each request used here."""
    pool = InProcessPool(WorkerSpec(tiny_model))
    cache = {}

    def sha(**kw) -> str:
        key = json.dumps(kw, sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("ref") / "ref.mp4"
            cache[key] = run(prepare(job_request(tiny_model, out=str(out), **kw)), pool, progress=False).frames_sha256
        return cache[key]

    yield sha
    pool.shutdown()


_STARTED: list = []  # (runner, thread) started by `_running` in the current test


@pytest.fixture(autouse=True)
def _stop_runners():
    """A test that fails mid-job still stops its runner thread, so that its Ray workers do not hold this
    process's CPUs for the tests after it."""
    yield
    while _STARTED:
        runner, thread = _STARTED.pop()
        runner.stop.set()
        thread.join(60)


def wait_for(cond, timeout: float, what: str, every: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class SlowWorker(Worker):
    """Predicts normally, slowly enough for a test to act mid-job."""

    def predict(self, *args):
        time.sleep(0.15)
        return super().predict(*args)


class OneBadWorker(SlowWorker):
    """The first actor of the pool to start fails every prediction; the others are fine."""

    marker = ""  # a file path, set per test: the actor that creates it is the bad one

    def __init__(self, spec):
        super().__init__(spec)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            self.bad = True
        except FileExistsError:
            self.bad = False

    def predict(self, z, t, cond, start, end, guidance):
        if self.bad:
            raise RuntimeError(f"injected fault on this worker (window at {start})")
        return super().predict(z, t, cond, start, end, guidance)


class StallingDecodeWorker(Worker):
    """Decodes its first chunk, then waits on every later one until the file `release` exists (at most a
    minute): a job is mid-decode when the test cancels it, however fast this machine decodes."""

    release = ""  # a file path, set per test

    def decode(self, z):
        self.decoded = getattr(self, "decoded", 0) + 1
        deadline = time.monotonic() + 60
        while self.decoded > 1 and not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.02)
        return super().decode(z)


class BrokenWindowWorker(Worker):
    def predict(self, z, t, cond, start, end, guidance):
        if start == 6:
            raise RuntimeError("injected fault in window 6")
        return super().predict(z, t, cond, start, end, guidance)


# ------------------------------------------------------------------ checkpoints (no Ray)

# (the scheduler-state round trip of every scheduler is in test_engine.py)

def test_corrupt_and_truncated_checkpoints_are_detected_and_skipped(tmp_path, caplog):
    from diffusers import DDIMScheduler

    s = DDIMScheduler()
    s.set_timesteps(10)
    ckpt = Checkpointer(tmp_path, every=1, fingerprint="f", keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, torch.full((1, 4, 3, 2, 2), float(step)), s)
    assert [p.name for p in ckpt.paths()] == ["step-000003.safetensors", "step-000002.safetensors",
                                             "step-000001.safetensors"]
    newest, middle, oldest = ckpt.paths()
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the latents
    newest.write_bytes(bytes(data))
    middle.write_bytes(middle.read_bytes()[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.read(newest)
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.read(middle)
    with caplog.at_level(logging.WARNING):
        state = ckpt.load_latest()
    assert state.step == 1 and torch.equal(state.z, torch.full((1, 4, 3, 2, 2), 1.0))
    assert "checkpoint step-000003.safetensors is corrupt: checksum mismatch; falling back to step-000002" in caplog.text
    assert "step-000002.safetensors is corrupt: unreadable" in caplog.text
    oldest.write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING):
        assert ckpt.load_latest() is None
    assert "falling back to step 0 (no valid checkpoint left)" in caplog.text
    # a checkpoint of another request is never used
    assert Checkpointer(tmp_path, every=1, fingerprint="other").load_latest() is None


def test_checkpoint_writes_are_atomic_and_keep_the_newest(tmp_path):
    from diffusers import DDIMScheduler

    s = DDIMScheduler()
    s.set_timesteps(10)
    ckpt = Checkpointer(tmp_path / "c", every=2, fingerprint="f", keep=2)
    for step in range(1, 6):
        ckpt.save(step, torch.zeros(1, 4, 2, 2, 2), s)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["step-000004.safetensors", "step-000005.safetensors"]
    assert [ckpt.due(k, 7) for k in range(1, 8)] == [False, True, False, True, False, True, True]


def test_resume_from_checkpoint_gives_identical_frames(tmp_path, tiny_model, reference, caplog):
    """Stopped at step 3 (as a pause does), resumed: same frames; a corrupt newest checkpoint falls back."""
    pool = InProcessPool(WorkerSpec(tiny_model))
    try:
        job = prepare(job_request(tiny_model, out=str(tmp_path / "a.mp4")))
        ckpt = Checkpointer(tmp_path / "ckpt", every=2, fingerprint=fingerprint(job, "float32", "cpu"))
        state = {"n": 0}

        def stop_at_step_4(p=None):
            return "paused" if state["n"] >= 3 * 5 + 1 else None  # 5 windows per step

        def count(p):
            state["n"] = p["window_steps_done"]

        with pytest.raises(Cancelled) as info:
            run(job, pool, progress=False, on_progress=count, cancelled=stop_at_step_4, checkpoint=ckpt)
        assert info.value.reason == "paused" and info.value.step == 3
        assert [p.name for p in ckpt.paths()] == ["step-000003.safetensors", "step-000002.safetensors"]
        assert not (tmp_path / "a.mp4").exists()
        resumed = run(job, pool, progress=False, checkpoint=ckpt)
        assert resumed.resumed_from_step == 3
        assert resumed.frames_sha256 == reference()
        # the newest checkpoint (after the last step) corrupt: falls back to the previous one, same frames
        assert [p.name for p in ckpt.paths()] == ["step-000008.safetensors", "step-000006.safetensors"]
        newest = ckpt.paths()[0]
        newest.write_bytes(newest.read_bytes()[:50])
        with caplog.at_level(logging.WARNING):
            again = run(job, pool, progress=False, checkpoint=ckpt)
        assert "step-000008.safetensors is corrupt: unreadable" in caplog.text
        assert again.resumed_from_step == 6 and again.frames_sha256 == reference()
    finally:
        pool.shutdown()


# ------------------------------------------------------------------ submit, status and the commands (no Ray)

def test_submit_validates_everything_first_and_is_idempotent(tmp_path, tiny_model, capsys):
    farm_dir = tmp_path / "farm"
    spec = tmp_path / "shots.yaml"
    spec.write_text(json.dumps({"jobs": [job_request(tiny_model, priority=5, token="shot-1"),
                                         job_request(tiny_model, seconds=-1)]}))
    assert main(["submit", str(spec), "--farm-dir", str(farm_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: job 2: seconds: got -1.0, expected a number > 0" in err and "nothing was submitted" in err
    assert farm.open_store(farm_dir).count() == 0

    spec.write_text(json.dumps([job_request(tiny_model, priority=5, token="shot-1"), job_request(tiny_model)]))
    assert main(["submit", str(spec), "--farm-dir", str(farm_dir)]) == 0
    first = capsys.readouterr().out.split()
    assert len(first) == 2
    assert main(["submit", str(spec), "--farm-dir", str(farm_dir)]) == 0  # same token: same job, not a new one
    second = capsys.readouterr().out.split()
    assert second[0] == first[0] and second[1] != first[1]
    store = farm.open_store(farm_dir)
    assert store.count() == 3 and store.get(first[0]).priority == 5
    assert json.loads((farm.job_dir(farm_dir, first[0]) / "request.json").read_text())["seconds"] == 4
    assert main(["status", "--farm-dir", str(farm_dir), "--json"]) == 0
    assert {r["id"] for r in json.loads(capsys.readouterr().out)} == set(first + second)


@pytest.mark.parametrize("spec, field", [
    ({"prompt": "x", "priority": "high"}, "job 1: priority: got 'high'"),
    ({"prompt": "x", "token": ""}, "job 1: token: got ''"),
    ({"prompt": "x", "colour": "red"}, "job 1: colour: got 'red', expected no such field"),
    ([], "spec: got"),
])
def test_submit_rejects_bad_specs(tmp_path, spec, field, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    assert main(["submit", str(path), "--farm-dir", str(tmp_path / "farm")]) == 2
    assert field in capsys.readouterr().err


def test_submit_refuses_an_output_path_another_job_writes(tmp_path, tiny_model, capsys, monkeypatch):
    """Retention deletes a job's `out`: two live jobs must never share one (item: another job's video)."""
    monkeypatch.chdir(tmp_path)
    farm_dir, clip = tmp_path / "farm", tmp_path / "clip.mp4"
    args = ["--farm-dir", str(farm_dir)]
    spec = tmp_path / "a.yaml"
    spec.write_text(json.dumps(job_request(tiny_model, out="clip.mp4", token="shot-a")))  # relative to the cwd
    assert main(["submit", str(spec), *args]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["submit", str(spec), *args]) == 0  # the same token and request: that job again, no clash
    assert capsys.readouterr().out.strip() == first

    other = tmp_path / "b.json"
    other.write_text(json.dumps(job_request(tiny_model, seed=1, out=str(clip))))
    assert main(["submit", str(other), *args]) == 2
    err = capsys.readouterr().err
    assert f"out: got '{clip}', expected a path no other job writes (job {first} does" in err
    assert "nothing was submitted" in err
    pair = tmp_path / "pair.json"  # two jobs of one submit
    pair.write_text(json.dumps([job_request(tiny_model, seed=2, out="two.mp4"),
                                job_request(tiny_model, seed=3, out=str(tmp_path / "two.mp4"))]))
    assert main(["submit", str(pair), *args]) == 2
    assert "expected a path no other job writes (job 1 of this submit does)" in capsys.readouterr().err
    spec.write_text(json.dumps(job_request(tiny_model, seed=4, out="elsewhere.mp4", token="shot-a")))
    assert main(["submit", str(spec), *args]) == 2  # a token used for another request: an error, not a traceback
    assert f"token: got 'shot-a', expected a token not used before (job {first} was" in capsys.readouterr().err
    assert farm.open_store(farm_dir).count() == 1

    assert main(["delete", first, *args]) == 0  # a deleted job writes nothing: its path is free
    assert main(["submit", str(other), *args]) == 0


def test_submit_reads_standard_input_and_pipes(tmp_path, tiny_model, capsys, monkeypatch):
    import io

    monkeypatch.chdir(tmp_path)
    args = ["--farm-dir", str(tmp_path / "farm")]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"prompt: a red ball\nmodel: {tiny_model}\nseconds: 2\n"
                                                 "priority: 7\n"))
    assert main(["submit", "-", *args]) == 0  # YAML on standard input
    from_stdin = capsys.readouterr().out.strip()
    read, write = os.pipe()  # what bash's <(...) passes: /dev/fd/N, a pipe
    os.write(write, json.dumps([job_request(tiny_model, seed=5), job_request(tiny_model, seed=6)]).encode())
    os.close(write)
    try:
        assert main(["submit", f"/dev/fd/{read}", *args]) == 0
    finally:
        os.close(read)
    from_pipe = capsys.readouterr().out.split()
    store = farm.open_store(tmp_path / "farm")
    assert store.get(from_stdin).priority == 7 and store.get(from_stdin).request["prompt"] == "a red ball"
    assert [store.get(i).request["seed"] for i in from_pipe] == [5, 6]
    # relative media paths of a spec without a directory of its own are relative to the current directory
    monkeypatch.setattr("sys.stdin", io.StringIO('{"prompt": "x", "image": "shots/first.png"}'))
    assert farm.read_specs("-")[0]["image"] == str(tmp_path / "shots" / "first.png")
    assert main(["submit", str(tmp_path / "missing.yaml"), *args]) == 2
    assert "expected an existing YAML or JSON file, `-` (standard input) or a pipe" in capsys.readouterr().err


def test_a_deleted_job_leaves_status_and_status_id_says_why(tmp_path, tiny_model, capsys):
    """As over HTTP (the list hides it, a read answers 410 with the reason)."""
    farm_dir = tmp_path / "farm"
    args = ["--farm-dir", str(farm_dir)]
    (kept, _), (gone, _) = farm.submit(farm_dir, [(job_request(tiny_model, seed=i), 0, None) for i in range(2)])
    assert main(["delete", gone.id, *args]) == 0
    capsys.readouterr()
    assert main(["status", *args, "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [kept.id]
    assert main(["status", *args]) == 0
    table = capsys.readouterr().out
    assert kept.id in table and gone.id not in table and "0 keys" not in table
    assert main(["status", gone.id, *args]) == 0
    out = capsys.readouterr().out
    assert "status    deleted" in out and "why       deleted on request (longtake delete)" in out
    assert main(["status", gone.id, *args, "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["status"] == "deleted" and one["error"] == "deleted on request (longtake delete)"


def test_control_commands_follow_the_job_states(tmp_path, tiny_model, capsys):
    farm_dir = tmp_path / "farm"
    (record, _), = farm.submit(farm_dir, [(job_request(tiny_model), 0, None)])
    args = ["--farm-dir", str(farm_dir)]
    assert main(["resume", record.id, *args]) == 2
    assert "expected a job that is paused to resume it (it is queued)" in capsys.readouterr().err
    assert main(["pause", record.id, *args]) == 0 and farm.open_store(farm_dir).get(record.id).state == "paused"
    assert main(["resume", record.id, *args]) == 0 and farm.open_store(farm_dir).get(record.id).state == "queued"
    assert main(["retry", record.id, *args]) == 2
    assert main(["cancel", record.id, *args]) == 0 and farm.open_store(farm_dir).get(record.id).state == "cancelled"
    assert main(["retry", record.id, *args]) == 0 and farm.open_store(farm_dir).get(record.id).state == "queued"
    assert main(["cancel", "nope", *args]) == 2
    assert "id: got 'nope', expected the id of a job in this farm" in capsys.readouterr().err
    log = (farm.job_dir(farm_dir, record.id) / "log.txt").read_text()
    assert "pause: queued -> paused" in log and "retry: cancelled -> queued" in log


def test_recover_requeues_jobs_of_dead_runners_only(tmp_path, tiny_model):
    import subprocess

    from longtake.cluster.jobs import new_runner_id

    farm_dir = tmp_path / "farm"
    (dead, _), (alive, _) = farm.submit(farm_dir, [(job_request(tiny_model), 0, None)] * 2)
    store = farm.open_store(farm_dir)
    gone = subprocess.Popen(["true"])
    gone.wait()
    host, _, token, boot, pidns = new_runner_id().split(":")  # a runner of this host, boot and pid namespace
    store.claim_next(f"{host}:{gone.pid}:{token}:{boot}:{pidns}")
    store.claim_next(f"{host}:{os.getppid()}:{token}:{boot}:{pidns}")  # a live process that is not this runner
    assert farm.Runner(farm_dir).recover() == [dead.id]
    assert store.get(dead.id).state == "queued" and store.get(alive.id).state == "running"
    assert "is gone; requeued" in (farm.job_dir(farm_dir, dead.id) / "log.txt").read_text()


# ------------------------------------------------------------------ faults, on the session's Ray

def _runner(farm_dir, **kw):
    kw.setdefault("workers", 2)
    kw.setdefault("checkpoint_every", 2)
    kw.setdefault("min_free_mb", 0)
    return farm.Runner(farm_dir, **kw)


def _step(store, job_id) -> int:
    return (store.get(job_id).progress or {}).get("step", 0)


def _running(tmp_path, request: dict, step: int, stay: bool = False, **runner_kw):
    """Submit one job, start a runner thread on it and wait until it is at `step`. `stay`: the runner waits
    for more work when the job ends (its pool kept for the job's second run: `_second_run`)."""
    farm_dir = tmp_path / "farm"
    (record, _), = farm.submit(farm_dir, [(request, 0, None)])
    runner = _runner(farm_dir, **({"poll_s": 0.1} if stay else {}), **runner_kw)
    thread = threading.Thread(target=runner.serve_forever, kwargs={"exit_when_idle": not stay}, daemon=True)
    thread.start()
    _STARTED.append((runner, thread))
    store = farm.open_store(farm_dir)
    wait_for(lambda: _step(store, record.id) >= step, 120, f"step {step}")
    return farm_dir, record, runner, thread, store


def _ended(farm_dir, store, job_id, said: str, timeout: float = 120):
    """Wait until the runner has ended the job's run: its log says `said` (the runner is still up)."""
    log = farm.job_dir(farm_dir, job_id) / "log.txt"
    wait_for(lambda: log.is_file() and said in log.read_text(), timeout, f"'{said}' in the job's log")
    return store.get(job_id)


def _second_run(runner, thread, store, job_id):
    """The job's second run on the same runner (and pool); the runner stopped after it."""
    try:
        wait_for(lambda: store.get(job_id).state in ("done", "failed"), 180, "the second run's end")
    finally:
        runner.stop.set()
        thread.join(60)
    return store.get(job_id)


def test_killed_worker_window_is_retried_and_logged(tmp_path, tiny_model, reference, ray_session, capsys):
    import ray

    farm_dir, record, runner, thread, store = _running(tmp_path, job_request(tiny_model), 3, worker_cls=SlowWorker)
    pool = wait_for(lambda: runner.pool(record.id), 60, "the job's pool")
    ray.kill(pool.actors[0], no_restart=True)  # mid-step
    thread.join(180)
    done = store.get(record.id)
    assert done.state == "done", done.error
    assert done.result["frames_sha256"] == reference() and pool.retries >= 1
    log = (farm.job_dir(farm_dir, record.id) / "log.txt").read_text()
    assert "died during window" in log and "retrying window" in log
    # the workers view (pool.WorkerBook): the killed slot was replaced, its task failed there; every window-step
    # is counted on a worker; each slot names its Ray node
    book = pool.workers()
    assert [w["restarts"] for w in book] == [1, 0] and book[0]["failures"] >= 1
    assert sum(w["window_steps"] for w in book) == done.result["model_evaluations"]
    assert all(w["node"].count("/") == 1 and w["busy_s"] > 0 and w["bytes"] > 0 for w in book)
    # the output names its job (AIGC ProduceID) under the farm's key
    capsys.readouterr()
    assert main(["verify", done.result["out"], "--farm-dir", str(farm_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["integrity"] == "intact" and report["job"]["id"] == record.id == report["aigc"]["ProduceID"]
    # stripped of its metadata and re-encoded, the watermark still names the job
    stripped = tmp_path / "stripped.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", done.result["out"], "-map_metadata", "-1", "-c:v", "libx264",
                    "-crf", "28", str(stripped)], check=True)
    assert main(["verify", str(stripped), "--farm-dir", str(farm_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["aigc"] is None and report["job"] == {"id": record.id, "state": "done", "found_by": "watermark"}


def test_bad_worker_is_excluded_and_the_job_still_finishes(tmp_path, tiny_model, reference, ray_session):
    import ray

    farm_dir = tmp_path / "farm"
    (record, _), = farm.submit(farm_dir, [(job_request(tiny_model), 0, None)])
    worker_cls = type("OneBadWorkerHere", (OneBadWorker,), {"marker": str(tmp_path / "bad-marker")})
    runner = _runner(farm_dir, worker_cls=worker_cls, blocklist_after=2, max_attempts=3)
    runner.serve_forever(exit_when_idle=True)
    done = farm.open_store(farm_dir).get(record.id)
    assert done.state == "done", done.error
    assert done.result["frames_sha256"] == reference()
    assert done.result["workers"] == 1  # the bad one was excluded
    log = (farm.job_dir(farm_dir, record.id) / "log.txt").read_text()
    assert "excluding worker" in log and "after 2 failed tasks" in log
    assert ray.is_initialized()


def test_window_failing_everywhere_fails_the_job_clearly_in_time(tmp_path, tiny_model, ray_session):
    farm_dir = tmp_path / "farm"
    (record, _), (second, _) = farm.submit(farm_dir, [(job_request(tiny_model), 1, None),
                                                      (job_request(tiny_model, seed=1), 0, None)])
    runner = _runner(farm_dir, worker_cls=BrokenWindowWorker, blocklist_after=5, max_attempts=3)
    t0 = time.monotonic()
    runner.serve_forever(exit_when_idle=True)
    assert time.monotonic() - t0 < 120
    store = farm.open_store(farm_dir)
    failed = store.get(record.id)
    assert failed.state == "failed"
    assert failed.error == ("render failed: window 2 of 5 at step 1 of 8 failed 3 times; "
                            "last error: RuntimeError: injected fault in window 6")
    assert store.get(second.id).state == "failed"  # the runner went on to the next job (it fails the same way)
    assert list((farm.job_dir(farm_dir, record.id)).glob("checkpoints/*.safetensors")) == []


def _name(proc) -> str:
    """A child's name, or "" when it exited between listing and asking (Ray's helpers come and go)."""
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


def test_cancel_mid_job_frees_workers_and_leaves_nothing(tmp_path, tiny_model, ray_session):
    import ray

    total_cpus = ray.cluster_resources()["CPU"]
    wait_for(lambda: ray.available_resources().get("CPU", 0) == total_cpus, 30, "earlier tests' workers to go", 0.2)
    # a short lease: its heartbeat (every 0.05 s) sees the cancel before the runner's poll (0.2 s) most times
    farm_dir, record, runner, thread, store = _running(tmp_path, job_request(tiny_model, steps=30), 3,
                                                       worker_cls=SlowWorker, lease_s=0.2)
    assert ray.available_resources().get("CPU", 0) <= total_cpus - 2  # two workers busy
    t0 = time.monotonic()
    farm.control(farm_dir, "cancel", record.id)
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= total_cpus, 5, "the workers to be freed", 0.1)
    assert time.monotonic() - t0 < 5
    thread.join(30)
    assert store.get(record.id).state == "cancelled"
    assert not [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in _name(p)]
    d = farm.job_dir(farm_dir, record.id)
    assert sorted(p.name for p in d.rglob("*")) == ["log.txt", "request.json"]  # no checkpoints, no temp files
    log = (d / "log.txt").read_text()
    assert "cancelled at step" in log and "checkpoint saved" not in log  # a cancelled job's checkpoints are not kept


def test_cancel_while_encoding_leaves_no_ffmpeg_and_no_partial_file(tmp_path, tiny_model, ray_session):
    farm_dir = tmp_path / "farm"
    (record, _), = farm.submit(farm_dir, [(job_request(tiny_model, seconds=12), 0, None)])
    release = tmp_path / "release"  # created only once the runner is done: decoding cannot finish before the cancel
    worker_cls = type("StallingDecodeWorkerHere", (StallingDecodeWorker,), {"release": str(release)})
    runner = _runner(farm_dir, worker_cls=worker_cls)
    store = farm.open_store(farm_dir)
    seen = {}

    def cancel_on_decode():
        while not seen.get("stop"):
            p = store.get(record.id).progress or {}
            if p.get("phase") == "decode":  # the first chunk is written: ffmpeg is running
                seen["ffmpeg"] = [c for c in psutil.Process().children(recursive=True) if "ffmpeg" in _name(c)]
                farm.control(farm_dir, "cancel", record.id)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=cancel_on_decode, daemon=True)
    watcher.start()
    try:
        runner.serve_forever(exit_when_idle=True)
    finally:
        seen["stop"] = True
        release.touch()
    assert store.get(record.id).state == "cancelled"
    log = (farm.job_dir(farm_dir, record.id) / "log.txt").read_text()
    assert "cancelled at step" in log and "done:" not in log
    assert seen["ffmpeg"], "ffmpeg was running while decoding"
    wait_for(lambda: not [p for p in seen["ffmpeg"] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
             5, "ffmpeg to exit")
    assert sorted(p.name for p in farm.job_dir(farm_dir, record.id).rglob("*")) == ["log.txt", "request.json"]


def test_pause_and_resume_mid_job_give_identical_frames(tmp_path, tiny_model, reference, ray_session):
    farm_dir, record, runner, thread, store = _running(tmp_path, job_request(tiny_model), 3, stay=True,
                                                       worker_cls=SlowWorker, checkpoint_every=4,
                                                       lease_s=0.2)  # the lease may see it first
    farm.control(farm_dir, "pause", record.id)
    assert _ended(farm_dir, store, record.id, "paused at step").state == "paused"
    names = [p.name for p in Checkpointer(farm.job_dir(farm_dir, record.id) / "checkpoints", 1, "").paths()]
    paused_at = int(re.search(r"paused at step (\d+)", (farm.job_dir(farm_dir, record.id) / "log.txt").read_text())[1])
    assert paused_at >= 2 and names[0] == f"step-{paused_at:06d}.safetensors"  # checkpointed where it paused, not at k
    farm.control(farm_dir, "resume", record.id)
    done = _second_run(runner, thread, store, record.id)
    assert done.state == "done" and done.result["frames_sha256"] == reference()
    assert done.result["resumed_from_step"] == paused_at


def test_unwritable_output_fails_keeps_checkpoints_and_retry_finishes(tmp_path, tiny_model, reference, ray_session):
    outdir = tmp_path / "deliveries"
    outdir.mkdir()
    farm_dir, record, runner, thread, store = _running(
        tmp_path, job_request(tiny_model, out=str(outdir / "shot.mp4")), 2, stay=True, worker_cls=SlowWorker)
    outdir.rename(tmp_path / "moved")
    outdir.write_text("not a directory any more")  # the delivery path is gone mid-job (root ignores chmod)
    failed = _ended(farm_dir, store, record.id, "failed: ")
    assert failed.state == "failed"
    assert "cannot write" in failed.error and "shot.mp4" in failed.error and f"longtake retry {record.id}" in failed.error
    checkpoints = list((farm.job_dir(farm_dir, record.id) / "checkpoints").glob("step-*.safetensors"))
    assert f"step-{STEPS:06d}.safetensors" in [p.name for p in checkpoints]
    outdir.unlink()
    (tmp_path / "moved").rename(outdir)
    farm.control(farm_dir, "retry", record.id)
    done = _second_run(runner, thread, store, record.id)
    assert done.state == "done" and done.result["frames_sha256"] == reference()
    assert done.result["resumed_from_step"] == STEPS  # only decoding was redone
    assert (outdir / "shot.mp4").is_file() and [p.name for p in outdir.iterdir()] == ["shot.mp4"]


def test_disk_full_fails_keeps_checkpoints_and_retry_finishes(tmp_path, tiny_model, reference, ray_session):
    farm_dir, record, runner, thread, store = _running(tmp_path, job_request(tiny_model), 5, stay=True,
                                                       worker_cls=SlowWorker)
    runner.min_free_mb = 1e12  # the disk "fills": less free than the farm must keep
    failed = _ended(farm_dir, store, record.id, "failed: ")
    assert failed.state == "failed" and "disk full" in failed.error and "checkpoints kept" in failed.error
    assert Checkpointer(farm.job_dir(farm_dir, record.id) / "checkpoints", 1, "").paths()
    runner.min_free_mb = 0  # space is back
    farm.control(farm_dir, "retry", record.id)
    done = _second_run(runner, thread, store, record.id)
    assert done.state == "done" and done.result["frames_sha256"] == reference()
    assert done.result["resumed_from_step"] >= 4


def test_runner_takes_jobs_by_priority_then_submit_time(tmp_path, tiny_model, ray_session):
    farm_dir = tmp_path / "farm"
    jobs = farm.submit(farm_dir, [(job_request(tiny_model, seconds=1, steps=2, seed=i), p, None)
                                  for i, p in enumerate([0, 5, 0, 9])])
    _runner(farm_dir, max_jobs=1).serve_forever(exit_when_idle=True)  # one at a time: the order is visible
    store = farm.open_store(farm_dir)
    assert all(store.get(r.id).state == "done" for r, _ in jobs)
    finish_order = [r.id for r, _ in sorted(jobs, key=lambda j: store.get(j[0].id).updated)]
    expected = [r.id for r, _ in sorted(jobs, key=lambda j: (-j[0].priority, j[0].created))]
    assert finish_order == expected and expected[0] == jobs[3][0].id


def test_corrupt_checkpoint_on_resume_falls_back_with_a_log_line(tmp_path, tiny_model, reference, ray_session):
    farm_dir, record, runner, thread, store = _running(tmp_path, job_request(tiny_model), 5, stay=True,
                                                       worker_cls=SlowWorker, checkpoint_every=2)
    farm.control(farm_dir, "pause", record.id)
    _ended(farm_dir, store, record.id, "paused at step")
    ckpt = Checkpointer(farm.job_dir(farm_dir, record.id) / "checkpoints", 1, "")
    newest, previous = ckpt.paths()[:2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, the file still parses
    newest.write_bytes(bytes(data))
    farm.control(farm_dir, "resume", record.id)
    done = _second_run(runner, thread, store, record.id)
    assert done.state == "done" and done.result["frames_sha256"] == reference()
    assert done.result["resumed_from_step"] == int(previous.name[5:11])
    log = (farm.job_dir(farm_dir, record.id) / "log.txt").read_text()
    assert f"checkpoint {newest.name} is corrupt: checksum mismatch; falling back to {previous.name}" in log


# ------------------------------------------------------------------ leases, status, loggers

class BrokenHeartbeatStore(farm.JobStore):
    """The farm's store, whose heartbeat writes fail (a locked or lost database)."""

    def heartbeat(self, job_id, owner):
        import sqlite3

        raise sqlite3.OperationalError("disk I/O error")


def test_a_runner_whose_heartbeat_dies_stops_rendering_and_changes_nothing(tmp_path, tiny_model, ray_session):
    farm_dir = tmp_path / "farm"
    (record, _), = farm.submit(farm_dir, [(job_request(tiny_model, steps=30), 0, None)])
    runner = _runner(farm_dir, lease_s=1.0, worker_cls=SlowWorker)
    runner.store = BrokenHeartbeatStore(farm_dir / "farm.db")
    t0 = time.monotonic()
    claimed = runner.store.claim_next(runner.id)
    from longtake.actors.ray_boot import start_ray

    start_ray()
    try:
        assert runner.run_job(claimed) == "lost"
    finally:
        runner.close()
    assert time.monotonic() - t0 < 60
    store = farm.open_store(farm_dir)
    job = store.get(record.id)
    assert job.state == "running" and job.result is None  # left for another runner to requeue: not done, not failed
    log = (farm.job_dir(farm_dir, record.id) / "log.txt").read_text()
    assert "lease lost" in log and "disk I/O error" in log
    time.sleep(1.1)
    assert farm.Runner(farm_dir, lease_s=1.0).recover() == [record.id]
    assert farm.open_store(farm_dir).get(record.id).state == "queued"


def test_a_lost_lease_is_a_cancel_or_pause_when_that_is_the_jobs_state(tmp_path, tiny_model):
    from longtake.cluster.job_runner import lost_reason

    farm_dir = tmp_path / "farm"
    (record, _), = farm.submit(farm_dir, [(job_request(tiny_model), 0, None)])
    runner = _runner(farm_dir)
    claimed = runner.store.claim_next(runner.id)
    assert lost_reason(runner.store, record.id) == "lost"  # still running: the lease was lost (store or takeover)
    farm.control(farm_dir, "pause", record.id)
    assert lost_reason(runner.store, record.id) == "paused"  # checkpoint where it stopped
    farm.control(farm_dir, "resume", record.id)
    runner.store.claim_next("another-runner")
    assert lost_reason(runner.store, record.id) == "lost"  # taken over: touch nothing
    farm.control(farm_dir, "cancel", record.id)
    assert lost_reason(runner.store, record.id) == "cancelled"  # remove the checkpoints
    def unreachable(job_id):
        raise OSError("disk I/O error")

    runner.store.get = unreachable
    assert lost_reason(runner.store, record.id) == "lost"  # the store cannot say: touch nothing
    assert claimed.id == record.id


def test_status_has_one_json_shape_and_short_tables(tmp_path, tiny_model, capsys):
    farm_dir = tmp_path / "farm"
    prompt = "a red ball bouncing slowly across a wide blue field, then rolling away into the distance"
    (record, _), = farm.submit(farm_dir, [(job_request(tiny_model, prompt=prompt), 3, None)])
    args = ["--farm-dir", str(farm_dir)]
    assert main(["status", *args, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert main(["status", record.id, *args, "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert listed == [one]
    assert set(one) == {"id", "status", "priority", "created", "updated", "request", "progress", "error", "result", "client",
                        "depends", "story"}
    assert one["status"] == "queued" and one["request"]["prompt"] == prompt
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", one["created"])
    assert set(one["progress"]) == {"phase", "step", "steps", "window_steps_done", "window_steps_total",
                                    "frames_done", "frames", "eta_s", "windows", "running", "workers"}
    assert main(["status", *args]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 and max(len(line) for line in table) <= 110 and "…" in table[1]
    assert main(["status", record.id, *args]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "status    queued" in out


def test_status_of_a_missing_farm_is_an_error_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    for argv in (["status"], ["status", "abc", "--json"], ["cancel", "abc"]):
        assert main([*argv, "--farm-dir", str(missing)]) == 2
        assert "farm_dir: got" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_jobs_leave_no_logger_behind(tmp_path, tiny_model, ray_session):
    farm_dir = tmp_path / "farm"
    jobs = farm.submit(farm_dir, [(job_request(tiny_model, seconds=1, steps=1, seed=i), 0, None) for i in range(3)])
    _runner(farm_dir).serve_forever(exit_when_idle=True)
    names = set(logging.Logger.manager.loggerDict)
    assert not [r.id for r, _ in jobs if any(r.id in name for name in names)]
    for r, _ in jobs:
        assert "done:" in (farm.job_dir(farm_dir, r.id) / "log.txt").read_text()
