"""The bundled default model: it ships in the package, loads with the same backend as real models,
and renders the object the prompt asks for (colour and motion) at 64x64."""

from __future__ import annotations

import numpy as np
import pytest

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.engine import prepare, run
from longtake.models.shapes import BACKGROUNDS
from longtake.pipelines import DEFAULT_MODEL, inspect_model
from longtake.quality import classify_color, classify_motion, object_track


def test_bundled_weights_are_small_safetensors_with_a_card():
    files = list(DEFAULT_MODEL.rglob("*"))
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert weights and not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(f.stat().st_size for f in weights) < 30 * 2**20
    assert (DEFAULT_MODEL / "MODEL_CARD.md").is_file()
    info = inspect_model("default")
    assert info.default_size == 64 and info.pixel_shuffle == 2 and info.native_window == 16


@pytest.fixture(scope="module")
def default_pool():
    pool = InProcessPool(WorkerSpec(str(DEFAULT_MODEL)))
    yield pool
    pool.shutdown()


@pytest.mark.parametrize("color,motion,bg", [("red", "right", "blue"), ("yellow", "down", "black")])
def test_default_model_renders_the_prompt(tmp_path, default_pool, color, motion, bg):
    prompt = f"a {color} ball moving {motion} on a {bg} background"
    job = prepare(dict(prompt=prompt, seconds=4, fps=8, seed=3, out=str(tmp_path / "d.mp4")))
    assert (job.width, job.height) == (64, 64)
    chunks = []
    run(job, default_pool, progress=False, on_frames=lambda first, f: chunks.append(f))
    frames = np.concatenate(chunks)
    track = object_track(frames, BACKGROUNDS[bg])
    assert classify_color(track) == color
    assert classify_motion(track) == motion
