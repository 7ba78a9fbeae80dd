"""The bundled model's control branch (train_control.py): reproducible from a seed, resumable in pieces, and
what it writes turns the model into one that takes a silhouette path, while renders without one stay as
they were."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.tools.evaluate import pose_inputs, render_frames
from longtake.tools import train_control, train_default
from longtake.pipelines import inspect_model

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)

CONTROL = "controlnet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    threads = torch.get_num_threads()
    try:
        train_default.train(root / "base", minutes=0, seed=0, batch=1, lr=1e-3, max_steps=1, threads=1)
        for name in "abcd":
            shutil.copytree(root / "base", root / name)
        cards = {name: train_control.train(root / name, seed=seed, batch=1, lr=1e-3, max_steps=2, threads=1)
                 for name, seed in (("a", 0), ("b", 0), ("c", 1))}
        pieces = []  # "d" = "a" in two pieces of one step, each a fresh start from the saved state
        while not pieces or pieces[-1] is None:
            pieces.append(train_control.train(root / "d", seed=0, batch=1, lr=1e-3, max_steps=2, threads=1,
                                              piece_steps=1))
        cards["d"], cards["d_pieces"] = pieces[-1], len(pieces)
    finally:
        torch.set_num_threads(threads)
    return root, cards


def test_same_seed_same_branch_and_a_run_in_pieces_equals_one_run(runs):
    root, cards = runs
    a, b, c, d = (load_file(str(root / n / CONTROL)) for n in "abcd")
    assert a.keys() == b.keys() == c.keys() == d.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], d[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert cards["d_pieces"] == 2 and cards["d"]["loss_curve"] == cards["a"]["loss_curve"]
    assert not train_control.state_file(root / "d").exists()
    # the base weights are untouched, and the card names them
    base = load_file(str(root / "base" / train_default.WEIGHT_FILES[0]))
    assert all(torch.equal(base[k], v) for k, v in load_file(str(root / "a" / train_default.WEIGHT_FILES[0])).items())
    assert cards["a"]["base_weights"] == train_default.weights_digest(root / "base")


def test_the_branch_runs_only_with_a_pose(runs, tmp_path):
    """The model directory becomes an AnimateDiffControlNetPipeline one with a motion planner: without a pose
    (and with a prompt the planner cannot read) it renders exactly the base model's frames; with a silhouette
    path, or a prompt naming a shape and a motion (its plan), the frames change."""
    root, _ = runs
    index = json.loads((root / "a" / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffControlNetPipeline" and index["controlnet"][1] == "ControlNetModel"
    assert inspect_model(str(root / "a")).options["controlnet"]
    assert inspect_model(str(root / "a")).options["planner"] == "shapes"
    assert not inspect_model(str(root / "base")).options["planner"]
    reference, video, _ = pose_inputs(str(tmp_path), "circle", ("red", "ball", "blue"), 2, 8, seed=1)
    request = dict(prompt="a red ball", seconds=2, fps=8, steps=2, seed=1, out=str(tmp_path / "o.mp4"))
    frames = {}
    moving = {"prompt": "a red ball moving up"}
    for name, extra in (("base", {}), ("a", {}), ("a-pose", {"pose": video}), ("base-moving", moving),
                        ("a-moving", moving)):
        model = str(root / name.split("-")[0])
        pool = InProcessPool(WorkerSpec(model))
        try:
            frames[name], _ = render_frames(pool, {**request, "model": model, **extra})
        finally:
            pool.shutdown()
    assert np.array_equal(frames["base"], frames["a"])
    assert not np.array_equal(frames["a"], frames["a-pose"])
    assert not np.array_equal(frames["base-moving"], frames["a-moving"])  # the plan drives the branch


def test_bad_options_exit_2_naming_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_control.main(["--model", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_control.main(["--model", str(tmp_path), "--max-steps", "0"])
    assert e.value.code == 2 and "--max-steps: got 0" in capsys.readouterr().err
