"""Retention and deletion (#17): the sweeper deletes exactly what expired (a clock set by the test), leaves
an audit line per deletion and nothing of the deleted rows in the database files; on request deletion in
serve and the farm; 410 for an expired output; `longtake gc` and `longtake delete`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longtake.cli import main
from longtake.cluster import farm
from longtake.cluster.retention import DAY, Audit, Retention, RetentionError, parse_duration
from longtake.serve.files import owner_of
from longtake.serve.manager import Gone, JobManager, Limits

SECRET = "a zebra named Quillfeather-5521 dancing"  # what must leave the database files


def db_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.is_file())


@pytest.mark.parametrize("text, seconds", [("90d", 90 * DAY), ("12h", 43200), ("30m", 1800), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration("retain_uploads", text) == seconds


@pytest.mark.parametrize("text", ["", "0d", "-1d", "90", "d", "1w", "nan", "1e3d"])
def test_bad_durations_name_the_field(text):
    with pytest.raises(RetentionError) as e:
        Retention(outputs=text)
    assert e.value.field == "retain_outputs" and "90d" in str(e.value)


def _upload(manager: JobManager, value: int) -> str:
    path = manager.files.incoming()  # where the ingress writes an upload
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path, format="PNG")
    return manager.files.add(path, owner=owner_of("o1"))["id"]


def _finish(manager: JobManager, job_id: str) -> Path:
    """Mark a queued job done with files in its directory, as a render leaves them."""
    d = manager.job_dir(job_id)
    d.mkdir(parents=True, exist_ok=True)  # (its log.txt is there from the submit)
    (d / "video.mp4").write_bytes(b"\0" * 1000)
    (d / "preview.png").write_bytes(b"\0" * 10)
    assert manager.store.update(job_id, state="done", result={"frames": 16})
    return d


def test_the_sweep_deletes_exactly_what_expired_and_audits_it(tmp_path, tiny_model):
    data = tmp_path / "serve"
    manager = JobManager(data, None, tiny_model, Limits(max_running=0, retain_uploads="90d", retain_outputs="365d"))
    try:
        old_upload, used_upload = _upload(manager, 200), _upload(manager, 100)
        done, _ = manager.submit({"prompt": SECRET, "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2})
        queued, _ = manager.submit({"prompt": "a red ball", "seconds": 2, "fps": 8, "steps": 2, "window": 8,
                                    "overlap": 2, "image": used_upload}, client="o1")
        job_dir = _finish(manager, done["id"])
        assert SECRET.encode() in db_bytes(data / "jobs.db")
        now = time.time()

        assert manager.gc(now=now + 89 * DAY) == []  # nothing has expired yet
        preview = manager.gc(now=now + 91 * DAY, dry_run=True)
        assert [(d["what"], d["id"]) for d in preview] == [("upload", old_upload)]
        assert (manager.files.root / old_upload).is_dir() and not Audit(data).lines()  # a dry run touches nothing

        swept = manager.gc(now=now + 91 * DAY)  # the upload a queued job names is kept
        assert [(d["what"], d["id"]) for d in swept] == [("upload", old_upload)]
        assert not (manager.files.root / old_upload).exists() and (manager.files.root / used_upload).is_dir()
        assert manager.get(done["id"])["status"] == "done" and job_dir.is_dir()

        log_bytes = (job_dir / "log.txt").stat().st_size  # the job's log goes with it
        swept = manager.gc(now=now + 366 * DAY)
        assert [(d["what"], d["id"]) for d in swept] == [("output", done["id"])]
        assert swept[0]["bytes"] == 1010 + log_bytes and sorted(swept[0]["files"]) == [
            f"jobs/{done['id']}/log.txt", f"jobs/{done['id']}/preview.png", f"jobs/{done['id']}/video.mp4"]
        assert not job_dir.exists()
        with pytest.raises(Gone, match="expired"):
            manager.get(done["id"])
        assert manager.get(queued["id"])["status"] == "queued"  # not finished: never expires
        lines = Audit(data).lines()
        assert [(a["what"], a["id"]) for a in lines] == [("upload", old_upload), ("output", done["id"])]
        assert all(a["why"].startswith("expired") and a["at"].endswith("Z") for a in lines)
        assert SECRET not in (data / "audit.log").read_text()
        assert SECRET.encode() not in db_bytes(data / "jobs.db")  # scrubbed, zeroed, checkpointed
    finally:
        manager.close()


def test_delete_on_request_is_physical_and_audited(tmp_path, tiny_model):
    data = tmp_path / "serve"
    manager = JobManager(data, None, tiny_model, Limits(max_running=0))
    try:
        job, _ = manager.submit({"prompt": SECRET, "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2})
        job_dir = _finish(manager, job["id"])
        assert manager.delete(job["id"]) == "done"
        assert not job_dir.exists() and SECRET.encode() not in db_bytes(data / "jobs.db")
        with pytest.raises(Gone, match="deleted on request"):
            manager.get(job["id"])
        upload = _upload(manager, 0)
        assert manager.delete_file(upload, owner_of("o1")) == {"deleted": True}
        lines = Audit(data).lines()
        assert [(a["what"], a["id"], a["why"].split(" (")[0]) for a in lines] == [
            ("output", job["id"], "deleted on request"), ("upload", upload, "deleted on request")]
        assert lines[1]["files"] == [f"uploads/{upload}/content", f"uploads/{upload}/meta.json"]
    finally:
        manager.close()


def test_farm_delete_and_gc_from_the_cli(tmp_path, tiny_model, capsys):
    farm_dir = tmp_path / "farm"
    renders = tmp_path / "renders"
    request = {"prompt": SECRET, "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2,
               "model": tiny_model}
    outs = [renders / f"clip{i}.mp4" for i in range(3)]
    (first, _), (second, _), (third, _) = farm.submit(farm_dir, [({**request, "seed": i, "out": str(out)}, 0, None)
                                                                 for i, out in enumerate(outs)])
    store = farm.open_store(farm_dir)
    renders.mkdir()
    for record, out in ((first, outs[0]), (second, outs[1])):
        out.write_bytes(b"\0" * 500)
        farm.job_dir(farm_dir, record.id).mkdir(parents=True, exist_ok=True)
        (farm.job_dir(farm_dir, record.id) / "log.txt").write_text("rendered\n")
        result = {"out": str(out), "frames": 16}
        store.update(record.id, state="done", result={**result, "written": farm.written(result)})
    store.update(third.id, state="running")

    assert main(["delete", third.id, "--farm-dir", str(farm_dir)]) == 2  # running: cancel it first
    assert "cancel" in capsys.readouterr().err
    assert main(["delete", first.id, "--farm-dir", str(farm_dir)]) == 0
    assert not outs[0].exists() and not farm.job_dir(farm_dir, first.id).exists()
    assert store.get(first.id).state == "deleted" and store.get(first.id).request == {}
    assert main(["delete", first.id, "--farm-dir", str(farm_dir)]) == 2  # already deleted
    capsys.readouterr()

    time.sleep(1.1)
    assert main(["gc", "--farm-dir", str(farm_dir), "--retain-outputs", "1s", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["dry_run"] and [d["id"] for d in planned["deleted"]] == [second.id] and outs[1].exists()
    assert main(["gc", "--farm-dir", str(farm_dir), "--retain-outputs", "1s"]) == 0
    assert f"deleted output {second.id}" in capsys.readouterr().out
    assert not outs[1].exists() and store.get(second.id).state == "deleted"
    assert store.get(third.id).state == "running"  # not finished: kept
    assert [a["id"] for a in Audit(farm_dir).lines()] == [first.id, second.id]
    assert SECRET.encode() in db_bytes(farm_dir / "farm.db")  # the running job still holds its request
    assert main(["gc", "--farm-dir", str(farm_dir), "--retain-outputs", "soon"]) == 2
    assert "retain_outputs: got 'soon'" in capsys.readouterr().err


def _farm_job_done(farm_dir: Path, store, record, files: dict[str, bytes], result: dict) -> Path:
    """A farm job left as a runner leaves it: files in its directory, its result with what it wrote."""
    d = farm.job_dir(farm_dir, record.id)
    for name, data in files.items():
        (d / name).write_bytes(data)
    store.update(record.id, state="done", result={**result, "written": farm.written(result)})
    return d


def test_delete_counts_and_audits_each_file_once(tmp_path, tiny_model, capsys):
    """A farm job's video and preview are in its directory by default, and its result names them too: each is
    counted, deleted and audited once."""
    farm_dir = tmp_path / "farm"
    (record, _), = farm.submit(farm_dir, [({"prompt": "x", "model": tiny_model}, 0, None)])
    store = farm.open_store(farm_dir)
    d = farm.job_dir(farm_dir, record.id)
    _farm_job_done(farm_dir, store, record, {"out.mp4": b"v" * 1000, "preview.png": b"p" * 100,
                                             "result.json": b"{}"},
                   {"out": str(d / "out.mp4"), "preview": str(d / "preview.png"), "frames": 16})
    on_disk = sorted(str(p.relative_to(farm_dir)) for p in d.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert len(on_disk) == 5  # log.txt, request.json, out.mp4, preview.png, result.json
    assert main(["delete", record.id, "--farm-dir", str(farm_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"{record.id} deleted: 5 files, {size} bytes"
    (line,) = Audit(farm_dir).lines()
    assert sorted(line["files"]) == on_disk and line["bytes"] == size and line["kept"] == []
    assert not d.exists()


def test_retention_deletes_only_files_the_job_wrote(tmp_path, tiny_model, capsys):
    """A video outside the job's directory is deleted only while it is the file the job recorded; one that
    was overwritten since (another job, a person) is kept, and the deletion says so."""
    farm_dir, renders = tmp_path / "farm", tmp_path / "renders"
    renders.mkdir()
    mine, replaced, legacy = renders / "mine.mp4", renders / "replaced.mp4", renders / "legacy.mp4"
    jobs = farm.submit(farm_dir, [({"prompt": "x", "model": tiny_model, "seed": i, "out": str(out)}, 0, None)
                                  for i, out in enumerate((mine, replaced, legacy))])
    store = farm.open_store(farm_dir)
    for out in (mine, replaced, legacy):
        out.write_bytes(b"\0" * 700)
    _farm_job_done(farm_dir, store, jobs[0][0], {}, {"out": str(mine), "frames": 16})
    _farm_job_done(farm_dir, store, jobs[1][0], {}, {"out": str(replaced), "frames": 16})
    replaced.write_bytes(b"\1" * 900)  # then another render wrote the same path
    # finished by a runner of an older version, which recorded nothing of what it wrote
    store.update(jobs[2][0].id, state="done", result={"out": str(legacy), "frames": 16})

    assert main(["delete", jobs[0][0].id, "--farm-dir", str(farm_dir)]) == 0
    assert not mine.exists()
    assert main(["delete", jobs[1][0].id, "--farm-dir", str(farm_dir)]) == 0
    assert replaced.read_bytes() == b"\1" * 900  # not the job's file: kept
    out = capsys.readouterr().out
    assert f"kept {replaced} (changed since the job wrote it)" in out
    time.sleep(1.1)
    (swept,) = farm.gc(farm_dir, Retention(outputs="1s"))
    assert swept["id"] == jobs[2][0].id and legacy.exists()
    assert swept["kept"] == [{"file": str(legacy), "why": "the job recorded no size and time for it"}]
    lines = Audit(farm_dir).lines()
    assert [len(a["kept"]) for a in lines] == [0, 1, 1]
    assert str(mine) in lines[0]["files"] and lines[1]["kept"] == [{"file": str(replaced),
                                                                     "why": "changed since the job wrote it"}]


def test_the_sweep_removes_what_a_deleted_job_left_and_partial_uploads(tmp_path, tiny_model):
    """A job deleted while its server died mid-way (or a file written after its deletion) leaves a directory
    behind: the next sweep removes it, with an audit line; so are partial uploads no live upload holds."""
    import os

    data = tmp_path / "serve"
    manager = JobManager(data, None, tiny_model, Limits(max_running=0))
    try:
        job, _ = manager.submit({"prompt": SECRET, "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2})
        assert manager.delete(job["id"]) == "queued"
        left = manager.job_dir(job["id"]) / "checkpoints"
        left.mkdir(parents=True)
        (left / "step-000002.safetensors").write_bytes(b"\0" * 100)
        partial = manager.files.incoming()
        partial.write_bytes(b"\0" * 10)
        os.utime(partial, (time.time() - 3600, time.time() - 3600))  # an upload that died an hour ago
        done = manager.gc()
    finally:
        manager.close()
    assert not manager.job_dir(job["id"]).exists() and not partial.exists()
    assert [(d["id"], d["why"], d["files"]) for d in done] == [
        (job["id"], "left by a deleted job", [f"jobs/{job['id']}/checkpoints/step-000002.safetensors"])]
    assert [(a["id"], a["why"]) for a in Audit(data).lines()][-1] == (job["id"], "left by a deleted job")
