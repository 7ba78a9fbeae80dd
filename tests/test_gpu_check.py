"""scripts/gpu_check.sh: its dry run passes here (every import it needs, a 1.3B config diffusers accepts), a
run without a GPU says so instead of failing half-way, and every family's check request is one the family
takes (the GPU run would otherwise fail only on the GPU)."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a process importing Ray, torch, diffusers and transformers: 10 s on 2 cores
def test_the_dry_run_lists_every_step_and_everything_imports():
    from longtake.tools.gpu_check import STEPS, family_models

    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] and summary["dry_run"]
    assert [s["step"] for s in summary["steps"] if "step" in s] == list(STEPS)
    assert len(summary["steps"][0]["runs"]) == len(family_models())
    assert all(not str(v).startswith("FAILED") for v in summary["imports"].values())
    assert 1.3e9 < summary["wan_1_3b_parameters"] < 1.5e9  # the published 1.3B model's 1.42 B


def test_without_a_gpu_it_says_so_in_its_json(tmp_path):
    from longtake.tools.gpu_check import main

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check runs instead")
    assert main(["--out", str(tmp_path)]) == 1


def test_the_clip_it_projects_is_planned_as_a_render_would(capsys):
    from longtake.tools.gpu_check import window_steps

    frames, windows = window_steps(20, 16)
    assert frames == 320 and windows == 5  # 81 latent frames: windows of 21 every 16


@pytest.mark.slow
def test_every_family_check_request_is_accepted(tmp_path):
    """The requests `families` renders on the GPU, checked (prepare: no render) against each model here."""
    from longtake.cluster.engine import prepare
    from longtake.tools.gpu_check import _request, family_models
    from longtake.tools.samples import write_animate_media

    write_animate_media(tmp_path)
    for model in family_models():
        for device in ("cpu", "cuda"):
            job = prepare({**_request(model, tmp_path, tmp_path / f"{model}.mp4"), "device": device})
            assert job.frames >= 16, model
