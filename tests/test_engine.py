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
        res, frames = _render(pool, {**req, "out": str(tmp_path / f"ray{n}.mp4")})
        assert res.workers == n
        assert res.frames_sha256 == ref.frames_sha256, f"{n} Ray workers differ from the in-process pool"
        assert np.array_equal(frames, ref_frames)
    # the hash is of the decoded frames, in order, as given to the encoder
    import hashlib

    assert hashlib.sha256(ref_frames.tobytes()).hexdigest() == ref.frames_sha256


def test_different_seed_or_prompt_changes_frames(tmp_path, tiny_model, inproc_pool):
    a, _ = _render(inproc_pool, _request(tiny_model, tmp_path / "a.mp4"))
    b, _ = _render(inproc_pool, _request(tiny_model, tmp_path / "b.mp4", seed=1))
    c, _ = _render(inproc_pool, _request(tiny_model, tmp_path / "c.mp4", prompt="a blue square"))
    assert len({a.frames_sha256, b.frames_sha256, c.frames_sha256}) == 3


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


def test_python_api_render(tmp_path, tiny_model):
    import longtake

    out = tmp_path / "api.mp4"
    result = longtake.render(_request(tiny_model, out, seconds=1.5), in_process=True)
    assert result.frames == 12 and result.out == str(out) and out.is_file()
    with pytest.raises(longtake.RequestError, match=r"^fps: got -8.0, expected"):
        longtake.render(_request(tiny_model, out, fps=-8))


def test_progress_and_cancel_hooks(tmp_path, tiny_model, inproc_pool):
    from longtake.cluster.engine import Cancelled

    events = []
    req = _request(tiny_model, tmp_path / "p.mp4")
    run(prepare(req), inproc_pool, progress=False, on_progress=events.append)
    denoise = [e for e in events if e["phase"] == "denoise"]
    assert [e["windows_done"] for e in denoise] == list(range(1, 16))  # 5 windows x 3 steps, in order
    assert denoise[-1]["step"] == 3 and events[-1] == {**events[-1], "phase": "decode", "frames_done": 24}
    assert denoise[-1]["eta_s"] == 0

    out = tmp_path / "c.mp4"
    seen = []
    with pytest.raises(Cancelled):
        run(prepare(_request(tiny_model, out)), inproc_pool, progress=False, on_progress=seen.append,
            cancelled=lambda: len(seen) >= 4)
    assert len(seen) == 4 and not out.exists() and list(tmp_path.glob(".c.mp4*")) == []


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

    from longtake.cluster.engine import fingerprint
    from longtake.pipelines import inspect_model
    from longtake.pipelines.animatediff import Backend
    from longtake.request import RequestError

    assert prepare(_request(tiny_model, tmp_path / "a.mp4")).noise == "independent"
    model = _tiny_copy(tiny_model, tmp_path / "m", {"default_noise": "correlated", "circular_padding": True})
    job = prepare(_request(model, tmp_path / "a.mp4"))
    assert job.noise == "correlated" and job.model.options["circular_padding"]
    named = prepare(_request(model, tmp_path / "a.mp4", noise="independent"))
    assert named.noise == "independent" and fingerprint(named) != fingerprint(job)
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
