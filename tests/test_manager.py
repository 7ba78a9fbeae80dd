"""The serve job manager without Serve: cost limits, the served model, idempotency, DELETE, progress
throttling, errors without paths, checkpoints across a restart, two managers on one data directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.jobs import Conflict, QueueFull
from longtake.cluster.retention import Audit
from longtake.request import RequestError
from longtake.serve.manager import Gone, JobManager, Limits, public_message

JOB = {"prompt": "a red ball", "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2}
IDLE = Limits(max_running=0)  # validation only: nothing is rendered


class SlowPool(InProcessPool):
    """The in-process pool, a little slower per window, so a test can act mid-job."""

    def poll(self, timeout=None):
        time.sleep(0.05)
        return super().poll(timeout)


def wait_for(predicate, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def idle(tmp_path, tiny_model):
    manager = JobManager(tmp_path / "serve", None, tiny_model, IDLE)
    yield manager
    manager.close()


@pytest.mark.parametrize("change, field", [
    ({"fps": 120}, "fps"),  # 120 s at 120 fps was accepted
    ({"seconds": 20, "window": 8, "overlap": 7}, "overlap"),  # overlap = window - 1: a window per frame
    ({"timeline": [{"at": i * 0.01, "prompt": f"p{i}"} for i in range(100)], "prompt": None}, "timeline"),
])
def test_requests_over_the_cost_limits_are_refused_naming_the_field(tmp_path, tiny_model, change, field):
    limits = Limits(max_running=0, max_model_evaluations=200)
    manager = JobManager(tmp_path / "serve", None, tiny_model, limits)
    try:
        manager.submit(JOB)  # within the limits
        body = {k: v for k, v in {**JOB, **change}.items() if v is not None}
        with pytest.raises(RequestError) as e:
            manager.submit(body)
        assert e.value.field == field, str(e.value)
        assert manager.store.count() == 1
    finally:
        manager.close()


def test_driver_memory_limit_names_the_field(tmp_path, tiny_model):
    manager = JobManager(tmp_path / "serve", None, tiny_model, Limits(max_running=0, max_latent_mb=0.5))
    try:
        with pytest.raises(RequestError, match="MB of latents") as e:
            manager.submit({**JOB, "seconds": 20})
        assert e.value.field == "seconds"
    finally:
        manager.close()


def test_the_cost_limit_counts_the_media_a_job_holds(tmp_path):
    """A motion plan's frames (RGB at the output size, one a frame) count with the latents: the same request
    without its plan fits a limit the planned one does not."""
    from longtake.cluster.engine import prepare
    from longtake.serve.manager import request_cost

    body = {"prompt": "a red ball moving right", "seconds": 10, "fps": 8, "steps": 2}
    planned = prepare({**body, "model": "default", "out": str(tmp_path / "a.mp4")}, pixels=False)
    plain = prepare({**body, "plan": "none", "model": "default", "out": str(tmp_path / "b.mp4")}, pixels=False)
    assert planned.controlled and not plain.controlled and planned.control is None  # no pixels drawn to check it
    with_plan, without = request_cost(planned)[1], request_cost(plain)[1]
    assert with_plan - without == pytest.approx(80 * planned.height * planned.width * 3 / 2**20)
    manager = JobManager(tmp_path / "serve", None, "default", Limits(max_running=0,
                                                                      max_latent_mb=(with_plan + without) / 2))
    try:
        with pytest.raises(RequestError, match="MB of latents and media"):
            manager.submit(body)
        job, created = manager.submit({**body, "plan": "none"})
        assert created and manager.store.get(job["id"]).state == "queued"
    finally:
        manager.close()


def test_another_model_is_refused_without_building_it(tmp_path, tiny_model, monkeypatch, idle):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LONGTAKE_CACHE", str(cache))
    for other in ("tiny", "tiny-wan", "/somewhere/else"):
        with pytest.raises(RequestError, match="the model this server runs") as e:
            idle.submit({**JOB, "model": other})
        assert e.value.field == "model"
    assert list(cache.iterdir()) == []  # nothing was built
    job, _ = idle.submit({**JOB, "model": Path(tiny_model).name})  # its own name is fine
    assert job["request"]["model"] == Path(tiny_model).name and str(tmp_path) not in str(job)


def test_reused_idempotency_key_with_another_body_is_a_conflict(idle):
    first, created = idle.submit(JOB, "key-1")
    again, created_again = idle.submit(dict(JOB), "key-1")
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(Conflict, match="key-1"):
        idle.submit({**JOB, "seed": 5}, "key-1")
    assert idle.store.count() == 1


def test_queue_limit_counts_queued_jobs(tmp_path, tiny_model):
    manager = JobManager(tmp_path / "serve", None, tiny_model, Limits(max_running=0, max_queued=2))
    try:
        manager.submit(JOB)
        manager.submit(JOB)
        with pytest.raises(QueueFull):
            manager.submit(JOB)
    finally:
        manager.close()


def _upload(manager, owner: str, name: str = "a.png", colour: str = "red") -> str:
    from PIL import Image

    path = manager.files.incoming()
    Image.new("RGB", (32, 24), colour).save(path, format="PNG")
    return manager.files.add(path, owner, name)["id"]


def test_an_uploaded_file_belongs_to_the_client_that_sent_it(idle):
    from longtake.serve.files import owner_of

    alice, bob = owner_of("alice"), owner_of("bob")
    file_id = _upload(idle, alice)
    assert idle.files.get(file_id, alice)["kind"] == "image" and idle.files.get(file_id, bob) is None
    with pytest.raises(RequestError, match="the id of a file you uploaded") as e:
        idle.submit({**JOB, "keyframes": [{"image": file_id, "at": 0.5}]}, client="bob")
    assert e.value.field == "keyframes[0].image" and e.value.value == file_id
    assert idle.delete_file(file_id, bob) == {"deleted": False} and idle.files.get(file_id, alice)
    job, _ = idle.submit({**JOB, "image": file_id}, client="alice")
    assert job["request"]["image"] == file_id and job["client"] == "alice"  # stored as sent, and whose
    assert idle.get(job["id"], "bob") is None and idle.get(job["id"], "alice") and idle.get(job["id"])
    assert idle.list(client="bob")["total"] == 0 and idle.list(client="alice")["total"] == 1
    assert idle.delete(job["id"], "bob") is None and idle.cancel(job["id"], "bob") is None
    assert idle.delete_file(file_id, alice) == {"in_use": [job["id"]]}  # the queued job needs it
    idle.delete(job["id"])
    assert idle.delete_file(file_id, alice) == {"deleted": True} and idle.files.get(file_id, alice) is None
    assert not (idle.files.root / file_id).exists()


def test_a_media_error_names_the_file_id_never_the_server_path(idle, tmp_path):
    import shutil

    import numpy as np

    from longtake.serve.files import owner_of
    from longtake.video import VideoWriter

    owner = owner_of("t")  # the files of client "t"
    image = _upload(idle, owner)
    with VideoWriter(tmp_path / "short.mp4", 64, 64, 8) as w:
        w.write(np.zeros((4, 64, 64, 3), np.uint8))
    path = idle.files.incoming()
    shutil.copy(tmp_path / "short.mp4", path)
    video = idle.files.add(path, owner, "short.mp4")["id"]
    with pytest.raises(RequestError, match="a video file \\(this one is an image\\)") as e:
        idle.submit({**JOB, "extend": image}, client="t")
    assert e.value.field == "extend"
    with pytest.raises(RequestError, match="at least 16 frames") as e:  # 2 s of context from a 4-frame clip
        idle.submit({**JOB, "extend": video, "context": 2}, client="t")
    assert e.value.field == "extend" and e.value.value == video and str(idle.data_dir) not in str(e.value)


def _upload_video(manager, owner: str, tmp_path, name: str, seconds: float, raw: bool = False) -> str:
    """A 64 x 64 clip at 8 fps (`raw`: a bare H.264 stream, which has no container duration), uploaded."""
    import shutil
    import subprocess

    from longtake.video import ffmpeg_exe

    made = tmp_path / name
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=8", "-t",
                    str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p", *(["-f", "h264"] if raw else []),
                    str(made)], check=True)
    path = manager.files.incoming()
    shutil.copy(made, path)
    return manager.files.add(path, owner, name)["id"]


@pytest.mark.slow
def test_what_is_rendered_and_written_counts_against_max_seconds(tmp_path, tiny_model):
    """A video redrawn for its own length (no seconds asked for) and the clips extend passes through count, and
    a raw stream's length comes from its packets (its container says 0 s)."""
    from longtake.serve.files import owner_of

    manager = JobManager(tmp_path / "serve", None, tiny_model, Limits(max_running=0, max_seconds=10))
    owner = owner_of("t")
    try:
        raw = _upload_video(manager, owner, tmp_path, "raw.h264", 20, raw=True)
        long = _upload_video(manager, owner, tmp_path, "long.mp4", 15)
        short = _upload_video(manager, owner, tmp_path, "short.mp4", 3)
        assert manager.files.get(raw, owner)["seconds"] == 20  # was 0.0: no container duration
        body = {k: v for k, v in JOB.items() if k != "seconds"}
        for video in (raw, long):
            with pytest.raises(RequestError, match="a video of at most 10 s") as e:
                manager.submit({**body, "video": video}, client="t")
            assert e.value.field == "video" and e.value.value == video
        manager.submit({**body, "video": long, "seconds": 5}, client="t")  # 5 s of it: within the limit
        with pytest.raises(RequestError, match=r"the clips passed through included \(this one is 17 s") as e:
            manager.submit({**JOB, "extend": long}, client="t")
        assert e.value.field == "extend"
        manager.submit({**JOB, "extend": short}, client="t")  # 3 s passed through + 2 s new
        assert manager.store.count() == 2
    finally:
        manager.close()


@pytest.mark.slow
def test_submit_decodes_no_media_and_names_the_costliest_field_by_arithmetic(tmp_path, tiny_model, monkeypatch):
    """A server checks a request from its media's packets: no frame is decoded at submit, over the limits or
    not, and the field named in a 422 comes from arithmetic, not from preparing the request again."""
    import longtake.media
    import longtake.serve.manager
    from longtake.serve.files import owner_of

    manager = JobManager(tmp_path / "serve", None, tiny_model, Limits(max_running=0, max_model_evaluations=200,
                                                                       max_steps=100))
    owner = owner_of("t")
    try:
        clip = _upload_video(manager, owner, tmp_path, "clip.mp4", 4)
        decoded, prepared = [], []
        monkeypatch.setattr(longtake.media, "_reader", lambda *a, **k: decoded.append(a) or 1 / 0)
        real = longtake.serve.manager.prepare
        monkeypatch.setattr(longtake.serve.manager, "prepare", lambda *a, **k: prepared.append(a) or real(*a, **k))
        manager.submit({**JOB, "extend": clip}, client="t")
        for change, field in (({"steps": 60}, "steps"), ({"seconds": 30, "overlap": 7}, "overlap")):
            with pytest.raises(RequestError, match="cost limits") as e:
                manager.submit({**JOB, "extend": clip, **change}, client="t")
            assert e.value.field == field, str(e.value)
        assert decoded == [] and len(prepared) == 3  # one check each, never re-run per field
    finally:
        manager.close()


def test_delete_has_one_meaning(idle):
    job, _ = idle.submit(JOB)
    assert idle.delete(job["id"]) == "queued"
    assert idle.store.get(job["id"]).state == "deleted"
    with pytest.raises(Gone):
        idle.get(job["id"])
    with pytest.raises(Gone):
        idle.delete(job["id"])
    assert idle.list()["data"] == [] and idle.list()["total"] == 0
    assert idle._cancel == set()  # a job that never ran leaves nothing behind
    assert idle.delete("nope") is None


@pytest.mark.slow
def test_progress_is_written_at_most_twice_a_second(tmp_path, tiny_model):
    pool = InProcessPool(WorkerSpec(tiny_model))
    manager = JobManager(tmp_path / "serve", pool, tiny_model, Limits(max_running=1))
    writes = []
    update = manager.store.update

    def counting(job_id, **kw):
        if "progress" in kw and kw["progress"]:
            writes.append(time.monotonic())
        return update(job_id, **kw)

    manager.store.update = counting
    try:
        job, _ = manager.submit({**JOB, "seconds": 4, "window": 4, "overlap": 1, "steps": 4})
        wait_for(lambda: manager.store.get(job["id"]).state == "done", what="the job")
    finally:
        manager.close()
    done = manager.store.get(job["id"])
    reports = done.result["model_evaluations"]  # one progress report per window and step, more for decode
    assert reports >= 40
    assert len(writes) < reports / 2, (len(writes), reports)
    assert done.progress["phase"] == "done" and done.progress["frames_done"] == done.progress["frames"] == 32


class CrawlingPool(InProcessPool):
    """Two seconds a window: a DELETE arrives while one runs."""

    def poll(self, timeout=None):
        time.sleep(2.0)
        return super().poll(timeout)


@pytest.mark.slow
def test_a_cancelled_job_keeps_its_log_and_no_checkpoint(tmp_path, tiny_model):
    manager = JobManager(tmp_path / "serve", SlowPool(WorkerSpec(tiny_model)), tiny_model,
                         Limits(max_running=1, checkpoint_every=1))
    job, _ = manager.submit({**JOB, "seconds": 3, "steps": 8})
    checkpoints = tmp_path / "serve" / "jobs" / job["id"] / "checkpoints"
    try:
        wait_for(lambda: list(checkpoints.glob("step-*.safetensors")), what="a checkpoint")
        assert manager.cancel(job["id"]) == "running"
        wait_for(lambda: job["id"] not in manager._running, what="the job to stop")
    finally:
        manager.close()
    assert manager.store.get(job["id"]).state == "cancelled"
    assert not checkpoints.exists()  # the latents went with the cancel; the log stays until retention
    assert "cancelled on request (it was running)" in manager.log(job["id"])


@pytest.mark.slow
def test_delete_of_a_running_job_answers_at_once_and_nothing_of_it_comes_back(tmp_path, tiny_model):
    """The job's own thread deletes what it wrote when it stops: a checkpoint due meanwhile cannot bring the
    directory back, and DELETE does not wait for a window to finish."""
    data = tmp_path / "serve"
    manager = JobManager(data, CrawlingPool(WorkerSpec(tiny_model)), tiny_model, Limits(max_running=1,
                                                                                           checkpoint_every=1))
    job, _ = manager.submit({**JOB, "seconds": 2, "steps": 8, "window": 16})  # one window: a step a window
    try:
        wait_for(lambda: list((data / "jobs" / job["id"] / "checkpoints").glob("step-*")), what="a checkpoint")
        t0 = time.monotonic()
        assert manager.delete(job["id"]) == "running"
        took = time.monotonic() - t0
        wait_for(lambda: job["id"] not in manager._running, what="the job to stop")
        time.sleep(0.5)
    finally:
        manager.close()
    assert took < 1.0, f"DELETE waited {took:.1f} s for the running window"
    assert not (data / "jobs" / job["id"]).exists()
    assert manager.store.get(job["id"]).state == "deleted"
    assert [line["id"] for line in Audit(data).lines()] == [job["id"]]


class FailingPool(InProcessPool):
    def __init__(self, spec, where):
        super().__init__(spec)
        self.where = where

    def poll(self, timeout=None):
        raise OSError(f"cannot read {self.where}/weights/diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_a_failed_job_tells_the_client_no_server_path(tmp_path, tiny_model, caplog):
    manager = JobManager(tmp_path / "serve", FailingPool(WorkerSpec(tiny_model), tmp_path), tiny_model,
                         Limits(max_running=1))
    try:
        job, _ = manager.submit(JOB)
        wait_for(lambda: manager.store.get(job["id"]).state == "failed", what="the failure")
    finally:
        manager.close()
    error = manager.get(job["id"])["error"]
    assert error == "OSError: cannot read <path>", error
    assert str(tmp_path) in caplog.text  # the server log keeps it


def test_public_message_cuts_paths_only():
    assert public_message("height: got 66, expected a multiple of 8") == "height: got 66, expected a multiple of 8"
    assert public_message("no file /srv/m/x.json (see ./here or ~/y)") == "no file <path> (see <path> or <path>)"


@pytest.mark.slow
def test_a_restarted_manager_resumes_from_the_checkpoint_with_the_same_frames(tmp_path, tiny_model, render_in_process):
    request = {**JOB, "seconds": 3, "steps": 8}
    ref = render_in_process({**request, "model": tiny_model, "out": str(tmp_path / "ref.mp4")})
    data = tmp_path / "serve"
    limits = Limits(max_running=1, checkpoint_every=2)
    first = JobManager(data, SlowPool(WorkerSpec(tiny_model)), tiny_model, limits)
    job, _ = first.submit(request)
    try:
        wait_for(lambda: (first.store.get(job["id"]).progress or {}).get("step", 0) >= 3, what="step 3")
    finally:
        first.close()  # the server stops: the job is checkpointed and queued again
    stopped = first.store.get(job["id"])
    assert stopped.state == "queued" and stopped.runner is None
    assert list((data / "jobs" / job["id"] / "checkpoints").glob("step-*.safetensors"))
    second = JobManager(data, InProcessPool(WorkerSpec(tiny_model)), tiny_model, limits)
    try:
        wait_for(lambda: second.store.get(job["id"]).state == "done", what="the resumed job")
    finally:
        second.close()
    result = second.store.get(job["id"]).result
    assert result["resumed_from_step"] >= 3
    assert result["frames_sha256"] == ref.frames_sha256
    assert not (data / "jobs" / job["id"] / "checkpoints").exists()


@pytest.mark.slow
def test_a_second_manager_on_the_same_data_dir_leaves_a_live_managers_job_alone(tmp_path, tiny_model):
    data = tmp_path / "serve"
    first = JobManager(data, SlowPool(WorkerSpec(tiny_model)), tiny_model, Limits(max_running=1))
    job, _ = first.submit({**JOB, "seconds": 3, "steps": 6})
    second = None
    try:
        wait_for(lambda: first.store.get(job["id"]).state == "running", what="running")
        second = JobManager(data, InProcessPool(WorkerSpec(tiny_model)), tiny_model, Limits(max_running=1))
        time.sleep(1.5)  # a scheduler round and a recovery pass of the second manager
        record = second.store.get(job["id"])
        assert record.state == "running" and record.runner == first.id
        assert second._running == {}
        wait_for(lambda: first.store.get(job["id"]).state == "done", what="the first manager's job")
    finally:
        first.close()
        if second is not None:
            second.close()
