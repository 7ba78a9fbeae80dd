"""The default model's training script: reproducible from a seed, and what it writes is a model longtake runs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.evaluate import render_frames
from longtake.models.train_default import train
from longtake.pipelines import inspect_model


def _weights(d):
    return load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    threads = torch.get_num_threads()
    try:
        cards = {name: train(root / name, minutes=0, seed=seed, batch=2, lr=1e-3, max_steps=3, threads=1)
                 for name, seed in (("a", 0), ("b", 0), ("c", 1))}
        pieces = []  # run "d": the same as "a", in three pieces of one step, each a fresh start from the state
        while not pieces or pieces[-1] is None:
            pieces.append(train(root / "d", minutes=0, seed=0, batch=2, lr=1e-3, max_steps=3, threads=1,
                                piece_steps=1))
        cards["d"] = pieces[-1]
        cards["d_pieces"] = len(pieces)
    finally:
        torch.set_num_threads(threads)
    return root, cards


def test_same_seed_same_weights_other_seed_other_weights(runs):
    root, cards = runs
    a, b, c = (_weights(root / n) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert cards["a"]["final_loss"] == cards["b"]["final_loss"] and np.isfinite(cards["a"]["final_loss"])
    assert cards["a"]["steps"] == 3 and cards["a"]["batch"] == 2


def test_trained_model_is_a_safetensors_pixel_model_longtake_renders(runs):
    root, _ = runs
    d = root / "a"
    assert not [f for f in d.rglob("*") if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert json.loads((d / "training.json").read_text())["seed"] == 0
    info = inspect_model(str(d))
    assert info.options["pixel_shuffle"] == 2 and info.default_height == 64 and info.native_window == 16
    assert info.options["circular_padding"] and info.options["pooled_text"] and info.default_noise == "correlated"
    pool = InProcessPool(WorkerSpec(str(d)))
    try:  # shutdown restores torch's thread count for the tests after this one
        frames, windows = render_frames(pool, dict(prompt="a red ball moving right on a blue background", seconds=3,
                                                   fps=8, steps=2, seed=1, model=str(d), out=str(root / "c.mp4")))
    finally:
        pool.shutdown()
    assert frames.shape == (24, 64, 64, 3) and frames.dtype == np.uint8 and len(windows) >= 2


def test_a_run_in_pieces_gives_the_same_weights_as_one_run(runs):
    root, cards = runs
    a, d = _weights(root / "a"), _weights(root / "d")
    assert cards["d_pieces"] == 3 and cards["d"]["steps"] == 3
    assert all(torch.equal(a[k], d[k]) for k in a)
    assert cards["d"]["final_loss"] == cards["a"]["final_loss"] and cards["d"]["loss_curve"] == cards["a"]["loss_curve"]
    assert not (root / "d.state.safetensors").exists()  # the state goes when the run is done


def test_a_state_of_another_run_is_refused(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert train(tmp_path / "m", minutes=0, seed=0, batch=2, lr=1e-3, max_steps=3, threads=1, piece_steps=1) is None
        with pytest.raises(SystemExit, match="state of another run"):
            train(tmp_path / "m", minutes=0, seed=1, batch=2, lr=1e-3, max_steps=3, threads=1)
    finally:
        torch.set_num_threads(threads)
