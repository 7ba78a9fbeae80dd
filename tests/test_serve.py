"""The HTTP job API on Ray Serve, on localhost with a tiny model: auth, submit to download, SSE,
idempotency, bad input, cancel, concurrent submits, autoscaling up and back to zero."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from longtake.serve.manager import Limits
from longtake.video import probe

pytestmark = pytest.mark.slow
TOKEN = "test-token-123"
JOB = {"prompt": "a red ball", "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, ray_session, tmp_path_factory):
    from ray import serve

    from longtake.serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    limits = Limits(max_seconds=20, max_steps=10, max_side=128, max_queued=6, max_running=2, max_body_bytes=2048)
    app = build_app(tiny_model, str(tmp_path_factory.mktemp("serve")), TOKEN, "cpu", 0, 2, limits,
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


def test_submit_stream_and_download(server, tmp_path):
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
    done = [e["progress"].get("windows_done", 0) for k, e in events if k == "progress"]
    assert done == sorted(done) and done[-1] == 6  # 3 windows x 2 steps, never backwards
    job = call(server, "GET", f"/v1/videos/{job_id}").json()
    assert job["status"] == "done" and job["result"]["frames"] == 16 and len(job["result"]["frames_sha256"]) == 64

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


def test_idempotent_submit(server):
    first = call(server, "POST", "/v1/videos", json=JOB, headers={"Idempotency-Key": "abc"})
    again = call(server, "POST", "/v1/videos", json={**JOB, "seed": 5}, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
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
    ({**JOB, "bogus": 1}, 422, "bogus"),
    ({**JOB, "prompt": None}, 422, "prompt"),
    ({**JOB, "seconds": "ten"}, 422, "seconds"),
    ([1, 2], 422, "body"),
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
    assert call(server, "GET", "/v1/videos/nope").status_code == 404
    assert call(server, "GET", "/v1/videos").json()["total"] == before


def test_cancel_frees_workers(server):
    r = call(server, "POST", "/v1/videos", json={**JOB, "seconds": 20, "steps": 10})
    job_id = r.json()["id"]
    deadline = time.time() + 120
    while call(server, "GET", f"/v1/videos/{job_id}").json()["progress"].get("windows_done", 0) < 2:
        assert time.time() < deadline
        time.sleep(0.2)
    t0 = time.time()
    assert call(server, "DELETE", f"/v1/videos/{job_id}").json()["status"] == "cancelled"
    while "longtake_workers_busy 0.0" not in call(server, "GET", "/metrics", token=None).text:
        assert time.time() - t0 < 5, "workers still busy 5 s after cancel"
        time.sleep(0.1)
    job = call(server, "GET", f"/v1/videos/{job_id}").json()
    assert job["status"] == "cancelled"
    assert call(server, "GET", f"/v1/videos/{job_id}/content").status_code == 409


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


def test_serve_pool_renders_a_wan_job_like_the_in_process_pool(server, tiny_wan_model, tmp_path, render_in_process):
    """Serve's pool on a tiny-wan Denoiser deployment: predictors without the text encoder (the manager's
    encoder worker encodes), the causal VAE decoded as one Serve stream; the frames of the in-process pool."""
    from ray import serve

    from longtake.cluster.engine import prepare, run
    from longtake.serve.app import Denoiser, ServePool

    req = dict(prompt="a corgi surfing", seconds=2, fps=16, steps=2, window=5, overlap=2, model=tiny_wan_model)
    ref = render_in_process({**req, "out": str(tmp_path / "ref.mp4")})
    handle = serve.run(Denoiser.options(num_replicas=1, autoscaling_config=None).bind(tiny_wan_model, "cpu"),
                       name="wan-denoiser", route_prefix=None)
    try:
        pool = ServePool(handle, 1, tiny_wan_model)
        result = run(prepare({**req, "out": str(tmp_path / "serve.mp4")}), pool, progress=False)
        assert pool._encoder is not None  # encoded here, not on the denoiser
        assert handle.has_text_encoder.remote().result() is False
    finally:
        serve.delete("wan-denoiser")
    assert result.frames == 32 and result.frames_sha256 == ref.frames_sha256
    assert probe(tmp_path / "serve.mp4")["frames"] == 32
