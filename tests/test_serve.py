"""The HTTP job API on Ray Serve, on localhost with a tiny model: auth, submit to download, SSE,
idempotency, bad input, DELETE, concurrent submits, autoscaling up and back to zero, a schema-driven
fuzz run, timeouts and retries of denoiser calls, per-key upload quotas and event-stream caps, the Host
check. The same guards without Ray: tests/test_serve_guards.py."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import numpy as np
import pytest
import requests
from ray import cloudpickle

from longtake.actors.worker import Worker

from longtake.cluster.retention import Retention
from longtake.provenance import load_key, verify
from longtake.serve.manager import Limits, gc
from longtake.video import probe

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Serve replicas cannot import this test module
TOKEN = "test-token-123"
JOB = {"prompt": "a red ball", "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2}
UPLOAD_LIMIT = 2**20
UPLOADS_PER_KEY, UPLOAD_BYTES_PER_KEY, STREAMS_PER_KEY = 6, 3 * UPLOAD_LIMIT, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def server(tiny_model, ray_session, serve_dir):
    from ray import serve

    from longtake.serve.deployments import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    limits = Limits(max_seconds=20, max_steps=10, max_side=128, max_queued=6, max_running=2, max_body_bytes=2048,
                    max_model_evaluations=400, max_upload_bytes=UPLOAD_LIMIT, max_uploads_per_key=UPLOADS_PER_KEY,
                    max_upload_bytes_per_key=UPLOAD_BYTES_PER_KEY, max_event_streams=STREAMS_PER_KEY)
    app = build_app(tiny_model, str(serve_dir), TOKEN, "cpu", 0, 2, limits,
                    downscale_delay_s=5)
    serve.run(app, name="longtake", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def call(base, method, path, token=TOKEN, **kw):
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, base + path, headers=headers, timeout=300, **kw)


def wait_done(base, job_id, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = call(base, "GET", f"/v1/videos/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished: {job}")


def denoiser_replicas() -> int:
    from ray import serve

    states = serve.status().applications["longtake"].deployments["Denoiser"].replica_states
    return sum(n for state, n in states.items() if str(state).endswith("RUNNING"))


def test_auth(server):
    assert call(server, "GET", "/v1/videos", token=None).status_code == 401
    assert call(server, "GET", "/v1/videos", token="wrong").status_code == 403
    assert call(server, "GET", "/v1/videos").status_code == 200
    assert call(server, "GET", "/healthz", token=None).json() == {"ok": True}
    r = call(server, "GET", "/openapi.json", token=None)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert r.json()["info"]["title"] == "longtake"


def test_submit_stream_and_download(server, tmp_path, serve_dir):
    assert denoiser_replicas() == 0  # scaled to zero before any work
    r = call(server, "POST", "/v1/videos", json=JOB)
    assert r.status_code == 202 and set(r.json()) == {"id", "status"}
    job_id = r.json()["id"]
    events = []
    with call(server, "GET", f"/v1/videos/{job_id}/events", stream=True) as stream:
        kind = None
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind == "end":
                    break
    assert events[-1] == ("end", {"id": job_id, "status": "done"})
    done = [e["progress"]["window_steps_done"] or 0 for k, e in events if k == "progress"]
    assert done == sorted(done) and done[-1] == 6  # 3 windows x 2 steps, never backwards
    job = call(server, "GET", f"/v1/videos/{job_id}").json()
    assert job["status"] == "done" and job["result"]["frames"] == 16 and len(job["result"]["frames_sha256"]) == 64
    # one status shape: ISO 8601 UTC times, the full request, numbers for progress; no server path anywhere
    assert job["created"].endswith("Z") and job["request"]["prompt"] == JOB["prompt"]
    assert job["progress"]["frames_done"] == job["progress"]["frames"] == 16
    assert "/" not in job["request"]["model"] and "/" not in job["result"]["model"]
    assert '"/' not in json.dumps(job), job

    video = call(server, "GET", f"/v1/videos/{job_id}/content")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    (tmp_path / "v.mp4").write_bytes(video.content)
    info = probe(tmp_path / "v.mp4")
    assert info["frames"] == 16 and info["fps"] == 8
    part = call(server, "GET", f"/v1/videos/{job_id}/content", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == video.content[:100]
    preview = call(server, "GET", f"/v1/videos/{job_id}/preview")
    assert preview.status_code == 200 and preview.content[:8] == b"\x89PNG\r\n\x1a\n"
    listed = call(server, "GET", "/v1/videos?limit=1").json()
    assert listed["total"] >= 1 and len(listed["data"]) == 1
    # labelled and tagged: the AIGC ProduceID is the job, the integrity code checks under the server's key
    report = verify(tmp_path / "v.mp4", load_key(serve_dir, create=False))
    assert report["aigc"]["ProduceID"] == job_id and report["integrity"] == "intact"
    assert report["visible_label"]["present"] and job["result"]["delivered_sha256"] != job["result"]["frames_sha256"]
    # the workers view: the replicas as they reported themselves (serve_pool.ReplicaBoard), in the job's progress,
    # at /v1/workers and in /metrics
    replicas = call(server, "GET", "/v1/workers").json()["workers"]
    assert replicas and all(r["replica"] and r["node"] and r["state"] in ("idle", "busy") for r in replicas)
    assert sum(r["window_steps"] for r in replicas) >= 6 and sum(r["bytes"] for r in replicas) > 0
    assert {r["replica"] for r in job["progress"]["workers"]} <= {r["replica"] for r in replicas}
    metrics = call(server, "GET", "/metrics").text
    assert all(f'worker="{r["replica"]}"' in metrics for r in replicas), metrics[-2000:]
    assert call(server, "GET", "/v1/workers", token="nope").status_code == 403


def test_idempotent_submit(server):
    first = call(server, "POST", "/v1/videos", json=JOB, headers={"Idempotency-Key": "abc"})
    again = call(server, "POST", "/v1/videos", json=JOB, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = call(server, "POST", "/v1/videos", json={**JOB, "seed": 5}, headers={"Idempotency-Key": "abc"})
    assert other.status_code == 409 and other.json()["detail"]["field"] == "Idempotency-Key"
    assert first.json()["id"] in other.json()["detail"]["error"]
    wait_done(server, first.json()["id"])


@pytest.mark.parametrize("body,status,field", [
    ({**JOB, "seconds": -1}, 422, "seconds"),
    ({**JOB, "seconds": 60}, 422, "seconds"),  # above this server's maximum
    ({**JOB, "steps": 99}, 422, "steps"),
    ({**JOB, "height": 66}, 422, "height"),
    ({**JOB, "width": 1024}, 422, "width"),
    ({**JOB, "overlap": 8}, 422, "overlap"),
    ({**JOB, "out": "/etc/x.mp4"}, 422, "out"),
    ({**JOB, "model": "/somewhere/else"}, 422, "model"),
    ({**JOB, "model": "tiny"}, 422, "model"),
    ({**JOB, "fps": 120}, 422, "fps"),
    ({**JOB, "seconds": 20, "steps": 10, "overlap": 7}, 422, "overlap"),  # a window per latent frame: over the cost limit
    ({**JOB, "seed": 59917355663370183770112}, 422, "seed"),
    ({**JOB, "window": 2**70}, 422, "window"),
    ({**JOB, "bogus": 1}, 422, "bogus"),
    ({**JOB, "image": "/etc/passwd"}, 422, "image"),  # media are never paths on the server's disk
    ({**JOB, "extend": "/etc/hostname"}, 422, "extend"),
    ({**JOB, "keyframes": [{"image": "/etc/passwd", "at": 0}]}, 422, "keyframes[0].image"),
    ({**JOB, "prompt": None}, 422, "prompt"),
    ({**JOB, "seconds": "ten"}, 422, "seconds"),
    ([1, 2], 422, "body"),
    ({"height": False, "prompt": []}, 422, "prompt"),  # a list as the value in an error (found by the fuzz run)
    ({**JOB, "pose": "/etc/passwd"}, 422, "pose"),  # a pose is an uploaded video's id, never a path
    ({**JOB, "pose": "file-000000000000000000000000"}, 422, "pose"),
    ({**JOB, "reference_pose": "/tmp/pose.json"}, 422, "reference_pose"),  # keypoint files: CLI and farm only
    ({**JOB, "workers": 8}, 422, "workers"),
    ({**JOB, "device": "cuda"}, 422, "device"),
    ({**JOB, "cp": 2}, 422, "cp"),  # the server's replicas are its groups (longtake serve --cp)
    ({**JOB, "cp_mode": "ring"}, 422, "cp_mode"),
])
def test_bad_input_is_4xx_and_creates_no_job(server, body, status, field):
    before = call(server, "GET", "/v1/videos").json()["total"]
    r = call(server, "POST", "/v1/videos", json=body)
    assert r.status_code == status, r.text
    assert r.json()["detail"]["field"] == field and field in r.json()["detail"]["error"]
    assert call(server, "GET", "/v1/videos").json()["total"] == before


def test_malformed_and_oversized_bodies(server):
    before = call(server, "GET", "/v1/videos").json()["total"]
    r = call(server, "POST", "/v1/videos", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = call(server, "POST", "/v1/videos", data=json.dumps({**JOB, "prompt": "x" * 5000}))
    assert r.status_code == 413
    assert call(server, "GET", "/v1/videos/0123456789abcdef").status_code == 404
    r = call(server, "GET", "/v1/videos?limt=5")  # a misspelt parameter is an error, not ignored
    assert r.status_code == 422 and r.json()["detail"]["field"] == "limt", r.text
    r = call(server, "GET", "/v1/videos/nope")  # not a job id at all
    assert r.status_code == 422 and r.json()["detail"]["field"] == "job_id", r.text
    # every error has the one documented shape
    for r in (call(server, "GET", "/v1/videos/0123456789abcdef"), call(server, "GET", "/v1/videos", token=None),
              call(server, "GET", "/v1/videos?limit=0"), call(server, "GET", "/no/such/route")):
        assert set(r.json()) == {"detail"} and set(r.json()["detail"]) == {"field", "error"}, r.text
        assert isinstance(r.json()["detail"]["error"], str) and r.json()["detail"]["error"]
    assert call(server, "GET", "/v1/videos").json()["total"] == before


@pytest.mark.parametrize("query", ["offset=59917355663370183770112", "limit=59917355663370183770112", "offset=-1",
                                   "limit=0", "offset=1e3", "limit=abc"])
def test_query_integers_out_of_range_are_422(server, query):
    r = call(server, "GET", f"/v1/videos?{query}")
    assert r.status_code == 422, (r.status_code, r.text)


def test_chunked_body_is_cut_at_the_limit(server):
    """A chunked body with no Content-Length: the server answers 413 once the limit is passed, without
    waiting for the rest (here the rest never comes; reading the whole body first would hang)."""
    host, port = server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/videos HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b" " * 1024
        for _ in range(4):  # 4 kB, twice the limit of this server, and the body is not finished
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = sock.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    from longtake.video import VideoWriter

    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (80, 60), "red").save(d / "start.png")
    with VideoWriter(d / "clip.mp4", 64, 64, 8) as w:
        w.write(np.linspace(0, 255, 12 * 64 * 64 * 3).astype(np.uint8).reshape(12, 64, 64, 3))
    (d / "playlist.m3u8").write_text("#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/a.ts\n")
    return d


def upload(base, path, name=None, token=TOKEN):
    return call(base, "POST", "/v1/files", token=token, files={"file": (name or path.name, path.read_bytes())})


def test_uploaded_files_are_used_by_jobs_by_id(server, media, tiny_model, tmp_path, render_in_process):
    """Upload an image and a video; jobs name them by id and render what the same request with local
    paths renders; a file in use cannot be deleted; a deleted file's id is refused."""
    import hashlib

    image = upload(server, media / "start.png", name="start.mp4")  # the kind comes from the content, not the name
    assert image.status_code == 201, image.text
    meta = image.json()
    assert meta["kind"] == "image" and (meta["width"], meta["height"]) == (80, 60) and meta["filename"] == "start.mp4"
    assert meta["sha256"] == hashlib.sha256((media / "start.png").read_bytes()).hexdigest()
    assert meta["bytes"] == (media / "start.png").stat().st_size and "owner" not in meta and '"/' not in json.dumps(meta)
    assert call(server, "GET", f"/v1/files/{meta['id']}").json() == meta
    clip = upload(server, media / "clip.mp4").json()
    assert clip["kind"] == "video" and clip["seconds"] == pytest.approx(1.5, abs=0.2)

    job = {**JOB, "image": meta["id"], "keyframes": [{"image": meta["id"], "at": 1}]}
    first = call(server, "POST", "/v1/videos", json=job).json()
    assert call(server, "DELETE", f"/v1/files/{meta['id']}").status_code == 409  # a queued or running job uses it
    extended = call(server, "POST", "/v1/videos", json={**JOB, "extend": clip["id"]}).json()
    done = wait_done(server, first["id"]), wait_done(server, extended["id"])
    assert [d["status"] for d in done] == ["done", "done"], [d["error"] for d in done]
    assert done[0]["request"]["image"] == meta["id"]  # the job keeps the ids the client sent
    ref = render_in_process({**job, "model": tiny_model, "out": str(tmp_path / "a.mp4"), "image": str(media / "start.png"),
                             "keyframes": [{"image": str(media / "start.png"), "at": 1}]})
    assert done[0]["result"]["frames_sha256"] == ref.frames_sha256
    assert done[1]["result"]["frames"] == 12 + 16 and done[1]["result"]["input_frames"] == 12

    assert call(server, "DELETE", f"/v1/files/{meta['id']}").json() == {"id": meta["id"], "deleted": True}
    assert call(server, "GET", f"/v1/files/{meta['id']}").status_code == 404
    assert call(server, "DELETE", f"/v1/files/{meta['id']}").status_code == 404
    again = call(server, "POST", "/v1/videos", json=job)
    assert again.status_code == 422 and again.json()["detail"]["field"] == "image"
    wrong_kind = call(server, "POST", "/v1/videos", json={**JOB, "image": clip["id"]})
    assert wrong_kind.status_code == 422 and "an image file (this one is a video)" in wrong_kind.json()["detail"]["error"]


def test_bad_uploads_are_4xx_and_keep_nothing(server, serve_dir, media, tmp_path):
    uploads = serve_dir / "uploads"
    kept = sorted(uploads.iterdir()) if uploads.exists() else []
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really" * 100)
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * (UPLOAD_LIMIT + 10))
    cases = [
        (call(server, "POST", "/v1/files", files={"file": ("x.png", junk.read_bytes())}), 422),
        (upload(server, media / "playlist.m3u8"), 422),  # never follows a playlist's URL
        (upload(server, big), 413),
        (call(server, "POST", "/v1/files", files={"other": ("x.png", (media / "start.png").read_bytes())}), 422),
        (call(server, "POST", "/v1/files", files=[("file", ("a.png", b"1")), ("file", ("b.png", b"2"))]), 422),
        (call(server, "POST", "/v1/files", data=b"raw", headers={"Content-Type": "image/png"}), 415),
        (call(server, "POST", "/v1/files", data=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}), 422),
        (upload(server, media / "start.png", token="wrong"), 403),
    ]
    for r, status in cases:
        assert r.status_code == status, (status, r.status_code, r.text)
        if status == 422:
            assert r.json()["detail"]["field"] == "file" and "file" in r.json()["detail"]["error"]
    assert sorted(p for p in uploads.iterdir() if p.name != ".incoming") == [p for p in kept if p.name != ".incoming"]
    assert not any((uploads / ".incoming").iterdir())  # no partial upload left behind
    assert call(server, "GET", "/v1/files/file-000000000000000000000000").status_code == 404
    assert call(server, "GET", "/v1/files/../jobs.db").status_code == 404
    r = call(server, "POST", "/v1/videos", json={**JOB, "video": "file-000000000000000000000000"})
    assert r.status_code == 422 and "the id of a file you uploaded (POST /v1/files)" in r.json()["detail"]["error"]
    r = call(server, "POST", "/v1/videos", json={**JOB, "image": "/etc/passwd"})  # the value hidden, the route not
    assert r.json()["detail"]["error"].startswith("image: got '<path>'") and r.json()["detail"]["error"].endswith(
        "a file you uploaded (POST /v1/files)"), r.text


def test_cancel_frees_workers(server):
    r = call(server, "POST", "/v1/videos", json={**JOB, "seconds": 20, "steps": 10})
    job_id = r.json()["id"]
    deadline = time.time() + 120
    while (call(server, "GET", f"/v1/videos/{job_id}").json()["progress"]["window_steps_done"] or 0) < 2:
        assert time.time() < deadline
        time.sleep(0.2)
    t0 = time.time()
    assert call(server, "DELETE", f"/v1/videos/{job_id}").json() == {"id": job_id, "status": "deleted",
                                                                      "was": "running"}
    while "longtake_workers_busy 0.0" not in call(server, "GET", "/metrics", token=None).text:
        assert time.time() - t0 < 5, "workers still busy 5 s after cancel"
        time.sleep(0.1)
    for path in ("", "/content", "/preview"):
        assert call(server, "GET", f"/v1/videos/{job_id}{path}").status_code == 410
    assert call(server, "DELETE", f"/v1/videos/{job_id}").status_code == 410
    assert job_id not in [j["id"] for j in call(server, "GET", "/v1/videos?limit=100").json()["data"]]
    done = call(server, "POST", "/v1/videos", json={**JOB, "seed": 77})  # a finished job: deleted, files gone
    assert wait_done(server, done.json()["id"])["status"] == "done"
    assert call(server, "DELETE", f"/v1/videos/{done.json()['id']}").json()["was"] == "done"
    assert call(server, "GET", f"/v1/videos/{done.json()['id']}/content").status_code == 410


def test_concurrent_submits_scale_up_then_down(server):
    before = call(server, "GET", "/v1/videos").json()["total"]
    results = [None] * 20

    def submit(i):
        results[i] = call(server, "POST", "/v1/videos", json={**JOB, "seed": 100 + i})

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = [r.json()["id"] for r in results if r.status_code == 202]
    rejected = [r for r in results if r.status_code == 429]
    assert len(accepted) + len(rejected) == 20 and accepted and len(set(accepted)) == len(accepted)
    assert all(r.headers.get("Retry-After") for r in rejected)
    assert call(server, "GET", "/v1/videos?limit=100").json()["total"] == before + len(accepted)
    peak = 0
    for job_id in accepted:
        peak = max(peak, denoiser_replicas())
        assert wait_done(server, job_id)["status"] == "done"
    assert peak >= 1
    metrics = call(server, "GET", "/metrics", token=None).text
    assert "longtake_frames_rendered_total" in metrics and 'longtake_jobs{state="done"}' in metrics
    deadline = time.time() + 90
    while denoiser_replicas() > 0:  # idle: back to zero
        assert time.time() < deadline, "denoiser did not scale back to zero"
        time.sleep(1)


@pytest.mark.parametrize("cp", [1, 2])
def test_serve_pool_renders_a_wan_job_like_the_in_process_pool(server, tiny_wan_model, tmp_path, render_in_process,
                                                               cp):
    """Serve's pool on a tiny-wan Denoiser deployment: predictors without the text encoder (the manager's
    encoder worker encodes), the causal VAE decoded as one Serve stream; the frames of the in-process pool.
    With cp 2 (`longtake serve --cp 2`) the replica is a group of 2 sharing each window (Ulysses: the same
    frames)."""
    from ray import serve

    from longtake.actors.worker import Worker
    from longtake.cluster.engine import prepare, run
    from longtake.actors.serve_pool import ServePool
    from longtake.serve.deployments import Denoiser, denoiser_options

    req = dict(prompt="a corgi surfing", seconds=2, fps=16, steps=2, window=5, overlap=2, model=tiny_wan_model)
    ref = render_in_process({**req, "out": str(tmp_path / "ref.mp4")})
    handle = serve.run(Denoiser.options(num_replicas=1, autoscaling_config=None, **denoiser_options("cpu", cp))
                       .bind(tiny_wan_model, "cpu", 3, Worker, cp), name="wan-denoiser", route_prefix=None)
    try:
        pool = ServePool(handle, 1, tiny_wan_model)
        result = run(prepare({**req, "cp": cp, "out": str(tmp_path / "serve.mp4")}), pool, progress=False)
        assert pool._encoder is not None  # encoded here, not on the denoiser
        assert handle.info.remote().result()["text_encoder"] is False
    finally:
        serve.delete("wan-denoiser")
    assert result.frames == 32 and result.frames_sha256 == ref.frames_sha256
    assert probe(tmp_path / "serve.mp4")["frames"] == 32


def test_schema_driven_fuzz_never_gets_a_5xx(server):
    """Every operation of the served OpenAPI schema, with valid and invalid generated inputs and a valid
    key: no input produces a 5xx, every response has a documented status, content type and shape, invalid
    inputs are rejected, and a valid render request is accepted (202, 200 or 429) unless it breaks one of
    the rules the schema lists in x-rules (a 422 naming one of that rule's fields). Bounded: a fixed number
    of examples per operation, derandomized."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                     response_schema_conformance, status_code_conformance)

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    body_schema = call(server, "GET", "/openapi.json").json()["paths"]["/v1/videos"]["post"]["requestBody"]
    rule_fields = {f for rule in body_schema["content"]["application/json"]["schema"]["x-rules"] for f in rule["fields"]}
    seen, uploaded, renders = [], [], {GenerationMode.POSITIVE: [], GenerationMode.NEGATIVE: []}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            checks = [not_a_server_error, status_code_conformance, content_type_conformance,
                      response_schema_conformance] + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

            render = (operation.method.upper(), operation.path) == ("POST", "/v1/videos")

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=20 if render else 8, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                r = case.call(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
                seen.append(r.status_code)
                if (case.method, case.path, r.status_code) == ("POST", "/v1/files", 201):
                    uploaded.append(r.json()["id"])
                assert r.status_code < 500, (case.method, case.formatted_path, case.query, case.body, r.text[:500])
                # a body over the server's limit is refused whole (413, documented): a rejection too
                case.validate_response(r, checks=[c for c in checks if not (
                    c is negative_data_rejection and r.status_code == 413)])
                if (case.method, case.path) == ("POST", "/v1/videos"):
                    renders[mode].append(r.status_code)
                    if mode == GenerationMode.POSITIVE and r.status_code not in (200, 202, 429) and not (
                            r.status_code == 409 and r.json()["detail"]["field"] == "Idempotency-Key"):  # key reused
                        field = r.json()["detail"]["field"] or ""
                        assert r.status_code == 422 and field.split("[")[0].split(".")[0] in rule_fields, \
                            (case.body, r.status_code, r.text[:500])
                    if mode == GenerationMode.NEGATIVE:
                        assert 400 <= r.status_code < 500, (case.body, case.headers, case.query, r.status_code, r.text[:300])

            try:
                check()
            except Unsatisfiable:  # no invalid input exists for an operation without parameters
                assert mode == GenerationMode.NEGATIVE and not operation.query and not operation.body
    assert len(seen) > 100 and any(400 <= code < 500 for code in seen)
    accepted = [c for c in renders[GenerationMode.POSITIVE] if c in (200, 202, 429)]
    assert len(renders[GenerationMode.POSITIVE]) >= 15 and accepted, renders  # the render path is reached
    for job in call(server, "GET", "/v1/videos?limit=100").json()["data"]:  # what the fuzzer queued
        call(server, "DELETE", f"/v1/videos/{job['id']}")
    for file_id in uploaded:  # and uploaded (against the admin key's upload quota, which later tests use)
        call(server, "DELETE", f"/v1/files/{file_id}")


def test_a_denoiser_that_cannot_be_scheduled_fails_the_call_in_time(server, tiny_model):
    """Scale-up to a replica no node can hold: the call times out with a clear error, never hangs."""
    from ray import serve

    from longtake.actors.pool import WindowFailed
    from longtake.actors.serve_pool import ServePool
    from longtake.serve.deployments import Denoiser

    handle = serve.run(Denoiser.options(
        autoscaling_config={"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "upscale_delay_s": 0},
        ray_actor_options={"num_cpus": 1, "resources": {"no-such-node": 1}}).bind(tiny_model, "cpu"),
        name="unschedulable", route_prefix=None)
    try:
        pool = ServePool(handle, 1, tiny_model, timeout_s=3)
        t0 = time.time()
        with pytest.raises(WindowFailed, match="no denoiser answered in 3 s"):
            pool.call("info")
        with pytest.raises(WindowFailed, match="decode_stream: no denoiser answered in 3 s"):
            next(pool.stream("decode_stream", (None, 4)))  # a streamed decode times out too
        assert time.time() - t0 < 40
    finally:
        serve.delete("unschedulable")


class FlakyWorker(Worker):
    """Fails its first two predictions (per process), then works."""

    failed = 0

    def predict(self, *args):
        if FlakyWorker.failed < 2:
            FlakyWorker.failed += 1
            raise RuntimeError("injected fault")
        return super().predict(*args)


def test_an_expired_output_answers_410_gone(server, serve_dir):
    job_id = call(server, "POST", "/v1/videos", json={**JOB, "seed": 91}).json()["id"]
    assert wait_done(server, job_id)["status"] == "done"
    swept = gc(serve_dir, Retention(outputs="1s"), now=time.time() + 5)  # what the server's sweep does, a clock ahead
    assert job_id in [d["id"] for d in swept if d["what"] == "output"]
    for path in ("", "/content", "/preview"):
        r = call(server, "GET", f"/v1/videos/{job_id}{path}")
        assert r.status_code == 410 and "expired" in r.text, r.text
    assert job_id not in [j["id"] for j in call(server, "GET", "/v1/videos?limit=100").json()["data"]]


def test_failed_windows_are_retried_and_a_failing_replica_is_replaced(server, tiny_model, tmp_path, render_in_process):
    from ray import serve

    from longtake.cluster.engine import prepare, run
    from longtake.actors.serve_pool import ServePool
    from longtake.serve.deployments import Denoiser

    req = dict(JOB, model=tiny_model)
    ref = render_in_process({**req, "out": str(tmp_path / "ref.mp4")})
    handle = serve.run(Denoiser.options(num_replicas=1, autoscaling_config=None, health_check_period_s=1).bind(
        tiny_model, "cpu", 2, FlakyWorker), name="flaky", route_prefix=None)
    try:
        first = handle.info.remote().result()
        pool = ServePool(handle, 1, tiny_model, max_attempts=3)
        result = run(prepare({**req, "out": str(tmp_path / "serve.mp4")}), pool, progress=False)
        assert pool.retries == 2 and result.frames_sha256 == ref.frames_sha256
        # two failed calls: the replica reports itself unhealthy and Serve replaces it
        deadline = time.time() + 60
        while True:
            try:
                now = handle.info.remote().result(timeout_s=5)
                if now["pid"] != first["pid"]:
                    break
            except Exception:
                pass  # being replaced
            assert time.time() < deadline, "the failing replica was not replaced"
            time.sleep(0.5)
        assert now["failures"] == 0
    finally:
        serve.delete("flaky")


def test_jobs_share_the_denoisers_shortest_first_and_none_stops(tiny_model):
    """The ServePool's budget (2 calls per replica for all jobs): a job alone has all of it; with others,
    the job with the fewest window predictions left has all but one per other job, each other job one."""
    import threading

    from longtake.actors.serve_pool import ServePool

    pool = ServePool(None, 2, tiny_model)  # no call is sent: only the shares are read
    shares, ready, go = {}, threading.Barrier(3), threading.Event()

    def job(name, total, todo):
        state = pool.begin_job(total)
        for i in range(todo):
            pool.submit("predict", (i,), key=(0, i))
        ready.wait()
        go.wait()
        shares[name] = pool._share(state)
        ready.wait()

    threads = [threading.Thread(target=job, args=("long", 600, 5)), threading.Thread(target=job, args=("short", 40, 5))]
    for t in threads:
        t.start()
    ready.wait()
    go.set()
    ready.wait()
    for t in threads:
        t.join()
    assert pool.per_job == 4
    assert shares["short"] == 3 and shares["long"] == 1  # the short job first, the long one never stopped
    # the finished threads' tickets went with them (weakly held): a new job runs alone, with all of it
    import gc

    gc.collect()
    state = pool.begin_job(None)
    pool.submit("predict", (0,))
    assert list(pool._jobs) == [state] and pool._share(state) == 4


def test_one_jobs_text_encoding_does_not_stall_the_other_jobs(tiny_wan_model):
    """Wan's UMT5 encodes in the manager (the ServePool's own encoder): while one job encodes (seconds to
    minutes for a real UMT5-XXL on a CPU), other jobs still begin, share the denoisers and step."""
    import threading

    from longtake.actors.serve_pool import ServePool

    pool = ServePool(None, 2, tiny_wan_model)  # the denoisers do not encode this family: the pool does
    assert "encode" not in pool.spec.roles
    entered, release = threading.Event(), threading.Event()

    class BlockingEncoder:
        def encode(self, *args):
            entered.set()
            release.wait(60)
            return "conditioning"

    pool._encoder = BlockingEncoder()
    encoding = threading.Thread(target=lambda: pool.encode(["a cat"], "", None), daemon=True)
    encoding.start()
    assert entered.wait(10)
    shares = []

    def other_job():
        state = pool.begin_job(10)
        pool.submit("predict", (0,))
        shares.append(pool._share(state))

    other = threading.Thread(target=other_job, daemon=True)
    other.start()
    other.join(5)
    stalled = other.is_alive()
    release.set()
    encoding.join(10)
    assert not stalled and shares == [pool.per_job], "another job waited for the encode"


def test_the_schema_documents_the_body_with_this_servers_limits(server, tiny_model):
    """The body of POST /v1/videos is typed: every field's bound, this server's limits and the model's size
    multiple, the server-chosen fields left out, the label this server refuses left out, bearer keys."""
    spec = call(server, "GET", "/openapi.json", token=None).json()
    body = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]["schema"]

    def value(name):
        prop = body["properties"][name]
        return next((b for b in prop.get("anyOf", []) if b.get("type") != "null"), prop)

    assert value("seconds")["maximum"] == 20 and value("seconds")["exclusiveMinimum"] == 0  # Limits(max_seconds=20)
    assert value("steps") == {**value("steps"), "minimum": 1, "maximum": 10}
    from pathlib import Path

    from longtake.pipelines import inspect_model

    multiple = inspect_model(tiny_model).layout.pixel_multiple
    assert value("height")["maximum"] == 128 and value("height")["multipleOf"] == multiple
    assert body["properties"]["label"]["enum"] == ["start", "always"]  # no --allow-unlabelled
    assert body["properties"]["model"]["enum"] == [Path(tiny_model).name]
    assert not {"out", "preview", "device", "workers", "reference_pose"} & set(body["properties"])
    assert value("pose")["pattern"] == value("reference")["pattern"] == value("image")["pattern"]
    assert body["additionalProperties"] is False and body["x-rules"]
    assert value("image")["pattern"].startswith("^file-")
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                assert operation["security"] == [{"key": []}], (method, path)
                for code, response in operation["responses"].items():
                    if code.startswith("4"):
                        assert response["content"]["application/json"]["schema"] == {
                            "$ref": "#/components/schemas/Error"}, (method, path, code)
    for name in ("Job", "JobList", "Accepted", "Changed", "FileMeta", "Links", "Me", "Error"):
        assert name in spec["components"]["schemas"]


def test_keys_own_their_jobs_files_and_limits(server, serve_dir, media):
    """Client keys (hashed on disk): a job, its files, its log and its uploads are 404 to another client,
    an admin key sees all, idempotency keys are per client, each key has its own job limit (429 with
    Retry-After), and a revoked key is refused."""
    from longtake.serve.keys import KeyStore

    keys = KeyStore(serve_dir)
    alice, bob, boss = keys.add("alice"), keys.add("bob", max_jobs=1), keys.add("boss", admin=True)
    on_disk = (serve_dir / "api_keys.json").read_text()
    assert alice not in on_disk and bob not in on_disk and boss not in on_disk and "sha256" in on_disk
    assert oct((serve_dir / "api_keys.json").stat().st_mode & 0o777) == "0o600"
    assert call(server, "GET", "/v1/me", token=bob).json() == {"name": "bob", "admin": False, "max_jobs": 1}

    mine = call(server, "POST", "/v1/videos", token=alice, json={**JOB, "seed": 5}, headers={"Idempotency-Key": "k1"})
    job_id = mine.json()["id"]
    theirs = call(server, "POST", "/v1/videos", token=bob, json={**JOB, "seed": 5}, headers={"Idempotency-Key": "k1"})
    assert mine.status_code == theirs.status_code == 202 and theirs.json()["id"] != job_id  # same key, two clients
    assert call(server, "GET", f"/v1/videos/{job_id}", token=alice).json()["client"] == "alice"
    for method, path in (("GET", ""), ("GET", "/content"), ("GET", "/preview"), ("GET", "/log"), ("GET", "/events"),
                         ("POST", "/links"), ("POST", "/cancel"), ("DELETE", "")):
        r = call(server, method, f"/v1/videos/{job_id}{path}", token=bob)
        assert r.status_code == 404, (method, path, r.status_code, r.text)  # 404, not 403: ids do not leak
    assert job_id not in [j["id"] for j in call(server, "GET", "/v1/videos?limit=100", token=bob).json()["data"]]
    listed = call(server, "GET", "/v1/videos?limit=100", token=boss).json()["data"]
    assert {job_id, theirs.json()["id"]} <= {j["id"] for j in listed}  # an admin sees every client's
    assert call(server, "GET", f"/v1/videos/{job_id}", token=boss).status_code == 200

    # bob may have one job at once: a second is 429 with Retry-After, and nothing is queued
    full = call(server, "POST", "/v1/videos", token=bob, json={**JOB, "seed": 6})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) > 0 and "bob" in full.json()["detail"]["error"]

    # uploads: bob's file is not alice's to use or see
    upload = call(server, "POST", "/v1/files", token=bob, files={"file": ("s.png", (media / "start.png").read_bytes())})
    file_id = upload.json()["id"]
    assert call(server, "GET", f"/v1/files/{file_id}", token=alice).status_code == 404
    assert call(server, "DELETE", f"/v1/files/{file_id}", token=alice).status_code == 404
    r = call(server, "POST", "/v1/videos", token=alice, json={**JOB, "image": file_id})
    assert r.status_code == 422 and r.json()["detail"]["field"] == "image"

    # cancel: alice's job stops, a second cancel is 409, the log says so; the admin deletes bob's
    assert call(server, "POST", f"/v1/videos/{job_id}/cancel", token=alice).json()["status"] == "cancelled"
    assert call(server, "POST", f"/v1/videos/{job_id}/cancel", token=alice).status_code == 409
    assert "cancelled on request" in call(server, "GET", f"/v1/videos/{job_id}/log", token=alice).text
    assert call(server, "DELETE", f"/v1/videos/{theirs.json()['id']}", token=boss).json()["was"] in ("queued", "running")
    assert call(server, "POST", "/v1/videos", token=bob, json={**JOB, "seed": 6}).status_code == 202  # room again
    keys.revoke("bob")
    assert call(server, "GET", "/v1/videos", token=bob).status_code == 403
    assert call(server, "GET", "/v1/videos", token=alice).status_code == 200
    for job in call(server, "GET", "/v1/videos?limit=100", token=boss).json()["data"]:
        if job["client"] == "bob":
            call(server, "DELETE", f"/v1/videos/{job['id']}", token=boss)


def test_signed_links_play_the_video_without_the_key(server):
    job_id = call(server, "POST", "/v1/videos", json={**JOB, "seed": 12}).json()["id"]
    assert call(server, "POST", f"/v1/videos/{job_id}/links").status_code in (409, 200)  # 409 until done
    assert wait_done(server, job_id)["status"] == "done"
    links = call(server, "POST", f"/v1/videos/{job_id}/links").json()
    assert "token" not in links["content"] and TOKEN not in json.dumps(links)
    video = requests.get(server + links["content"], timeout=60)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    part = requests.get(server + links["content"], headers={"Range": "bytes=10-19"}, timeout=60)
    assert part.status_code == 206 and part.content == video.content[10:20]
    assert requests.get(server + links["preview"], timeout=60).content[:4] == b"\x89PNG"
    tampered = links["content"][:-1] + ("0" if links["content"][-1] != "0" else "1")
    assert requests.get(server + tampered, timeout=60).status_code == 401
    other = call(server, "POST", "/v1/videos", json={**JOB, "seed": 13}).json()["id"]  # a link names one job
    assert requests.get(server + links["content"].replace(job_id, other), timeout=60).status_code == 401
    sig = links["content"].split("link=")[1].split(".")[1]
    stale = f"/v1/videos/{job_id}/content?link=1000.{sig}"  # expired (and so not signed for that time either)
    assert requests.get(server + stale, timeout=60).status_code == 401
    call(server, "DELETE", f"/v1/videos/{other}")


def test_security_headers_and_no_cors(server):
    for path, token in (("/", None), ("/static/app.js", None), ("/v1/videos", TOKEN), ("/openapi.json", None)):
        r = call(server, "GET", path, token=token, headers={"Origin": "https://evil.example"})
        assert r.status_code == 200, (path, r.status_code)
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "Access-Control-Allow-Origin" not in r.headers
    page = call(server, "GET", "/", token=None).text
    assert "<script src=" in page and "<script>" not in page and " style=" not in page and "http" not in page.split(
        "<body")[1]  # no inline script or style, nothing from elsewhere
    preflight = requests.options(server + "/v1/videos", headers={"Origin": "https://evil.example",
                                                                  "Access-Control-Request-Method": "POST"}, timeout=30)
    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert call(server, "GET", "/static/..%2Fapp.py", token=None).status_code == 404


def _head_only(base, head: str) -> str:
    """Send a request's head and never its body; the answer (a check made before the body is read)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    return answer.decode(errors="replace")


def test_upload_quotas_per_key(server, serve_dir, media, tmp_path):
    """A key holds at most max_upload_bytes_per_key bytes (413) and max_uploads_per_key files (429) of
    uploads, both named in the error; checked before the body is read when the Content-Length says enough,
    and the bytes again while it streams; nothing partial is kept; another key's quota is its own."""
    from PIL import Image

    from longtake.serve.keys import KeyStore

    key = KeyStore(serve_dir).add("quota")
    big = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (540, 540, 3), dtype=np.uint8)).save(big)
    assert 0.8 * UPLOAD_LIMIT < big.stat().st_size < UPLOAD_LIMIT  # three fit in 3 MiB, a fourth does not
    kept = [upload(server, big, token=key) for _ in range(3)]
    assert [r.status_code for r in kept] == [201] * 3, kept[-1].text
    over = upload(server, big, token=key)  # within the Content-Length slack: cut while it streams
    assert over.status_code == 413 and "max_upload_bytes_per_key" in over.json()["detail"]["error"], over.text
    assert over.json()["detail"]["field"] == "file"
    host = server.rsplit("/", 1)[1]
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nContent-Type: "
            f"multipart/form-data; boundary=x\r\nContent-Length: {int(1.9 * UPLOAD_LIMIT)}\r\n\r\n")
    answer = _head_only(server, head)  # more than the room left: refused before any of the body
    assert answer.startswith("HTTP/1.1 413") and "max_upload_bytes_per_key" in answer, answer[:300]
    assert upload(server, media / "start.png").status_code == 201  # another key (the admin's) is not full

    for r in kept:
        assert call(server, "DELETE", f"/v1/files/{r.json()['id']}", token=key).status_code == 200
    small = [upload(server, media / "start.png", token=key) for _ in range(UPLOADS_PER_KEY)]
    assert [r.status_code for r in small] == [201] * UPLOADS_PER_KEY
    full = upload(server, media / "start.png", token=key)
    assert full.status_code == 429 and "max_uploads_per_key" in full.json()["detail"]["error"], full.text
    answer = _head_only(server, head.replace(str(int(1.9 * UPLOAD_LIMIT)), "100"))
    assert answer.startswith("HTTP/1.1 429") and "max_uploads_per_key" in answer, answer[:300]
    assert not any((serve_dir / "uploads" / ".incoming").iterdir())  # nothing partial kept
    for r in small:
        call(server, "DELETE", f"/v1/files/{r.json()['id']}", token=key)
    assert upload(server, media / "start.png", token=key).status_code == 201  # room again


def test_an_uploaded_playlist_is_422_naming_the_field(server, tmp_path):
    playlist = tmp_path / "list.ffconcat"
    playlist.write_text("ffconcat version 1.0\nfile 'content'\n")
    r = upload(server, playlist)
    assert r.status_code == 422 and r.json()["detail"]["field"] == "file" and "playlists" in r.text, r.text


def test_event_streams_are_capped_per_key(server, serve_dir):
    """At most max_event_streams open streams per key (429 naming the limit, then room again once one is
    closed); every stream of the job, of any key, gets its events to the end."""
    from longtake.serve.keys import KeyStore

    key = KeyStore(serve_dir).add("watcher")
    job_id = call(server, "POST", "/v1/videos", token=key, json={**JOB, "seconds": 20, "steps": 10}).json()["id"]
    path = f"/v1/videos/{job_id}/events"

    def open_stream(token):
        """(response, its lines), the first line read (the stream is open); one iterator per response: dropping
        an iterator of requests' closes the connection."""
        response = call(server, "GET", path, token=token, stream=True)
        lines = response.iter_lines(decode_unicode=True)
        if response.status_code == 200:
            assert next(lines).startswith("event: progress")
        return response, lines

    def until_end(lines) -> dict:
        for line in lines:
            if line.startswith("data: ") and '"status"' in line and '"progress"' not in line:
                return json.loads(line[6:])
        raise AssertionError("no end event")

    streams = [open_stream(key) for _ in range(STREAMS_PER_KEY)]
    assert [r.status_code for r, _ in streams] == [200] * STREAMS_PER_KEY
    full = call(server, "GET", path, token=key, stream=True)
    assert full.status_code == 429, full.status_code  # (a stream would never end: not read)
    assert "max_event_streams" in full.json()["detail"]["error"], full.text
    admin = open_stream(TOKEN)  # another key has streams of its own
    assert admin[0].status_code == 200
    streams[0][0].close()  # a closed stream frees its place (when the server sees the connection go)
    deadline = time.time() + 60
    again = open_stream(key)
    while again[0].status_code == 429 and time.time() < deadline:
        time.sleep(0.5)
        again = open_stream(key)
    assert again[0].status_code == 200
    assert call(server, "POST", f"/v1/videos/{job_id}/cancel", token=key).status_code == 200
    for response, lines in (streams[1], admin, again):
        assert until_end(lines) == {"id": job_id, "status": "cancelled"}
        response.close()
    call(server, "DELETE", f"/v1/videos/{job_id}", token=key)


def test_only_the_served_host_names_are_answered(server):
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name as Host: 421."""
    port = server.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        assert call(server, "GET", "/v1/me", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}"):
        for path, token in (("/v1/videos", TOKEN), ("/", None), ("/openapi.json", None), ("/static/app.js", None)):
            r = call(server, "GET", path, token=token, headers={"Host": host})
            assert r.status_code == 421 and r.json()["detail"]["field"] == "Host", (host, path, r.status_code)
    assert call(server, "GET", "/healthz", token=None, headers={"Host": "10.1.2.3:8000"}).json() == {"ok": True}


def test_a_story_renders_its_shots_as_jobs_and_joins_the_film(server, serve_dir, media):
    """POST /v1/stories: shots as the client's jobs (a continue waits for its shot), the film and its OTIO
    once they are done; bad stories are 422 naming the shot and field, and nothing is queued."""
    import opentimelineio as otio

    story = {"style": "on a blue background", "steps": 2, "window": 8, "overlap": 2, "fps": 8,
             "shots": [{"id": "a", "prompt": "a red ball", "seconds": 1},
                       {"id": "b", "prompt": "a red ball moving up", "seconds": 1, "begin": "continue"},
                       {"id": "c", "prompt": "a green ball", "seconds": 1, "begin": {"dissolve": 0.5}}]}
    before = call(server, "GET", "/v1/videos").json()["total"]
    picture = upload(server, media / "start.png").json()["id"]
    for change, field in ((lambda s: s["shots"][1].update(begin={"continue": "zz"}), "shots[1] (b).begin"),
                          (lambda s: s.update(characters={"hero": {"prompt": "a ball"}}), "characters.hero"),
                          (lambda s: (s.update(characters={"hero": {"image": picture}}),
                                      s["shots"][0].update(characters=["hero"])), "shots[0] (a).characters"),
                          (lambda s: s["shots"][2].update(seconds=60), "shots[2] (c).seconds")):
        bad = json.loads(json.dumps(story))
        change(bad)
        r = call(server, "POST", "/v1/stories", json=bad)
        assert r.status_code == 422 and r.json()["detail"]["field"] == field, r.text
    assert call(server, "GET", "/v1/videos").json()["total"] == before  # nothing queued
    r = call(server, "POST", "/v1/stories", json=story)
    assert r.status_code == 202, r.text
    created = r.json()
    assert [s["id"] for s in created["shots"]] == ["a", "b", "c"]
    jobs = {s["id"]: s["job"] for s in created["shots"]}
    shot_b = call(server, "GET", f"/v1/videos/{jobs['b']}").json()
    assert shot_b["depends"] == [jobs["a"]] and shot_b["story"]["shot"] == "b"
    assert shot_b["request"]["extend"] == f"job:{jobs['a']}"  # no server path in what a client reads
    deadline = time.time() + 240
    while (status := call(server, "GET", f"/v1/stories/{created['id']}").json())["status"] not in ("done", "failed"):
        assert time.time() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "done" and status["frames"] == 8 + 8 + 8 - 4, status
    film = call(server, "GET", f"/v1/stories/{created['id']}/content")
    assert film.status_code == 200 and film.headers["content-type"] == "video/mp4"
    path = serve_dir / "film.mp4"
    path.write_bytes(film.content)
    assert probe(path)["frames"] == 20
    timeline = otio.adapters.read_from_string(call(server, "GET", f"/v1/stories/{created['id']}/otio").text)
    clips = [i for i in timeline.tracks[0] if isinstance(i, otio.schema.Clip)]
    assert [c.media_reference.target_url for c in clips] == [f"/v1/videos/{jobs[s]}/content" for s in "abc"]
    assert timeline.duration().value == 20
    other = call(server, "GET", f"/v1/stories/{created['id']}", token="wrong")
    assert other.status_code == 403
    assert call(server, "GET", "/v1/stories/0123456789abcdef").status_code == 404
