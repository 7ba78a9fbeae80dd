"""The default model's training script: reproducible from a seed, and what it writes is a model longtake runs."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.tools.evaluate import render_frames
from longtake.tools.card import write_card
from longtake.tools.train_default import train
from longtake.pipelines import inspect_model

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)


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
        frames, job = render_frames(pool, dict(prompt="a red ball moving right on a blue background", seconds=3,
                                               fps=8, steps=2, seed=1, model=str(d), out=str(root / "c.mp4")))
    finally:
        pool.shutdown()
    assert frames.shape == (24, 64, 64, 3) and frames.dtype == np.uint8 and len(job.windows) >= 2


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


def test_a_second_stage_starts_from_the_first_and_the_motion_loss_changes_it(runs, tmp_path):
    root, _ = runs
    threads = torch.get_num_threads()
    try:
        # learning rate 0: the weights cannot move, so the second stage's EMA is the first stage's weights
        frozen = train(tmp_path / "frozen", minutes=0, seed=5, batch=2, lr=0.0, max_steps=1, threads=1, init=root / "a")
        plain = train(tmp_path / "plain", minutes=0, seed=5, batch=2, lr=1e-3, max_steps=2, threads=1, init=root / "a")
        motion = train(tmp_path / "motion", minutes=0, seed=5, batch=2, lr=1e-3, max_steps=2, threads=1, init=root / "a",
                       temporal_weight=1.0, noise="independent")
    finally:
        torch.set_num_threads(threads)
    a, f = _weights(root / "a"), _weights(tmp_path / "frozen")
    assert all(torch.equal(a[k], f[k]) for k in a)
    assert len(frozen["init"]) == 64 and "temporal_weight" not in frozen and motion["temporal_weight"] == 1.0
    assert frozen["first_stage"]["seed"] == 0 and frozen["first_stage"]["steps"] == 3
    p, m = _weights(tmp_path / "plain"), _weights(tmp_path / "motion")
    assert not all(torch.equal(p[k], m[k]) for k in p)
    assert motion["final_loss"] > plain["final_loss"]  # the motion term adds to the same prediction's loss
    assert json.loads((tmp_path / "motion" / "longtake.json").read_text())["default_noise"] == "independent"
    assert json.loads((tmp_path / "plain" / "longtake.json").read_text())["default_noise"] == "correlated"
    card = write_card(tmp_path / "motion").read_text()
    assert "Stage 1: seed 0, 3 steps" in card and "Stage 2: from stage 1's weights (`--init`), seed 5, 2 steps" in card
    assert "the motion loss at weight 1.0" in card and "Initial noise independent for every frame" in card


def test_stop_at_writes_the_snapshot_of_that_step_and_the_run_goes_on(tmp_path):
    threads = torch.get_num_threads()
    try:
        train(tmp_path / "full", minutes=0, seed=2, batch=2, lr=1e-3, max_steps=3, threads=1, save_every=2)
        early = train(tmp_path / "early", minutes=0, seed=2, batch=2, lr=1e-3, max_steps=3, threads=1, stop_at=2)
        stopped = _weights(tmp_path / "early")
        assert (tmp_path / "early.state.safetensors").is_file()  # the same command without stop_at goes on
        rest = train(tmp_path / "early", minutes=0, seed=2, batch=2, lr=1e-3, max_steps=3, threads=1)
    finally:
        torch.set_num_threads(threads)
    snap, full, went_on = (_weights(tmp_path / n) for n in ("full-step2", "full", "early"))
    assert early["steps"] == 2 and early["max_steps"] == 3 and rest["steps"] == 3
    assert all(torch.equal(snap[k], stopped[k]) for k in snap)  # stopped at 2 = the step-2 snapshot
    assert all(torch.equal(full[k], went_on[k]) for k in full)  # and going on = the run without a stop
    assert not all(torch.equal(full[k], snap[k]) for k in full)


@pytest.mark.parametrize("args, message", [
    (["--noise", "pink"], "invalid choice: 'pink'"),
    (["--temporal-weight", "-1"], "temporal_weight: got -1.0, expected a finite number >= 0"),
    (["--temporal-weight", "nan"], "temporal_weight: got nan"),
    (["--stop-at", "0"], r"stop_at: got 0, expected a step from 1 to max_steps \(3"),
    (["--stop-at", "4"], r"stop_at: got 4, expected a step from 1 to max_steps \(3"),
    (["--init", "NOWHERE"], "init: got '.*none', expected a model directory this script wrote"),
])
def test_bad_stage_options_exit_2_naming_the_option_before_training(tmp_path, capsys, args, message):
    from longtake.tools.train_default import main

    args = [a.replace("NOWHERE", str(tmp_path / "none")) for a in args]
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "m"), "--max-steps", "3", *args])
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.state.safetensors").exists()
