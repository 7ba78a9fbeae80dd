"""The simulated family (pipelines/sim.py): a real model's sizes and scheduler, simulated time. Its pools,
determinism, resume and bad input are in the conformance suite (test_families.py, family "sim"); here what
is its own: the presets' real sizes, the simulated time, and the window's own conditioning."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from longtake.cluster.engine import prepare
from longtake.core.windows import PromptKey, prompt_schedule
from longtake.pipelines import inspect_model, load_backend
from longtake.pipelines.sim import PRESETS, build_sim, window_latent_bytes
from longtake.request import RequestError


def test_the_presets_have_the_real_models_sizes():
    wan = inspect_model("sim:wan-14b-720p")
    assert (wan.default_width, wan.default_height, wan.native_window) == (1280, 720, 21)
    assert wan.layout.latent_shape(720, 1280) == (16, 90, 160) and wan.layout.frames(21) == 81
    assert window_latent_bytes(wan) == 16 * 21 * 90 * 160 * 4  # 19.4 MB a window, float32
    assert wan.streamed_decode and wan.separate_encoder  # a causal VAE; UMT5-XXL on its own worker
    animate = inspect_model("sim:wan-animate-14b-720p")
    assert animate.options["private_frames"] == 1 and animate.options["face_size"] == 512
    assert animate.layout.frames(animate.native_window) == 77  # + the reference slot: 21 latent frames a call
    with pytest.raises(RequestError, match=r"^pose: got None, expected a pose video or keypoint JSON file"):
        prepare({"prompt": "x", "model": "sim:wan-animate-14b-720p", "seconds": 5, "out": "x.mp4"})
    sd = inspect_model("sim:animatediff-sd15-512")
    assert sd.layout.latent_shape(512, 512) == (4, 64, 64) and sd.layout.frames(16) == 16
    # the 10-minute clip the scale bench renders: 9,600 frames, 2,401 latent frames, 2.2 GB of latents
    job = prepare({"prompt": "x", "model": "sim:wan-14b-720p", "seconds": 600, "fps": 16, "out": "x.mp4",
                   "overlap": PRESETS["wan-14b-720p"]["overlap"]})
    assert job.latent_frames == 2401 and len(job.windows) == 150
    assert 2.2e9 < 4 * job.latent_frames * 16 * 90 * 160 < 2.3e9


def test_the_encoder_gives_the_real_shape_and_each_window_its_own_text(tiny_sim_model):
    wan = load_backend("sim:wan-14b-720p", roles=("encode",))
    cond = wan.encode(["a", "b"], "", prompt_schedule([PromptKey(0.0, "a")], 21, 4.0))
    assert cond.keys.shape == (2, 512, 4096) and cond.negative.shape == (1, 512, 4096)
    small = load_backend(tiny_sim_model)
    job = prepare({"timeline": [{"at": 0, "prompt": "a red ball"}, {"at": 1.5, "prompt": "a blue cube"}],
                   "model": tiny_sim_model, "seconds": 2, "fps": 16, "out": "x.mp4"})
    cond = small.encode([k.prompt for k in job.keys], "", prompt_schedule(job.clip_keys, job.latent_frames, 4.0))
    z = torch.zeros(1, 16, 5, 4, 4)
    t = torch.tensor(500.0)
    first, last = job.windows[0], job.windows[-1]
    assert torch.equal(small.predict(z, t, cond, first, (5.0,)), small.predict(z, t, cond, first, (5.0,)))
    assert not torch.equal(small.predict(z, t, cond, first, (5.0,)), small.predict(z, t, cond, last, (5.0,)))


def test_a_window_step_takes_its_simulated_time(tmp_path):
    """predict_s per window-step with guidance (two passes), half without (one)."""
    path = build_sim(tmp_path / "sim", "wan-14b-720p", height=64, width=64, native_window=5, text_tokens=4,
                     text_dim=8, predict_s=0.4, decode_s=0.01)
    backend = load_backend(str(path))
    cond = backend.encode(["x"], "", prompt_schedule([PromptKey(0.0, "x")], 5, 4.0))
    z = torch.zeros(1, 16, 5, 8, 8)
    for guidance, least in ((5.0, 0.4), (1.0, 0.2)):
        started = time.perf_counter()
        backend.predict(z, torch.tensor(900.0), cond, (0, 5), (guidance,))
        assert time.perf_counter() - started >= least
    started = time.perf_counter()
    frames = np.concatenate(list(backend.decode_stream(z, 2)))
    assert len(frames) == 17 and time.perf_counter() - started >= 17 * 0.01  # 4k+1 frames, decode_s each


def test_decode_is_full_size_and_encode_frames_is_its_inverse(tiny_sim_model):
    backend = load_backend(tiny_sim_model)
    z = torch.rand(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z[:, 3:] = 0  # what encode_frames gives back: channels 0-2
    frames = backend.decode(z)
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8  # causal: 1 + 4 x 2 frames, 8x the size
    again = backend.encode_frames(frames)  # the mean of each latent pixel's upsampled pixels: close, not exact
    assert again.shape == z.shape and (again - z).abs().mean() < 0.1 and (again - z)[:, 3:].abs().max() == 0


def test_bad_sim_models_name_the_field(tmp_path):
    with pytest.raises(RequestError, match=r"^model: got 'sim:wan-1b', expected one of sim:wan-14b-720p, "
                                           r"sim:wan-animate-14b-720p, sim:animatediff-sd15-512$"):
        inspect_model("sim:wan-1b")
    path = build_sim(tmp_path / "sim", "wan-14b-720p", predict_s=-1)
    with pytest.raises(RequestError, match=r"^model: got .*, expected a sim.json whose predict_s is a number >= 0"):
        inspect_model(str(path))
    config = json.loads((path / "sim.json").read_text())
    del config["channels"]
    (path / "sim.json").write_text(json.dumps(config))
    with pytest.raises(RequestError, match=r"expected a sim.json with channels"):
        inspect_model(str(path))
    with pytest.raises(ValueError, match=r"sim fields: got \['colour'\]"):
        build_sim(tmp_path / "other", "wan-14b-720p", colour="red")


def test_a_sim_worker_never_imports_diffusers(tiny_sim_model):
    """Its workers start in a couple of seconds (torch only): what a bench of 32 simulated workers needs."""
    import subprocess
    import sys

    code = ("import sys; from longtake.actors.worker import Worker, WorkerSpec; "
            f"w = Worker(WorkerSpec({tiny_sim_model!r})); "
            "import numpy as np; w.backend.decode(__import__('torch').zeros(1, 16, 2, 8, 8)); "
            "print('diffusers' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_a_worker_fetches_a_jobs_conditioning_once_keeps_it_by_hash_and_drops_it_when_released(tiny_sim_animate_model,
                                                                                                tmp_path):
    from longtake.actors.pool import InProcessPool
    from longtake.actors.worker import HELD, WorkerSpec
    from longtake.cluster.engine import conditioning, window_conditioning

    media = {name: f"{tiny_sim_animate_model}/{file}" for name, file in
             (("pose", "pose.json"), ("reference", "photo.png"), ("face", "face.mp4"))}
    job = prepare({"prompt": "a dancer", "model": tiny_sim_animate_model, "seconds": 4, "fps": 8, "steps": 2,
                   "out": str(tmp_path / "x.mp4"), "pose_loop": True, **media})  # 2 windows
    assert len(job.windows) == 2
    pool = InProcessPool(WorkerSpec(tiny_sim_animate_model))
    fetched = []
    pool.worker.fetch = lambda held: fetched.append(held.key) or held.value
    cond = pool.put(conditioning(job, pool))
    assert pool.put(conditioning(job, pool)).key == cond.key  # by content: the same job, the same key
    z = torch.zeros(1, 16, 1 + 5, 8, 8)
    preds = [pool.worker.predict(z, torch.tensor(900.0), window_conditioning(job, cond, s, e), s, e, (1.0,))
             for s, e in job.windows]
    assert fetched == [cond.key] and list(pool.worker.held) == [cond.key]  # once for every window
    assert not torch.equal(preds[0], preds[-1])  # each window its own pose and face frames
    slices = [window_conditioning(job, cond, s, e).frames for s, e in job.windows]
    assert all(set(f) == {"control", "face"} and len(f["control"]) == 4 * (e - s - 1) + 1
               for f, (s, e) in zip(slices, job.windows))
    assert "face" not in pool.worker.held[cond.key].media and pool.worker.held[cond.key].control is None
    pool.release(cond)
    assert not pool.worker.held  # the job's end
    pool.worker.predict(z, torch.tensor(900.0), window_conditioning(job, cond, *job.windows[0]), *job.windows[0],
                        (1.0,))
    assert fetched == [cond.key] * 2  # a worker without it (released, or a restarted one) fetches it again
    for i in range(HELD + 2):  # bounded: the HELD newest
        pool.worker.conditioning(window_conditioning(job, type(cond)(f"k{i}", 0, cond.value), *job.windows[0]))
    assert len(pool.worker.held) == HELD and "k0" not in pool.worker.held
