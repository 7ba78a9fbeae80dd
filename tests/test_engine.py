"""End to end on a tiny AnimateDiff model: pools agree byte for byte, the MP4 has the frames and fps asked
for, timelines, hooks, model options. (Parity with diffusers is in the conformance suite, test_families.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.engine import prepare, run
from longtake.video import probe, read_frames


def _request(model, out, **kw):
    base = dict(prompt="a red ball moving right", seconds=3, fps=8, steps=3, window=8, overlap=3, model=model,
                out=str(out))
    return {**base, **kw}


@pytest.fixture(scope="module")
def inproc_pool(tiny_model):
    pool = InProcessPool(WorkerSpec(tiny_model))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def ray_pools(tiny_model, ray_session):
    from longtake.actors.ray_pool import RayPool

    pools = {n: RayPool(WorkerSpec(tiny_model), n) for n in (1, 2)}
    yield pools
    for pool in pools.values():
        pool.shutdown()


def _render(pool, req):
    chunks = []
    result = run(prepare(req), pool, progress=False, on_frames=lambda first, f: chunks.append((first, f.copy())))
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks)
    return result, np.concatenate([c[1] for c in chunks])


@pytest.mark.parametrize("weighting,noise", [("pyramid", "independent"), ("overlap-linear", "freenoise"),
                                            ("pyramid", "correlated")])
def test_pools_give_identical_frames(tmp_path, tiny_model, inproc_pool, ray_pools, weighting, noise):
    req = _request(tiny_model, tmp_path / "x.mp4", weighting=weighting, noise=noise)
    ref, ref_frames = _render(inproc_pool, req)
    assert ref.windows == 5 and ref.frames == 24  # 24 frames, window 8, stride 5: 0,5,10,15 and the tail 16
    assert ref.model_evaluations == 3 * 5
    for n, pool in ray_pools.items():
        queued = []  # the pool's queued and running tasks after each window was submitted
        submit = pool.submit
        pool.submit = lambda method, *a, **kw: (submit(method, *a, **kw),
                                                method == "predict" and queued.append(pool.outstanding))[0]
        try:
            res, frames = _render(pool, {**req, "out": str(tmp_path / f"ray{n}.mp4")})
        finally:
            del pool.submit
        # 5 windows ready at step 0, but only the inputs the workers can start are built (2 per worker)
        assert len(queued) == 15 and max(queued) == 2 * n, queued
        assert res.workers == n
        assert res.frames_sha256 == ref.frames_sha256, f"{n} Ray workers differ from the in-process pool"
        assert np.array_equal(frames, ref_frames)
    # the hash is of the decoded frames, in order, as given to the encoder
    import hashlib

    assert hashlib.sha256(ref_frames.tobytes()).hexdigest() == ref.frames_sha256


@pytest.mark.slow
def test_different_seed_or_prompt_changes_frames(tmp_path, tiny_model, inproc_pool):
    a, _ = _render(inproc_pool, _request(tiny_model, tmp_path / "a.mp4"))
    b, _ = _render(inproc_pool, _request(tiny_model, tmp_path / "b.mp4", seed=1))
    c, _ = _render(inproc_pool, _request(tiny_model, tmp_path / "c.mp4", prompt="a blue square"))
    assert len({a.frames_sha256, b.frames_sha256, c.frames_sha256}) == 3


@pytest.mark.slow
def test_mp4_frame_count_fps_and_format(tmp_path, tiny_model, inproc_pool):
    out = tmp_path / "clip.mp4"
    result, frames = _render(inproc_pool, _request(tiny_model, out, seconds=2.5, fps=12, preview=str(tmp_path / "p.png")))
    info = probe(out)
    assert info["frames"] == 30 == result.frames  # round(2.5 * 12)
    assert info["fps"] == 12
    assert (info["width"], info["height"]) == (64, 64)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["faststart"]
    decoded = read_frames(out)
    assert decoded.shape == frames.shape
    d = lambda x, y: np.abs(x.astype(float) - y.astype(float)).mean()
    # H.264 4:2:0 is lossy (the tiny random model renders near-noise), but each frame is its own frame
    assert d(decoded, frames) < 0.7 * d(decoded, np.roll(frames, 1, axis=0))
    assert (tmp_path / "p.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "p.png"]  # no partial files left


@pytest.mark.slow
def test_timeline_interpolates_between_prompts(tmp_path, tiny_model, inproc_pool):
    keys = [{"at": 0, "prompt": "a red ball"}, {"at": 2, "prompt": "a blue square"}]
    tl, tl_frames = _render(inproc_pool, {**_request(tiny_model, tmp_path / "t.mp4", prompt=None, timeline=keys)})
    red, red_frames = _render(inproc_pool, _request(tiny_model, tmp_path / "r.mp4", prompt="a red ball"))
    blue, blue_frames = _render(inproc_pool, _request(tiny_model, tmp_path / "b.mp4", prompt="a blue square"))
    # the timeline starts on the first prompt and ends (from 2 s on) on the second: its frames are closer
    # to the red render at the start and to the blue render at the end
    d = lambda x, y: np.abs(x.astype(float) - y.astype(float)).mean()
    assert d(tl_frames[:3], red_frames[:3]) < d(tl_frames[:3], blue_frames[:3])
    assert d(tl_frames[-3:], blue_frames[-3:]) < d(tl_frames[-3:], red_frames[-3:])
    assert len({tl.frames_sha256, red.frames_sha256, blue.frames_sha256}) == 3


@pytest.mark.slow
def test_python_api_render(tmp_path, tiny_model):
    import longtake

    out = tmp_path / "api.mp4"
    result = longtake.render(_request(tiny_model, out, seconds=1.5), in_process=True)
    assert result.frames == 12 and result.out == str(out) and out.is_file()
    with pytest.raises(longtake.RequestError, match=r"^fps: got -8.0, expected"):
        longtake.render(_request(tiny_model, out, fps=-8))


@pytest.mark.slow
def test_a_short_cpu_job_of_a_small_model_renders_in_process_by_default(tmp_path, tiny_model, monkeypatch):
    import longtake
    from longtake.cluster import runtime

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = lambda **kw: prepare(_request(tiny_model, tmp_path / "x.mp4", **{"seconds": 1.5, "device": "cpu", **kw}))
    assert "rendering in this process" in runtime.local_reason(job())
    # a worker count, a cluster, a long job or a large model: Ray
    assert runtime.local_reason(job(workers=2)) is None
    assert runtime.local_reason(job(), address="10.0.0.1:6379") is None
    long = job(seconds=600)
    assert len(long.windows) * long.steps > runtime.LOCAL_MAX_WINDOW_STEPS and runtime.local_reason(long) is None
    monkeypatch.setattr(runtime, "LOCAL_MAX_MODEL_MB", runtime.model_mb(tiny_model) / 2)
    assert runtime.local_reason(job()) is None
    monkeypatch.undo()
    # the default path: no Ray started, one worker, the frames of the explicit in-process render
    result = longtake.render(_request(tiny_model, tmp_path / "a.mp4", seconds=1.5, device="cpu"))
    reference = longtake.render(_request(tiny_model, tmp_path / "b.mp4", seconds=1.5, device="cpu"), in_process=True)
    assert result.workers == 1 and "ray_start_s" not in result.timings
    assert result.frames_sha256 == reference.frames_sha256


@pytest.mark.slow
def test_progress_and_cancel_hooks(tmp_path, tiny_model, inproc_pool):
    from longtake.cluster.engine import Cancelled

    events = []
    req = _request(tiny_model, tmp_path / "p.mp4")
    run(prepare(req), inproc_pool, progress=False, on_progress=events.append)
    assert set(events[0]) == {"phase", "step", "steps", "window_steps_done", "window_steps_total", "frames_done",
                              "frames", "eta_s", "windows", "running", "workers"}
    denoise = [e for e in events if e["phase"] == "denoise"]
    # a report after each prediction (5 windows x 3 steps, in order), and after range steps the sampler's
    # threads finished (the coherent step may have advanced)
    done = [e["window_steps_done"] for e in denoise]
    assert done == sorted(done) and set(done) == set(range(1, 16))
    # the window x step grid: each window's steps predicted (one more cell each report), the running ones ahead
    assert all(sum(e["windows"]) == e["window_steps_done"] for e in denoise) and denoise[-1]["windows"] == [3] * 5
    assert all(e["step"] <= min(e["windows"]) for e in denoise)  # no step counted before its windows predicted it
    assert all(e["windows"][w] < 3 for e in denoise for w in e["running"])
    # the pool's one worker, in this process: every prediction counted on it
    first, last = denoise[0]["workers"], denoise[-1]["workers"]
    assert [w["node"] for w in last] == ["in-process"] and last[0]["window_steps"] - first[0]["window_steps"] == 14
    assert {e["window_steps_total"] for e in events} == {15}
    # `step` counts the steps every frame has completed (what a checkpoint would save): 0 until the first
    # step's last window is fused and stepped (one worker runs the lowest step first)
    steps = [e["step"] for e in denoise]
    assert steps == sorted(steps) and steps[:4] == [0] * 4 and steps[-1] == 3
    assert denoise[-1]["eta_s"] == 0
    decode = [e for e in events if e["phase"] == "decode"]
    assert decode and all(e["step"] == 3 for e in decode) and decode[-1]["frames_done"] == 24
    # the last call, after the MP4 is written, has the final numbers (a throttling caller keeps it: new phase)
    assert {k: v for k, v in events[-1].items() if k not in ("workers", "running")} == {
        "phase": "done", "step": 3, "steps": 3, "window_steps_done": 15, "window_steps_total": 15, "frames_done": 24,
        "frames": 24, "eta_s": 0, "windows": [3] * 5}
    assert [e["phase"] for e in events].count("done") == 1

    out = tmp_path / "c.mp4"
    seen = []
    with pytest.raises(Cancelled):
        run(prepare(_request(tiny_model, out)), inproc_pool, progress=False, on_progress=seen.append,
            cancelled=lambda: len(seen) >= 4)
    assert len(seen) == 4 and not out.exists() and list(tmp_path.glob(".c.mp4*")) == []


def test_range_steps_on_the_samplers_threads_give_the_same_frames(tmp_path, tiny_model, inproc_pool, monkeypatch):
    """engine.SAMPLER_THREADS (one per 4 cores): fusion and scheduler steps per frame range on threads,
    collected between the pool's results, give the frames of one thread (a loop and a plain clip)."""
    from longtake.cluster import engine

    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(engine, "SAMPLER_THREADS", threads)
        for loop in (False, True):
            req = {**_request(tiny_model, tmp_path / f"t{threads}{loop}.mp4"), "loop": loop}
            results[threads, loop] = run(prepare(req), inproc_pool, progress=False).frames_sha256
    assert results[1, False] == results[3, False] and results[1, True] == results[3, True]
    assert results[1, False] != results[1, True]


def test_the_worker_book_says_what_each_worker_does_and_did():
    """pool.WorkerBook (the monitors' workers view and Prometheus): the task a worker computes now (the oldest
    of those sent to it), busy seconds and utilisation over the last UTILISATION_S, failures, restarts."""
    from longtake.actors.pool import UTILISATION_S, Task, WorkerBook

    book = WorkerBook(2)
    book.started(0, "10.0.0.1/abc123")
    predict = lambda w, step: Task("predict", (), f"window {w + 1} at step {step + 1}", key=(step, w))  # noqa: E731
    book.sent(0, 1, predict(3, 2), nbytes=100, now=1000.0)
    book.sent(0, 2, predict(4, 2), nbytes=100, now=1000.0)  # queued behind it on the same worker
    w0, w1 = book.snapshot(now=1001.0)
    assert (w0["state"], w0["window"], w0["step"], w0["now"], w0["bytes"]) == ("busy", 3, 2, "window 4 at step 3", 200)
    assert (w1["state"], w1["node"], w1["utilisation"]) == ("starting", "", 0.0)
    book.ended(0, 1, nbytes=50, now=1002.0)  # the next starts when this one ends
    book.ended(0, 2, ok=False, now=1003.0)  # failed
    book.replaced(0)
    w0 = book.snapshot(now=1004.0)[0]
    assert (w0["window_steps"], w0["failures"], w0["restarts"], w0["busy_s"], w0["state"]) == (1, 1, 1, 3.0, "starting")
    assert w0["utilisation"] == pytest.approx(3 / 4)  # 3 s busy of the 4 s since it began
    later = book.snapshot(now=1000.0 + UTILISATION_S + 2.5)[0]  # half its busy time now outside the window
    assert later["utilisation"] == pytest.approx(0.5 / UTILISATION_S, abs=5e-4) and later["busy_s"] == 3.0
    book.excluded(1)
    assert book.snapshot()[1]["state"] == "excluded"


def test_the_replica_board_lists_serves_replicas_as_they_report_themselves(monkeypatch):
    """serve_pool.ReplicaBoard (serve's workers view): a replica's row from its first report, its calls as the
    WorkerBook counts them; a replica Serve stops, or one silent past SILENT_S (its running call failed
    there), stays listed UTILISATION_S, then goes; a heartbeat brings a silent one back."""
    from longtake.actors import serve_pool
    from longtake.actors.serve_pool import SILENT_S, UTILISATION_S, ReplicaBoard

    clock = [1000.0]
    monkeypatch.setattr(serve_pool.time, "monotonic", lambda: clock[0])
    board = ReplicaBoard()
    board.alive("r1", "10.0.0.1/aa")
    board.sent("r2", "10.0.0.2/bb", 1, "predict", "window 2 at step 1", [0, 1], 300)
    r1, r2 = board.snapshot()
    assert (r1["replica"], r1["state"], r1["node"]) == ("r1", "idle", "10.0.0.1/aa")
    assert (r2["replica"], r2["state"], r2["window"], r2["step"], r2["bytes"]) == ("r2", "busy", 1, 0, 300)
    clock[0] += 2
    board.ended("r2", "10.0.0.2/bb", 1, 100, True)
    board.stopped("r1", "10.0.0.1/aa")
    r1, r2 = board.snapshot()
    assert (r2["state"], r2["window_steps"], r2["bytes"], r2["busy_s"]) == ("idle", 1, 400, 2.0)
    assert r1["state"] == "stopped"
    board.sent("r2", "10.0.0.2/bb", 2, "predict", "window 3 at step 1", (0, 2), 300)
    clock[0] += SILENT_S + 1  # r2 went silent mid-call: lost, its call failed there
    r1, r2 = board.snapshot()
    assert (r2["state"], r2["failures"], r2["window"]) == ("lost", 1, None)
    board.alive("r2", "10.0.0.2/bb")  # it answers again
    assert board.snapshot()[1]["state"] == "idle"
    clock[0] += UTILISATION_S  # the stopped replica's row goes; the live one stays
    board.alive("r2", "10.0.0.2/bb")
    assert [r["replica"] for r in board.snapshot()] == ["r2"]


def _tiny_copy(tiny_model, dest, options: dict) -> str:
    import json
    import shutil

    shutil.copytree(tiny_model, dest)
    (dest / "longtake.json").write_text(json.dumps(options))
    return str(dest)


def test_model_options_noise_default_and_circular_padding(tmp_path, tiny_model):
    """longtake.json's default_noise is used when a request names no noise (a request that names one wins,
    and the mode is part of the checkpoint fingerprint); circular_padding makes the backend's convolutions
    wrap; a bad default_noise is an error naming the model and the value."""
    import json

    from longtake.cluster.checkpoint import fingerprint
    from longtake.pipelines import inspect_model
    from longtake.pipelines.animatediff import Backend
    from longtake.request import RequestError

    assert prepare(_request(tiny_model, tmp_path / "a.mp4")).noise == "independent"
    model = _tiny_copy(tiny_model, tmp_path / "m", {"default_noise": "correlated", "circular_padding": True})
    job = prepare(_request(model, tmp_path / "a.mp4"))
    assert job.noise == "correlated" and job.model.options["circular_padding"]
    named = prepare(_request(model, tmp_path / "a.mp4", noise="independent"))
    assert named.noise == "independent" and fingerprint(named, "float32", "cpu") != fingerprint(job, "float32", "cpu")
    convs = [m for m in Backend(inspect_model(model)).unet.modules() if isinstance(m, torch.nn.Conv2d) and any(m.padding)]
    assert convs and all(m.padding_mode == "circular" for m in convs)
    plain = [m for m in Backend(inspect_model(tiny_model)).unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.padding_mode == "zeros" for m in plain)
    bad = _tiny_copy(tiny_model, tmp_path / "bad", {"default_noise": "pink"})
    with pytest.raises(RequestError, match=r"^model: got .*default_noise is one of independent, freenoise, "
                                           r"correlated \(got 'pink'\)"):
        prepare(_request(bad, tmp_path / "a.mp4"))
    # a "text_time" UNet (SDXL-style) is refused unless longtake.json says how to pool the caption
    sdxl = _tiny_copy(tiny_model, tmp_path / "sdxl", {})
    config = json.loads((tmp_path / "sdxl" / "unet" / "config.json").read_text())
    (tmp_path / "sdxl" / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(RequestError, match=r"^model: got .*addition_embed_type 'text_time'"):
        prepare(_request(sdxl, tmp_path / "a.mp4"))
    (tmp_path / "sdxl" / "longtake.json").write_text(json.dumps({"pooled_text": "max"}))
    with pytest.raises(RequestError, match=r"pooled_text is 'mean' or absent \(got 'max'\)"):
        prepare(_request(sdxl, tmp_path / "a.mp4"))


def test_wrapped_convolutions_make_the_unet_shift_equivariant():
    """With circular padding, rolling a UNet's input by a multiple of its downsampling rolls its output the
    same way (what a model trained on wrapping clips needs); with zero padding the edges break that."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from longtake.pipelines.animatediff import wrap_convolutions

    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                            motion_num_attention_heads=2, motion_max_seq_length=4)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    x, hidden, t = torch.randn(1, 4, 3, 8, 8), torch.randn(3, 5, 8), torch.tensor([500])

    def shift_error() -> float:
        with torch.no_grad():
            out = unet(x, t, encoder_hidden_states=hidden).sample
            rolled = unet(torch.roll(x, (2, 4), (3, 4)), t, encoder_hidden_states=hidden).sample
        return (torch.roll(out, (2, 4), (3, 4)) - rolled).abs().max().item()

    assert shift_error() > 1e-2
    assert wrap_convolutions(unet) == sum(isinstance(m, torch.nn.Conv2d) and any(m.padding) for m in unet.modules())
    assert shift_error() < 1e-4


# ---------------------------------------------------------------- sizes, fingerprints, scheduler state, progress

def test_a_size_the_video_writer_refuses_is_refused_by_prepare(tmp_path, tiny_model):
    """A pixel-space model with a factor of 3: a height of 9 is a multiple of the model's factor (the only rule
    checked before) but odd, which the H.264 writer refuses, after the whole denoise. prepare() (no Ray, no
    weights) refuses it first, naming the field, the value and the rule; the model's default size too."""
    from longtake.request import RequestError
    from longtake.video import VideoWriter

    model = _tiny_copy(tiny_model, tmp_path / "px3", {"pixel_space": True, "pixel_shuffle": 3})
    job = prepare(_request(model, tmp_path / "a.mp4", height=12, width=18))
    assert job.model.layout.size_multiple == 3
    with pytest.raises(ValueError, match="height: got 9, expected an even number"):
        VideoWriter(tmp_path / "odd.mp4", 24, 9, fps=8)
    for field in ("height", "width"):
        with pytest.raises(RequestError, match=rf"^{field}: got 9, expected a multiple of 6 \(3 for the model's "
                                               r"pixel-shuffle x upscale factor, and even, for H.264 in yuv420p\)$"):
            prepare(_request(model, tmp_path / "a.mp4", **{field: 9}))
    odd_default = _tiny_copy(tiny_model, tmp_path / "px3d", {"pixel_space": True, "pixel_shuffle": 3,
                                                             "default_size": 27})
    with pytest.raises(RequestError, match=r"^height: got 27, expected a multiple of 6"):
        prepare(_request(odd_default, tmp_path / "a.mp4"))
    # a factor of 1: even is the whole rule
    plain = _tiny_copy(tiny_model, tmp_path / "px1", {"pixel_space": True, "pixel_shuffle": 1})
    with pytest.raises(RequestError, match=r"^width: got 33, expected a multiple of 2 \(even, for H.264 in yuv420p\)$"):
        prepare(_request(plain, tmp_path / "a.mp4", width=33))
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".a.mp4*"))


def test_fingerprint_covers_the_weights_the_dtype_and_the_device(tmp_path, tiny_model):
    """A checkpoint belongs to the weights it was made with and the dtype and device of the workers: a job
    paused on a GPU in float16 never resumes from those latents on a CPU in float32; touching or rewriting
    a weights file (or a config) changes the fingerprint; nothing else does."""
    import os

    from longtake.cluster.checkpoint import Checkpointer
    from longtake.cluster.checkpoint import fingerprint
    from longtake.pipelines import load_scheduler

    model = _tiny_copy(tiny_model, tmp_path / "m", {})
    req = _request(model, tmp_path / "a.mp4")

    def fp(dtype="float32", device="cpu"):
        return fingerprint(prepare(req), dtype, device)

    base = fp()
    assert fp() == base
    assert len({base, fp("float16", "cuda"), fp("float16", "cpu"), fp("float32", "cuda"), fp("bfloat16", "cuda")}) == 5
    scheduler = load_scheduler(model)
    scheduler.set_timesteps(3)
    Checkpointer(tmp_path / "ckpt", every=1, fingerprint=fp("float16", "cuda")).save(2, torch.zeros(1, 4, 3, 2, 2),
                                                                                    scheduler)
    assert Checkpointer(tmp_path / "ckpt", every=1, fingerprint=base).load_latest() is None
    assert Checkpointer(tmp_path / "ckpt", every=1, fingerprint=fp("float16", "cuda")).load_latest().step == 2

    weights = next((tmp_path / "m" / "unet").glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert fp() != base
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp() == base
    weights.write_bytes(weights.read_bytes())  # rewritten in place (new weights of the same size)
    rewritten = fp()
    assert rewritten != base
    config = tmp_path / "m" / "unet" / "config.json"
    config.write_text(config.read_text() + "\n")  # a config edited
    assert fp() != rewritten


def test_scheduler_state_that_cannot_be_stored_fails_the_save(tmp_path):
    """An instance attribute a checkpoint cannot store (a dict, a numpy array, a generator...) raises naming
    the scheduler and the attribute, instead of being dropped (a resume without it would not be exact)."""
    from diffusers import DDIMScheduler

    from longtake.cluster.checkpoint import Checkpointer, CheckpointError, scheduler_state

    ckpt = Checkpointer(tmp_path, every=1, fingerprint="f")
    z = torch.zeros(1, 4, 3, 2, 2)
    for name, value, kind in [("cache", {"a": 1}, "dict"), ("table", np.zeros(3), "ndarray"),
                              ("rng", torch.Generator(), "Generator"), ("mixed", [torch.zeros(1), 2], "list")]:
        s = DDIMScheduler()
        s.set_timesteps(4)
        setattr(s, name, value)
        with pytest.raises(CheckpointError, match=rf"cannot checkpoint DDIMScheduler\.{name}: a {kind}"):
            ckpt.save(1, z, s)
        with pytest.raises(CheckpointError):
            scheduler_state(s)
    assert ckpt.paths() == []
    s = DDIMScheduler()
    s.set_timesteps(4)
    s.counter, s.history = np.int64(3), [None, None]  # a numpy scalar and an unfilled history are stored
    assert ckpt.read(ckpt.save(1, z, s)).schedulers[0]["counter"] == 3


def _schedulers():
    """Every scheduler longtake runs: diffusers' usual ones, and the tiny, default and Wan models' own."""
    return [("DDIMScheduler", {}), ("DDIMScheduler", {"set_alpha_to_one": False, "prediction_type": "v_prediction"}),
            ("EulerDiscreteScheduler", {}), ("UniPCMultistepScheduler", {}), ("DPMSolverMultistepScheduler", {}),
            ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                         "flow_shift": 3.0}),  # Wan's
            ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}), ("PNDMScheduler", {}),
            ("tiny_model", None), ("tiny_wan_model", None), ("tiny_wan22_model", None), ("default", None)]


@pytest.mark.parametrize("name,kwargs", _schedulers(),
                         ids=[f"{n}-{'-'.join(map(str, k.values()))}" if k else n for n, k in _schedulers()])
def test_every_scheduler_longtake_runs_checkpoints_exactly(tmp_path, request, name, kwargs):
    import diffusers

    from longtake.cluster.checkpoint import Checkpointer, restore_scheduler
    from longtake.pipelines import DEFAULT_MODEL, load_scheduler

    def fresh():
        if kwargs is None:
            s = load_scheduler(str(DEFAULT_MODEL) if name == "default" else request.getfixturevalue(name))
        else:
            s = getattr(diffusers, name)(num_train_timesteps=1000, **kwargs)
        s.set_timesteps(10)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(0)
        return s

    gen = torch.Generator().manual_seed(0)
    outputs = [torch.randn(1, 4, 5, 8, 8, generator=gen) for _ in range(len(fresh().timesteps))]
    z0 = torch.randn(1, 4, 5, 8, 8, generator=gen)

    def steps(s, z, start, stop):
        for i in range(start, stop):
            z = s.step(outputs[i], s.timesteps[i], z).prev_sample
        return z

    n = len(outputs)
    straight = steps(fresh(), z0, 0, n)
    s = fresh()
    z = steps(s, z0, 0, 4)
    ckpt = Checkpointer(tmp_path, every=2, fingerprint="f")
    ckpt.save(4, z, s)
    state = ckpt.load_latest()
    s2 = fresh()
    restore_scheduler(s2, state.schedulers[0])
    assert state.step == 4
    assert torch.equal(steps(s2, state.z, 4, n), straight)
    # without the restored state a multistep solver diverges (its history): the state is what makes it exact
    if name == "DPMSolverMultistepScheduler":
        assert not torch.equal(steps(fresh(), state.z, 4, n), straight)


@pytest.mark.slow
def test_progress_after_a_resume(tmp_path, tiny_model, inproc_pool, capsys):
    """Paused at step 7 of 8: the last progress says 7 steps done, as the checkpoint and the error do. Resumed:
    the bar starts at the 35 window steps taken from the checkpoint and its rate counts only the 5 computed
    (it showed 35 done in no time: a rate of thousands per second)."""
    import re

    from longtake.cluster.checkpoint import Checkpointer
    from longtake.cluster.engine import Cancelled
    from longtake.cluster.checkpoint import fingerprint

    job = prepare(_request(tiny_model, tmp_path / "r.mp4", steps=8))
    ckpt = Checkpointer(tmp_path / "ckpt", every=100, fingerprint=fingerprint(job, "float32", "cpu"))
    seen = []
    with pytest.raises(Cancelled) as info:
        run(job, inproc_pool, progress=False, on_progress=seen.append, checkpoint=ckpt,
            cancelled=lambda: "paused" if seen and seen[-1]["window_steps_done"] >= 7 * 5 + 1 else None)
    assert info.value.step == 7 == seen[-1]["step"] and ckpt.load_latest().step == 7
    capsys.readouterr()
    result = run(job, inproc_pool, progress=True, checkpoint=ckpt)
    assert result.resumed_from_step == 7
    bars = re.findall(r"denoise:[^\r\n]*?(\d+)/40 \[([^\]]*)\]", capsys.readouterr().err)
    assert bars and bars[0][0] == "35" and bars[-1][0] == "40", bars
    value, unit = re.search(r"([\d.]+)(win/s|s/win)", bars[-1][1]).groups()
    rate = float(value) if unit == "win/s" else 1 / float(value)
    # window steps per second x the denoise time: about the 5 computed here (40 if the resumed ones counted)
    assert rate * result.timings["denoise_s"] < 20, (bars[-1], result.timings)


@pytest.mark.slow
def test_a_short_clip_reports_its_effective_window(tmp_path, tiny_model, inproc_pool):
    """--seconds 1 at 8 fps with a 16-frame window: one window of the clip's 8 frames, nothing shared."""
    result = run(prepare(_request(tiny_model, tmp_path / "s.mp4", seconds=1, window=16, overlap=4)), inproc_pool,
                 progress=False)
    assert (result.frames, result.windows, result.window, result.overlap) == (8, 1, 8, 0)
    job = prepare(_request(tiny_model, tmp_path / "l.mp4"))  # 24 frames, windows of 8 sharing 3
    assert len(job.windows) == 5
    result = run(job, inproc_pool, progress=False)
    assert (result.window, result.overlap) == (8, 3)


@pytest.mark.slow
def test_jobs_prepared_in_threads_of_a_fresh_process_all_get_their_scheduler(tiny_model):
    """Two serve jobs starting at once prepare in two threads; diffusers' lazy module, imported by both at
    once, handed one of them a module without SchedulerMixin ("a diffusers scheduler, not 'DDIMScheduler'")."""
    import subprocess
    import sys

    script = ("import sys, threading\nfrom longtake.pipelines import load_scheduler\nout = []\n"
              "ts = [threading.Thread(target=lambda: out.append(type(load_scheduler(sys.argv[1])).__name__)) "
              "for _ in range(6)]\n[t.start() for t in ts]\n[t.join() for t in ts]\nprint(','.join(out))\n")
    done = subprocess.run([sys.executable, "-c", script, tiny_model], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == ",".join(["DDIMScheduler"] * 6), done.stderr[-2000:]
