"""The IP-Adapter image prompt of AnimateDiff models (pipelines/animatediff.py's docstring: an ip_adapter/
folder beside the pipeline's image_encoder/ and feature_extractor/): the reference photo, pinned at frame 0,
is also the image prompt of every window. One window equals AnimateDiffControlNetPipeline with
`load_ip_adapter` and `ip_adapter_image`; the photo changes the frames; bad directories name `model`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.engine import prepare, run
from longtake.cluster.checkpoint import fingerprint
from longtake.pipelines import load_backend
from longtake.pipelines.tiny import IP_ADAPTER_FILE
from longtake.core.windows import initial_noise
from longtake.request import RequestError

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)


def _req(path: str, out, **kw) -> dict:
    return {"prompt": "a red ball moving right", "negative_prompt": "blurry", "model": path, "out": str(out),
            "pose": f"{path}/pose.json", "pose_loop": True, "reference": f"{path}/photo.png", "seconds": 1,
            "fps": 8, "window": 8, "steps": 3, **kw}


def _frames(pool, job) -> np.ndarray:
    chunks = []
    run(job, pool, progress=False, on_frames=lambda first, f: chunks.append(f.copy()))
    return np.concatenate(chunks)


@pytest.fixture(scope="module")
def pool(tiny_pose_ip_model):
    pool = InProcessPool(WorkerSpec(tiny_pose_ip_model))
    yield pool
    pool.shutdown()


def _pipeline(path: str, job, req: dict, latents: torch.Tensor) -> np.ndarray:
    """AnimateDiffControlNetPipeline with the IP-Adapter loaded from the directory, the photo as the image
    prompt, the skeleton frames longtake drew, and the photo's latent pinned at frame 0 (before the first step
    and after every step, as the engine pins known frames)."""
    from diffusers import AnimateDiffControlNetPipeline
    from PIL import Image

    pipe = AnimateDiffControlNetPipeline.from_pretrained(path, use_safetensors=True)
    pipe.load_ip_adapter(path, subfolder="ip_adapter", weight_name=IP_ADAPTER_FILE, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    (pinned,) = job.inputs.pinned
    video = torch.from_numpy(pinned.pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (1, 3, H, W)
    known = pipe.vae.encode(video).latent_dist.mean * pipe.vae.config.scaling_factor  # (1, C, h, w)
    latents = latents.clone()
    latents[:, :, 0] = known

    def pin(pipe, i, t, kwargs):
        kwargs["latents"][:, :, 0] = known
        return {"latents": kwargs["latents"]}

    return pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"], num_frames=job.rendered_frames,
                height=job.height, width=job.width, num_inference_steps=job.steps, guidance_scale=job.guidance,
                conditioning_frames=[Image.fromarray(f) for f in job.control],
                controlnet_conditioning_scale=job.control_scale,
                ip_adapter_image=Image.open(req["reference"]).convert("RGB"), latents=latents,
                callback_on_step_end=pin, output_type="np").frames[0]


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_one_window_matches_the_pipeline_with_its_ip_adapter(tmp_path, tiny_pose_ip_model, pool, guidance):
    path = tiny_pose_ip_model
    req = _req(path, tmp_path / "one.mp4", guidance=guidance, control_scale=0.8)
    job = prepare(req)
    assert len(job.windows) == 1 and job.model.options["ip_adapter"] == IP_ADAPTER_FILE
    assert job.media["reference"].shape == (64, 80, 3)  # the photo as read: the CLIP processor crops it
    ours = _frames(pool, job)
    with torch.inference_mode():
        theirs = _pipeline(path, job, req, initial_noise(0, job.latent_frames, job.latent_shape))
    theirs = (np.asarray(theirs) * 255).round()
    assert ours.shape == theirs.shape == (job.frames, job.height, job.width, 3)
    assert np.abs(ours.astype(float) - theirs).max() <= 1.0  # uint8 rounding only
    assert ours.std() > 1


def test_the_image_prompt_changes_every_window_and_is_deterministic(tmp_path, tiny_pose_ip_model, pool):
    """Three windows on one worker: another photo gives other frames (beyond the pinned frame 0); the first
    photo again (its embeddings from the worker's cache) the same frames as the first time."""
    path = tiny_pose_ip_model
    kw = dict(seconds=2, window=8, overlap=3, guidance=4.0)
    first = prepare(_req(path, tmp_path / "a.mp4", **kw))
    other = prepare(_req(path, tmp_path / "b.mp4", reference=f"{path}/photo2.png", **kw))
    assert len(first.windows) == 3
    assert fingerprint(first, "float32", "cpu") != fingerprint(other, "float32", "cpu")
    a, b = _frames(pool, first), _frames(pool, other)
    again = _frames(pool, prepare(_req(path, tmp_path / "c.mp4", **kw)))
    assert np.array_equal(a, again)
    diff = np.abs(a.astype(int) - b.astype(int)).reshape(len(a), -1).mean(1)  # per frame
    assert (diff[1:] > 1).all(), diff  # every window's frames, not only the pinned one


def test_scale_zero_is_the_model_without_its_adapter(tmp_path, tiny_pose_ip_model, tiny_pose_model,
                                                     render_in_process):
    """longtake.json ip_adapter_scale 0: the frames of the same model without an IP-Adapter (the tiny builder
    makes the other weights equal), the same photo pinned at frame 0."""
    path = Path(tmp_path / "scale0")
    shutil.copytree(tiny_pose_ip_model, path)
    (path / "longtake.json").write_text(json.dumps({"ip_adapter_scale": 0}))
    assert prepare(_req(str(path), tmp_path / "x.mp4")).model.options["ip_adapter_scale"] == 0.0
    photo = f"{tiny_pose_ip_model}/photo.png"
    off = render_in_process(_req(str(path), tmp_path / "off.mp4", reference=photo))
    plain = render_in_process(_req(tiny_pose_model, tmp_path / "plain.mp4", reference=photo))
    assert off.frames_sha256 == plain.frames_sha256


def test_only_predictors_load_the_image_encoder(tiny_pose_ip_model):
    assert load_backend(tiny_pose_ip_model, roles=("decode",)).image_encoder is None
    assert load_backend(tiny_pose_ip_model, roles=("predict",)).image_encoder is not None


def _broken(src: str, dst: Path, change) -> str:
    shutil.copytree(src, dst)
    change(dst)
    return str(dst)


def _as_bin(path: Path):
    (path / "ip_adapter" / IP_ADAPTER_FILE).rename(path / "ip_adapter" / "ip-adapter.bin")


def _no_image_encoder(path: Path):
    shutil.rmtree(path / "image_encoder")


def _unnamed_image_encoder(path: Path):
    index = json.loads((path / "model_index.json").read_text())
    index["image_encoder"] = [None, None]
    (path / "model_index.json").write_text(json.dumps(index))


def _not_an_adapter(path: Path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, path / "ip_adapter" / IP_ADAPTER_FILE)


def _two_adapters(path: Path):
    shutil.copy(path / "ip_adapter" / IP_ADAPTER_FILE, path / "ip_adapter" / "other.safetensors")


def _bad_scale(path: Path):
    (path / "longtake.json").write_text(json.dumps({"ip_adapter_scale": "strong"}))


@pytest.mark.parametrize("change", [_as_bin, _no_image_encoder, _unnamed_image_encoder, _not_an_adapter,
                                    _two_adapters, _bad_scale])
def test_a_bad_ip_adapter_directory_names_the_model(tmp_path, tiny_pose_ip_model, change):
    path = _broken(tiny_pose_ip_model, tmp_path / "model", change)
    with pytest.raises(RequestError, match=r"^model: got .*, expected"):
        prepare(_req(path, tmp_path / "a.mp4", reference=f"{tiny_pose_ip_model}/photo.png"))


def test_an_ip_adapter_model_needs_the_reference_photo(tmp_path, tiny_pose_ip_model):
    req = _req(tiny_pose_ip_model, tmp_path / "a.mp4")
    del req["reference"]
    with pytest.raises(RequestError, match=r"^reference: got None, expected a photo"):
        prepare(req)
