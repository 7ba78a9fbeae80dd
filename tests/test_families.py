"""The backend conformance suite: every model family passes the same tests (as diffusers' pipeline tester
mixin does for its pipelines). A new family adds one entry to FAMILIES (a tiny model fixture, a small
request and its diffusers pipeline call) and gets parity, determinism across pools, decode, resume and
bad input for free. Then the Wan-specific checks: exact frame counts under the 4k+1 rule, the streamed
causal decode, the two experts, timelines on a DiT, roles, a killed decoder, and a farm job.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from ray import cloudpickle

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import Worker, WorkerSpec, encoder_spec
from longtake.cluster.checkpoint import Checkpointer
from longtake.cluster.engine import Cancelled, prepare, run
from longtake.cluster.checkpoint import fingerprint
from longtake.cluster.runtime import worker_plan
from longtake.pipelines import ROLES, DEFAULT_MODEL, load_backend
from longtake.core.windows import initial_noise
from longtake.request import RequestError
from longtake.video import probe

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


def _animatediff_pipeline(path, job, req, latents):
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"], num_frames=job.rendered_frames,
                height=job.height, width=job.width, num_inference_steps=job.steps, guidance_scale=job.guidance,
                latents=latents, output_type="np").frames[0]


def _pose_pipeline(path, job, req, latents):
    """AnimateDiffControlNetPipeline with the skeleton frames longtake drew, as PIL images."""
    from diffusers import AnimateDiffControlNetPipeline
    from PIL import Image

    pipe = AnimateDiffControlNetPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"], num_frames=job.rendered_frames,
                height=job.height, width=job.width, num_inference_steps=job.steps, guidance_scale=job.guidance,
                conditioning_frames=[Image.fromarray(f) for f in job.control],
                controlnet_conditioning_scale=job.control_scale, latents=latents, output_type="np").frames[0]


def _wan_pipeline(path, job, req, latents):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"], num_frames=job.rendered_frames,
                height=job.height, width=job.width, num_inference_steps=job.steps, guidance_scale=job.guidance,
                guidance_scale_2=job.guidance_2 if job.model.experts > 1 else None,
                latents=latents, output_type="np").frames[0]


def _wan_animate_pipeline(path, job, req, latents):
    """WanAnimatePipeline with longtake's media (the reference as fitted, the pose as drawn, the face, background
    and mask frames as read) as PIL images, one segment of the clip's rendered frames; the initial latents
    are the window's reference slot (its private frame: pipelines/wan_animate.py's docstring) then the
    clip's, and the pipeline is called as is."""
    import diffusers.pipelines.wan.pipeline_wan_animate as module
    from diffusers import WanAnimatePipeline
    from PIL import Image

    from longtake.pipelines.wan import prompt_clean
    from longtake.core.windows import private_noise

    pipe = WanAnimatePipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    media, frames = job.media, job.frames
    pil = lambda clip: [Image.fromarray(f) for f in clip]  # noqa: E731
    face = media.get("face")
    if face is None:  # longtake's default: the blank face (every pixel -1 once normalized)
        size = job.model.options["face_size"]
        face = np.zeros((frames, size, size, 3), np.uint8)
    image = Image.fromarray(media["reference"])
    first = torch.cat([private_noise(req.get("seed", 0), 0, 1, job.latent_shape), latents], dim=2)
    replace = req.get("animate_mode") == "replace"
    previous, module.prompt_clean = module.prompt_clean, prompt_clean  # the pipeline's needs ftfy (not installed)
    try:
        return pipe(image=image, pose_video=pil(job.control), face_video=pil(face),
                    background_video=pil(media["background"]) if replace else None,
                    mask_video=[Image.fromarray(m, "L") for m in media["mask"]] if replace else None,
                    mode="replace" if replace else "animate", prompt=req["prompt"],
                    negative_prompt=req["negative_prompt"], height=job.height, width=job.width,
                    segment_frame_length=job.rendered_frames, num_inference_steps=job.steps,
                    guidance_scale=job.guidance, latents=first,
                    output_type="np").frames[0]
    finally:
        module.prompt_clean = previous


@dataclass(frozen=True)
class Family:
    name: str
    fixture: str  # the tiny model's fixture (or "default": the bundled model)
    request: dict  # a small multi-window request
    one_window: dict  # a request that fits in one window (parity)
    pipeline: object = None  # diffusers' own pipeline call for parity, or None (see `no_pipeline`)
    no_pipeline: str = ""
    bad_size: int = 66  # a height the model refuses
    extra: object = None  # path -> request fields that need the model's directory (a pose file beside it)
    known_frames: str = ""  # why the extend / loop / video-to-video test does not apply, if it does not


FAMILIES = {
    "animatediff": Family("animatediff", "tiny_model", dict(seconds=3, fps=8, steps=3, window=8, overlap=3),
                          dict(seconds=1, fps=8, window=8, steps=4), _animatediff_pipeline),
    # AnimateDiff with a pose ControlNet: every request driven by the walking skeleton beside the model
    "pose": Family("pose", "tiny_pose_model", dict(seconds=3, fps=8, steps=3, window=8, overlap=3, control_scale=0.8),
                   dict(seconds=1, fps=8, window=8, steps=4), _pose_pipeline,
                   extra=lambda path: {"pose": f"{path}/pose.json", "pose_loop": True},
                   known_frames="a pose-driven clip is made from its start: no extend, loop or video (its own "
                                "test covers the reference photo)"),
    "default": Family("default", "default", dict(seconds=3, fps=8, steps=3, window=8, overlap=3),
                      dict(seconds=1, fps=8, steps=3), no_pipeline="the bundled model is pixel-space with a pooled "
                      "caption (longtake.json options): no diffusers pipeline runs it", bad_size=30),
    # 2 s at 16 fps = 32 frames -> 9 latent frames (33 frames, one dropped); windows of 5, overlap 2: 3 windows
    "wan": Family("wan", "tiny_wan_model", dict(seconds=2, fps=16, steps=4, window=5, overlap=2),
                  dict(seconds=17 / 16, fps=16, steps=4), _wan_pipeline, bad_size=72),
    "wan22": Family("wan22", "tiny_wan22_model", dict(seconds=2, fps=16, steps=4, window=5, overlap=2),
                    dict(seconds=17 / 16, fps=16, steps=4), _wan_pipeline, bad_size=72),
    # Wan-Animate: the photo beside the model animated by the walking skeleton, its face video driving the face
    "wan_animate": Family("wan_animate", "tiny_wan_animate_model",
                          dict(seconds=2, fps=16, steps=4, window=5, overlap=2),
                          dict(seconds=17 / 16, fps=16, steps=4), _wan_animate_pipeline, bad_size=72,
                          extra=lambda path: {"pose": f"{path}/pose.json", "reference": f"{path}/photo.png",
                                              "face": f"{path}/face.mp4"},
                          known_frames="a pose-driven clip is made from its start: no extend, loop or video"),
    # the simulated family (real sizes, simulated time) at a reduced size: Wan's geometry, no sleep
    "sim": Family("sim", "tiny_sim_model", dict(seconds=2, fps=16, steps=4, window=5, overlap=2),
                  dict(seconds=17 / 16, fps=16, steps=4), no_pipeline="the simulated family computes a cheap "
                  "function at a real model's sizes (pipelines/sim.py): no diffusers pipeline runs it", bad_size=72),
    # the simulated Wan-Animate: a reference slot per window, the pose, face and photo beside it
    "sim_animate": Family("sim_animate", "tiny_sim_animate_model", dict(seconds=2, fps=16, steps=4, window=5, overlap=2),
                          dict(seconds=17 / 16, fps=16, steps=4), no_pipeline="the simulated family computes a "
                          "cheap function at a real model's sizes (pipelines/sim.py): no diffusers pipeline runs it",
                          bad_size=72, extra=lambda path: {"pose": f"{path}/pose.json", "reference": f"{path}/photo.png",
                                                           "face": f"{path}/face.mp4"},
                          known_frames="a pose-driven clip is made from its start: no extend, loop or video"),
}


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request):
    fam = FAMILIES[request.param]
    path = str(DEFAULT_MODEL) if fam.fixture == "default" else request.getfixturevalue(fam.fixture)
    return fam, path


@pytest.fixture(scope="module")
def inproc(family):
    _, path = family
    pool = InProcessPool(WorkerSpec(path))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def ray_pool(family, ray_session):
    """ray_pool(spec): 2 Ray workers of this family, started once for the family's tests (the family's tests
    run together: `family` is module-scoped); another spec replaces them."""
    from longtake.actors.ray_pool import RayPool

    held = {}

    def pool_for(spec):
        if held.get("spec") != spec:
            if "pool" in held:
                held.pop("pool").shutdown()
            held.update(spec=spec, pool=RayPool(spec, 2))
        return held["pool"]

    yield pool_for
    if "pool" in held:
        held["pool"].shutdown()


def _req(fam: Family, path: str, out, **kw) -> dict:
    return {"prompt": "a red ball moving right", "negative_prompt": "blurry", "model": path, "out": str(out),
            **fam.request, **(fam.extra(path) if fam.extra else {}), **kw}


def _frames(pool, job, **kw):
    chunks = []
    result = run(job, pool, progress=False, on_frames=lambda first, f: chunks.append((first, f.copy())), **kw)
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks)
    return result, np.concatenate([c[1] for c in chunks])


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_one_window_matches_the_diffusers_pipeline(tmp_path, family, inproc, guidance):
    fam, path = family
    if fam.pipeline is None:
        pytest.skip(fam.no_pipeline)
    req = _req(fam, path, tmp_path / "one.mp4", guidance=guidance, **fam.one_window)
    if guidance > 1 and prepare(req).model.experts == 2:
        req["guidance_2"] = 3.0  # the low-noise expert's own scale (Wan 2.2's recommended 4 / 3 style)
    job = prepare(req)
    assert len(job.windows) == 1
    _, ours = _frames(inproc, job)
    latents = initial_noise(0, job.latent_frames, job.latent_shape)  # the same initial latents, through `latents=`
    with torch.inference_mode():
        theirs = fam.pipeline(path, job, req, latents)
    theirs = (np.asarray(theirs) * 255).round()  # (F, H, W, 3) floats in [0, 1] -> uint8 scale
    assert ours.shape == theirs.shape == (job.frames, job.height, job.width, 3)
    assert np.abs(ours.astype(float) - theirs).max() <= 1.0  # uint8 rounding only
    assert ours.std() > 1  # not a blank clip


def test_pools_give_identical_frames(tmp_path, family, inproc, ray_pool):
    fam, path = family
    job = prepare(_req(fam, path, tmp_path / "a.mp4"))
    assert len(job.windows) >= 3
    ref, ref_frames = _frames(inproc, job)
    assert ref.frames == job.frames == round(job.request.seconds * job.request.fps)
    spec, _ = worker_plan(job, gpus=0, cpus=2)
    res, frames = _frames(ray_pool(spec), prepare({**job.request.model_dump(), "out": str(tmp_path / "b.mp4")}))
    assert res.workers == 2 and res.frames_sha256 == ref.frames_sha256
    assert np.array_equal(frames, ref_frames)


def test_decode_path_equals_one_whole_decode(family):
    """What the engine decodes (chunks on any worker, or one streamed session) equals one whole-clip decode."""
    fam, path = family
    backend = load_backend(path, roles=("decode",))
    info = prepare(_req(fam, path, "x.mp4")).model
    c, h, w = info.layout.latent_shape(64, 64)
    n = 22  # 21+ latent frames
    z = torch.randn(1, c, n, h, w, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = backend.decode(z)
    if info.streamed_decode:
        parts = list(backend.decode_stream(z, 4))
    else:
        parts = [backend.decode(z[:, :, s:s + 8]) for s in range(0, n, 8)]
    assert max(len(p) for p in parts) < len(whole)  # frames come in chunks, never all at once
    streamed = np.concatenate(parts)
    assert streamed.shape == whole.shape == (info.layout.frames(n), 64, 64, 3)
    assert np.abs(streamed.astype(int) - whole.astype(int)).max() <= 1
    if info.streamed_decode:  # decoding chunks alone would be wrong at every chunk start (causal feature cache)
        alone = np.concatenate([backend.decode(z[:, :, s:s + 4]) for s in range(0, n, 4)])
        assert alone.shape != whole.shape or np.abs(alone.astype(int) - whole.astype(int)).max() > 8


def test_resume_mid_run_gives_identical_frames(tmp_path, family, inproc):
    """Paused after step 2 of 4 (a multistep solver's history in the checkpoint for Wan's UniPC): resumed,
    the same frames as an uninterrupted run."""
    fam, path = family
    ref = run(prepare(_req(fam, path, tmp_path / "ref.mp4", steps=4)), inproc, progress=False)
    job = prepare(_req(fam, path, tmp_path / "a.mp4", steps=4))
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, fingerprint=fingerprint(job, "float32", "cpu"))
    windows = len(job.windows)
    done = {"n": 0}
    with pytest.raises(Cancelled):
        run(job, inproc, progress=False, on_progress=lambda p: done.update(n=p["window_steps_done"]),
            cancelled=lambda: "paused" if done["n"] > 2 * windows else None, checkpoint=ckpt)
    assert ckpt.paths()[0].name == "step-000002.safetensors" and not (tmp_path / "a.mp4").exists()
    resumed = run(job, inproc, progress=False, checkpoint=ckpt)
    assert resumed.resumed_from_step == 2 and resumed.frames_sha256 == ref.frames_sha256


def test_bad_input_names_the_field(tmp_path, family):
    fam, path = family
    info = prepare(_req(fam, path, tmp_path / "a.mp4")).model
    cases = [({"window": info.max_window + 1, "overlap": 0}, "window"),
             ({"height": fam.bad_size}, "height"), ({"width": fam.bad_size}, "width"),
             ({"window": 4, "overlap": 4}, "overlap")]
    if info.experts == 1:  # only two-expert models take a second guidance
        cases.append(({"guidance_2": 3.0}, "guidance_2"))
    for kw, field in cases:
        with pytest.raises(RequestError, match=rf"^{field}: got .*, expected"):
            prepare(_req(fam, path, tmp_path / "a.mp4", **kw))


def test_known_frames_and_loops_are_deterministic_on_every_pool_and_after_a_resume(tmp_path, family, inproc,
                                                                                   ray_pool):
    """A bridge (extend + lead_into) with a keyframe, a loop and a video redrawn at strength 0.9: the same
    frames on the in-process pool, on 2 Ray workers, and after a pause and a resume; the input clips are
    passed through as read."""
    from PIL import Image

    from longtake.video import read_frames

    fam, path = family
    if fam.known_frames:
        pytest.skip(fam.known_frames)
    clip = run(prepare(_req(fam, path, tmp_path / "clip.mp4")), inproc, progress=False)
    clip_frames = read_frames(tmp_path / "clip.mp4")
    Image.fromarray(clip_frames[3]).save(tmp_path / "key.png")
    bridge = _req(fam, path, tmp_path / "bridge.mp4", extend=str(tmp_path / "clip.mp4"),
                  lead_into=str(tmp_path / "clip.mp4"), keyframes=[{"image": str(tmp_path / "key.png"), "at": 0.25}])
    loop = _req(fam, path, tmp_path / "loop.mp4", loop=True)
    redraw = _req(fam, path, tmp_path / "redraw.mp4", video=str(tmp_path / "clip.mp4"), strength=0.9)
    spec, _ = worker_plan(prepare(loop), gpus=0, cpus=2)
    pool = ray_pool(spec)
    for req in (bridge, loop, redraw):
        job = prepare(req)
        ref, frames = _frames(inproc, job)
        on_ray = run(prepare({**req, "out": str(tmp_path / "ray.mp4")}), pool, progress=False)
        assert on_ray.frames_sha256 == ref.frames_sha256, req
        ckpt = Checkpointer(tmp_path / f"ckpt-{req['out'][-8:]}", every=1,
                            fingerprint=fingerprint(job, "float32", "cpu"))
        done = {"n": 0}
        skipped = job.steps - int(job.steps * job.inputs.strength)  # video to video starts later
        with pytest.raises(Cancelled):
            run(job, inproc, progress=False, on_progress=lambda p: done.update(n=p["window_steps_done"]),
                cancelled=lambda: "paused" if done["n"] > (skipped + 1) * len(job.windows) else None,
                checkpoint=ckpt)
        resumed = run(job, inproc, progress=False, checkpoint=ckpt)
        assert resumed.resumed_from_step == skipped + 1 and resumed.frames_sha256 == ref.frames_sha256
    job = prepare(bridge)
    new = round(fam.request["seconds"] * fam.request["fps"])
    assert not job.loop and prepare(loop).loop
    assert job.inputs.passthrough == 2 * clip.frames and job.new_frames == new
    bridged = read_frames(tmp_path / "bridge.mp4").astype(float)
    assert len(bridged) == 2 * clip.frames + new
    for part in (bridged[:clip.frames], bridged[clip.frames + new:]):  # the inputs, re-encoded only
        assert np.abs(part - clip_frames).mean() < 3
    # another input file is another job: its checkpoints are never mixed with these
    Image.fromarray(clip_frames[4]).save(tmp_path / "key.png")
    assert fingerprint(prepare(bridge), "float32", "cpu") != fingerprint(job, "float32", "cpu")


# ---------------------------------------------------------------- Wan specifics


@pytest.mark.parametrize("seconds,fps", [(1, 16), (2.5, 12), (1.3, 10), (1 / 16, 16), (6, 16), (3.7, 24)])
def test_exact_frame_counts_under_the_4k_plus_1_rule(tmp_path, tiny_wan_model, seconds, fps):
    job = prepare(dict(prompt="x", seconds=seconds, fps=fps, model=tiny_wan_model, out=str(tmp_path / "a.mp4")))
    frames = round(seconds * fps)
    assert job.frames == frames
    assert (job.rendered_frames - 1) % 4 == 0 and 0 <= job.rendered_frames - frames < 4  # the next valid length
    assert job.latent_frames == (job.rendered_frames - 1) // 4 + 1


def test_wan_mp4_has_exactly_the_frames_asked_for(tmp_path, tiny_wan_model):
    pool = InProcessPool(WorkerSpec(tiny_wan_model))
    try:
        out = tmp_path / "c.mp4"
        job = prepare(dict(prompt="x", seconds=2.5, fps=12, steps=2, model=tiny_wan_model, out=str(out),
                           preview=str(tmp_path / "p.png")))
        assert job.rendered_frames == 33
        result = run(job, pool, progress=False)
    finally:
        pool.shutdown()
    info = probe(out)
    assert info["frames"] == result.frames == 30 and info["fps"] == 12  # 33 rendered, the last 3 dropped
    assert (info["width"], info["height"]) == (64, 64) and info["pix_fmt"] == "yuv420p" and info["faststart"]
    assert result.window == 30 and result.overlap == 0  # one window covers the clip: its effective length, in frames
    assert (tmp_path / "p.png").stat().st_size > 0


def test_wan_with_a_flow_match_euler_scheduler_matches_the_diffusers_pipeline(tmp_path, tiny_wan_model):
    """The scheduler is the one the directory names: the same model with FlowMatchEulerDiscreteScheduler (no
    scale_model_input, no init_noise_sigma) still equals WanPipeline, and resumes mid-run exactly."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    path = tmp_path / "euler"
    shutil.copytree(tiny_wan_model, path)
    shutil.rmtree(path / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    fam = FAMILIES["wan"]
    req = _req(fam, str(path), tmp_path / "one.mp4", guidance=5.0, **fam.one_window)
    job = prepare(req)
    pool = InProcessPool(WorkerSpec(str(path)))
    try:
        _, ours = _frames(pool, job)
        long = prepare(_req(fam, str(path), tmp_path / "long.mp4"))
        ref = run(long, pool, progress=False)
        ckpt = Checkpointer(tmp_path / "ckpt", every=1, fingerprint=fingerprint(long, "float32", "cpu"))
        with pytest.raises(Cancelled):
            run(long, pool, progress=False, cancelled=lambda: "paused" if ckpt.saved else None, checkpoint=ckpt)
        resumed = run(long, pool, progress=False, checkpoint=ckpt)
    finally:
        pool.shutdown()
    with torch.inference_mode():
        theirs = (np.asarray(_wan_pipeline(str(path), job, req, initial_noise(0, job.latent_frames, job.latent_shape)))
                  * 255).round()
    assert ours.shape == theirs.shape and np.abs(ours.astype(float) - theirs).max() <= 1.0 and ours.std() > 1
    assert resumed.resumed_from_step >= 1 and resumed.frames_sha256 == ref.frames_sha256


def test_two_experts_switch_at_the_boundary(tiny_wan22_model):
    """Wan 2.2: `transformer` above boundary_ratio * 1000, `transformer_2` below, per step."""
    from longtake.pipelines import load_scheduler

    backend = load_backend(tiny_wan22_model, roles=("predict",))
    assert len(backend.experts) == 2 and backend.boundary == 875
    used = []
    for k, expert in enumerate(backend.experts):
        expert.register_forward_hook(lambda *_, k=k: used.append(k))
    scheduler = load_scheduler(tiny_wan22_model)
    scheduler.set_timesteps(4)
    cond = Worker(WorkerSpec(tiny_wan22_model, roles=("encode",))).encode(
        ["x"], "", (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(3)))
    z = torch.randn(1, 16, 3, 8, 8)
    for t in scheduler.timesteps:
        backend.predict(z, t, cond, (0, 3), (1.0, 1.0))
    expected = [0 if t >= 875 else 1 for t in scheduler.timesteps]
    assert used == expected and set(expected) == {0, 1}


def test_timeline_on_a_dit_gives_each_window_the_prompt_at_its_centre(tmp_path, tiny_wan_model):
    """One embedding per window: the timeline's interpolation at the window's centre, so windows early in a
    two-prompt story carry the first prompt, late ones the second, and the middle a blend."""
    from longtake.core.windows import PromptKey, prompt_schedule

    worker = Worker(WorkerSpec(tiny_wan_model, roles=("encode",)))
    keys = [PromptKey(2, "a red ball"), PromptKey(6, "a blue square")]
    cond = worker.encode([k.prompt for k in keys], "", prompt_schedule(keys, 41, 16 / 4))  # 10 s, 4 latent fps
    a, b = cond.keys[0:1], cond.keys[1:2]
    assert torch.equal(cond.centre(0, 5), a)  # latent frames 0-4, centre 2 (0.5 s): before the first key
    assert torch.equal(cond.centre(30, 41), b)  # centre 35 (8.75 s): past the last key
    assert torch.allclose(cond.centre(12, 21), 0.5 * a + 0.5 * b, atol=1e-6)  # centre 16 = 4 s: halfway
    assert torch.allclose(cond.centre(12, 20), cond.frames(15, 17).mean(0, keepdim=True))  # even: two middle frames
    assert not torch.allclose(cond.centre(12, 20), cond.centre(12, 21))


def test_wan_predictors_hold_no_text_encoder(tiny_wan_model):
    job = prepare(dict(prompt="x", model=tiny_wan_model, out="x.mp4"))
    spec, _ = worker_plan(job, gpus=0, cpus=2)
    assert job.model.separate_encoder and spec.roles == ("predict", "decode")
    predictor = Worker(spec).backend
    assert predictor.text_encoder is None and predictor.experts and predictor.vae is not None
    encoder = Worker(replace(spec, roles=("encode",))).backend
    assert encoder.text_encoder is not None and not encoder.experts and encoder.vae is None
    cuda, _ = worker_plan(replace(job, request=job.request.model_copy(update={"device": "cuda"})), gpus=1, cpus=2)
    assert cuda.dtype == "bfloat16" and cuda.roles == ("predict", "decode")
    assert worker_plan(prepare(dict(prompt="x", model="tiny", out="x.mp4")), gpus=1, cpus=1)[0].roles == ROLES
    # the one encoder: on the CPU, as the CPU workers compute (same dtype and threads), or in bf16 beside GPUs
    assert encoder_spec(spec) == replace(spec, roles=("encode",))
    assert encoder_spec(cuda) == replace(cuda, device="cpu", dtype="bfloat16", threads=8, roles=("encode",))


class SlowDecoder(Worker):
    """Streams decoded chunks slowly, so a test can kill it mid-decode."""

    def decode_stream(self, *args):
        for frames in super().decode_stream(*args):
            time.sleep(0.3)
            yield frames


def test_killed_decoder_restarts_the_stream_with_identical_frames(tmp_path, tiny_wan_model, ray_session,
                                                                  render_in_process):
    import threading

    import ray

    from longtake.actors.ray_pool import RayPool

    req = dict(prompt="x", seconds=4, fps=16, steps=2, window=9, overlap=3, model=tiny_wan_model)
    ref = render_in_process({**req, "out": str(tmp_path / "ref.mp4")})
    job = prepare({**req, "out": str(tmp_path / "k.mp4")})
    spec, _ = worker_plan(job, gpus=0, cpus=2)
    pool = RayPool(spec, 2, worker_cls=SlowDecoder)
    killed = threading.Event()

    def on_frames(first, frames):  # the first chunk is out: kill the worker that streams it
        if not killed.is_set():
            killed.set()
            for actor in pool.actors:  # the stream runs on the first live worker
                if actor is not None:
                    ray.kill(actor, no_restart=True)
                    break

    try:
        res = run(job, pool, progress=False, on_frames=on_frames)
    finally:
        pool.shutdown()
    assert killed.is_set() and pool.retries >= 1
    assert res.frames == 64 and res.frames_sha256 == ref.frames_sha256


def test_farm_renders_a_wan_job_on_groups_with_the_frames_of_a_direct_render(tmp_path, tiny_wan_model, ray_session,
                                                                             render_in_process):
    from longtake.cluster import farm

    req = dict(prompt="a corgi surfing", seconds=2, fps=16, steps=3, window=5, overlap=2, model=tiny_wan_model)
    ref = render_in_process({**req, "out": str(tmp_path / "ref.mp4")})
    farm_dir = tmp_path / "farm"
    # the spec asks for groups of 2 (context parallelism): the runner's 2 workers make one group, Ulysses
    (record, _), = farm.submit(farm_dir, [({**req, "cp": 2}, 0, None)])
    farm.Runner(farm_dir, workers=2, checkpoint_every=1, min_free_mb=0).serve_forever(exit_when_idle=True)
    done = farm.open_store(farm_dir).get(record.id)
    assert done.state == "done", done.error
    assert done.result["cp"] == 2 and done.result["workers"] == 2
    assert done.result["frames"] == 32 and done.result["frames_sha256"] == ref.frames_sha256
    assert done.result["window"] == 17 and done.result["overlap"] == 8  # in output frames


def test_wan_bad_input_on_the_command_line_exits_2(tmp_path, tiny_wan_model, cli_cases):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_wan_model, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "CogVideoXPipeline"}))
    base = ["render", "x", "--model", tiny_wan_model, "--out", str(tmp_path / "o.mp4")]
    cases = [(base + ["--window", "2000"], "window", "2000"),  # longer than the rotary tables (1024)
             (base + ["--height", "72"], "height", "72"),  # Wan: multiples of 16 (VAE 8 x patch 2)
             (base + ["--window", "8", "--overlap", "8"], "overlap", "8"),
             (["render", "x", "--model", str(other), "--out", str(tmp_path / "o.mp4")], "model", "CogVideoXPipeline")]
    for (argv, field, value), res in zip(cases, cli_cases([c[0] for c in cases], tmp_path)):
        assert res["rc"] == 2, (argv, res)
        line, = res["err"].strip().splitlines()
        assert line.startswith(f"longtake render: error: {field}: got ") and value in line and "expected" in line
