"""Wan-Animate (longtake/pipelines/wan_animate.py) beyond the conformance suite (tests/test_families.py runs
parity, 1 vs 2 Ray workers, decode, resume and bad sizes on it in animate mode with a face video): replace mode
equals the pipeline too (and with no face video, the blank face), each window takes its own frame range, the
media drive the frames and the fingerprint, a replace job resumes exactly, and bad input names the field
before any weights load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.checkpoint import Checkpointer
from longtake.cluster.engine import Cancelled, prepare, run
from longtake.cluster.checkpoint import fingerprint
from longtake.pipelines.wan_animate import reflect_index, window_pixels
from longtake.core.windows import initial_noise
from longtake.request import RequestError

from test_families import _wan_animate_pipeline

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)


@pytest.fixture(scope="module")
def pool(tiny_wan_animate_model):
    pool = InProcessPool(WorkerSpec(tiny_wan_animate_model))
    yield pool
    pool.shutdown()


def _req(path, out, **kw) -> dict:
    return {"prompt": "a dancer", "negative_prompt": "blurry", "model": path, "out": str(out), "fps": 16,
            "pose": f"{path}/pose.json", "reference": f"{path}/photo.png", **kw}


def _replace(path) -> dict:
    return {"animate_mode": "replace", "background": f"{path}/background.mp4", "mask": f"{path}/mask.mp4"}


def _frames(pool, job, **kw):
    chunks = []
    result = run(job, pool, progress=False, on_frames=lambda first, f: chunks.append(f.copy()), **kw)
    return result, np.concatenate(chunks)


def test_replace_mode_without_a_face_matches_the_pipeline(tmp_path, tiny_wan_animate_model, pool):
    """One window in replace mode (the background and inverted mask as the segment's conditioning), no face
    video (longtake's blank face = black face frames given to the pipeline), guidance on."""
    path = tiny_wan_animate_model
    req = _req(path, tmp_path / "r.mp4", seconds=17 / 16, steps=3, guidance=3.0, **_replace(path))
    job = prepare(req)
    assert len(job.windows) == 1 and job.media["mask"].shape == (17, 64, 64) and "face" not in job.media
    _, ours = _frames(pool, job)
    with torch.inference_mode():
        theirs = _wan_animate_pipeline(path, job, req, initial_noise(0, job.latent_frames, job.latent_shape))
    theirs = (np.asarray(theirs) * 255).round()
    assert ours.shape == theirs.shape == (17, 64, 64, 3)
    assert np.abs(ours.astype(float) - theirs).max() <= 1.0 and ours.std() > 1


def test_windows_take_their_own_frame_ranges():
    """A window of latent frames s..e-1 conditions on pixel frames 4s .. 4(e-1) (4(L-1)+1 frames); frames past
    the clip reflect back as the pipeline pads its videos."""
    assert list(window_pixels(0, 5)) == list(range(0, 17))
    assert list(window_pixels(3, 8)) == list(range(12, 29))
    assert [reflect_index(i, 5) for i in range(12)] == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3]
    assert [reflect_index(i, 1) for i in range(3)] == [0, 0, 0]


def test_the_media_drive_the_frames_and_the_fingerprint(tmp_path, tiny_wan_animate_model, pool):
    path = tiny_wan_animate_model
    base = _req(path, tmp_path / "a.mp4", seconds=17 / 16, steps=2)
    other = np.full((48, 32, 3), 90, np.uint8)  # another photo, 2:3 portrait: 42 x 64 inside, black on each side
    Image.fromarray(other).save(tmp_path / "other.png")
    jobs = {"plain": prepare(base), "face": prepare({**base, "face": f"{path}/face.mp4"}),
            "photo": prepare({**base, "reference": str(tmp_path / "other.png")}),
            "replace": prepare({**base, **_replace(path)})}
    padded = jobs["photo"].media["reference"]
    assert padded.shape == (64, 64, 3) and (padded[:, 11:53] == 90).all()
    assert not padded[:, :11].any() and not padded[:, 53:].any()
    assert len({fingerprint(j, "float32", "cpu") for j in jobs.values()}) == 4
    shas = {name: run(job, pool, progress=False).frames_sha256 for name, job in jobs.items()}
    assert len(set(shas.values())) == 4, shas
    assert run(prepare(base), pool, progress=False).frames_sha256 == shas["plain"]


def test_a_replace_job_resumes_with_identical_frames(tmp_path, tiny_wan_animate_model, pool):
    path = tiny_wan_animate_model
    req = _req(path, tmp_path / "a.mp4", seconds=2, steps=3, window=5, overlap=2, face=f"{path}/face.mp4",
               **_replace(path))
    ref = run(prepare({**req, "out": str(tmp_path / "ref.mp4")}), pool, progress=False)
    job = prepare(req)
    assert len(job.windows) == 3
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, fingerprint=fingerprint(job, "float32", "cpu"))
    with pytest.raises(Cancelled):
        run(job, pool, progress=False, cancelled=lambda: "paused" if ckpt.saved else None, checkpoint=ckpt)
    resumed = run(job, pool, progress=False, checkpoint=ckpt)
    assert resumed.resumed_from_step >= 1 and resumed.frames_sha256 == ref.frames_sha256


def test_bad_input_names_the_field_before_any_weights_load(tmp_path, tiny_wan_animate_model, tiny_wan_model):
    path = tiny_wan_animate_model
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    short = tmp_path / "short.mp4"
    from longtake.video import VideoWriter

    with VideoWriter(short, 64, 64, 16) as w:
        w.write(np.zeros((4, 64, 64, 3), np.uint8))
    base = _req(path, tmp_path / "a.mp4", seconds=2)
    cases = [({"reference": None}, "reference", "a photo of the character"),
             ({"pose": None}, "pose", "a pose video or keypoint JSON"),
             ({"reference": f"{path}/face.mp4"}, "reference", "an image file"),
             ({"reference": str(tmp_path / "none.png")}, "reference", "an existing image file"),
             ({"face": str(junk)}, "face", ""),
             ({"face": str(tmp_path / "none.mp4")}, "face", "an existing video file"),
             ({"animate_mode": "replace"}, "background", "with animate_mode replace"),
             ({"animate_mode": "replace", "background": f"{path}/background.mp4"}, "mask", "with animate_mode replace"),
             ({"mask": f"{path}/mask.mp4"}, "mask", "no value without animate_mode replace"),
             ({**_replace(path), "background": str(short)}, "background", "or pose_loop"),
             ({"animate_mode": "dance"}, "animate_mode", "one of"),
             ({"control_scale": 0.5}, "control_scale", "no value")]
    for kw, field, text in cases:
        with pytest.raises(RequestError) as e:
            prepare({k: v for k, v in {**base, **kw}.items() if v is not None})
        assert e.value.field == field and text in str(e.value), (kw, str(e.value))
    wan = {"prompt": "x", "model": tiny_wan_model, "out": str(tmp_path / "w.mp4")}  # Wan text to video
    for kw, field, text in [({"pose": f"{path}/pose.json"}, "pose", "or a Wan-Animate model"),
                            ({"face": f"{path}/face.mp4", "pose": f"{path}/pose.json"}, "face", "a Wan-Animate model"),
                            ({**_replace(path), "pose": f"{path}/pose.json"}, "background", "a Wan-Animate model")]:
        with pytest.raises(RequestError) as e:
            prepare({**wan, **kw})
        assert e.value.field == field and text in str(e.value), (kw, str(e.value))

def test_the_command_line_takes_the_wan_animate_flags(tmp_path, tiny_wan_animate_model, cli_cases):
    path = tiny_wan_animate_model
    base = ["render", "a dancer", "--model", path, "--out", str(tmp_path / "o.mp4"), "--pose", f"{path}/pose.json",
            "--reference", f"{path}/photo.png", "--seconds", "2", "--fps", "16"]
    cases = [(base + ["--animate-mode", "replace", "--background", f"{path}/background.mp4"], "mask"),
             (base + ["--face", str(tmp_path / "none.mp4")], "face"),
             (base + ["--animate-mode", "replace", "--background", f"{path}/background.mp4", "--mask",
                      str(tmp_path / "none.mp4")], "mask")]
    results = cli_cases([c[0] for c in cases], tmp_path, report_imports=True)
    assert not results[-1]["diffusers_imported"] and not results[-1]["ray_imported"]  # refused before any model
    for (argv, field), res in zip(cases, results):
        assert res["rc"] == 2, (argv, res)
        line, = res["err"].strip().splitlines()
        assert line.startswith(f"longtake render: error: {field}: got "), line
