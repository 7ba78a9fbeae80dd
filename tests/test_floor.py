"""The diffusers floor (pyproject.toml, longtake.pipelines.DIFFUSERS_FLOOR) is a release longtake runs on:
installed from the package registry beside this venv (the rest of the stack as installed), it loads the
tiny AnimateDiff and Wan models in float16 / bfloat16 through longtake's own load_backend, and renders one
window with the frames of diffusers' own pipeline (the parity tests of test_families.py). An older
diffusers fails at load with a message naming the floor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from longtake.pipelines import DIFFUSERS_FLOOR

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)

ROOT = Path(__file__).resolve().parent.parent
# requirements of the floor release that this venv's newer diffusers no longer has (0.41 dropped httpx)
FLOOR_EXTRAS = ("httpx<1", "httpcore<2")
# what pip says when it cannot reach the registry (then the test is skipped, saying so)
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "ConnectTimeout", "Read timed out", "ProxyError", "No matching distribution")

LOAD = textwrap.dedent("""
    import json, sys
    import diffusers, torch
    from longtake.pipelines import load_backend

    def dtypes(module, asked):
        # every parameter in the asked dtype, but for the modules the model keeps in float32 on purpose
        keep = getattr(module, "_keep_in_fp32_modules", None) or []
        wrong = [name for name, p in module.named_parameters()
                 if p.dtype != asked and not (p.dtype == torch.float32 and set(keep) & set(name.split(".")))]
        return {"dtypes": sorted(str(p.dtype) for p in {p.dtype: p for p in module.parameters()}.values()),
                "wrong": wrong[:5]}

    out = {"version": diffusers.__version__, "file": diffusers.__file__}
    for key, path, dtype in (("animatediff", sys.argv[1], "float16"), ("wan", sys.argv[2], "bfloat16")):
        backend = load_backend(path, dtype=dtype)
        asked = getattr(torch, dtype)
        for name in ("unet", "text_encoder"):
            if getattr(backend, name, None) is not None:
                out[f"{key}.{name}"] = dtypes(getattr(backend, name), asked)
        for i, expert in enumerate(getattr(backend, "experts", [])):
            out[f"{key}.expert{i}"] = dtypes(expert, asked)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def floor_site(tmp_path_factory) -> str:
    """A directory holding diffusers==DIFFUSERS_FLOOR (and what it needs that this venv lacks), from the registry."""
    target = tmp_path_factory.mktemp("floor")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
           "--retries", "1", "--timeout", "20", "--no-deps", "--target", str(target),
           f"diffusers=={DIFFUSERS_FLOOR}", *FLOOR_EXTRAS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if any(s in output for s in UNREACHABLE):
            pytest.skip(f"the package registry is unreachable: cannot install diffusers=={DIFFUSERS_FLOOR} "
                        f"({output.strip().splitlines()[-1]})")
        raise AssertionError(f"pip install diffusers=={DIFFUSERS_FLOOR} failed:\n{output}")
    return str(target)


def _env(site: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_the_floor_loads_the_models_in_the_asked_dtype(floor_site, tiny_model, tiny_wan_model):
    proc = subprocess.run([sys.executable, "-c", LOAD, tiny_model, tiny_wan_model], capture_output=True, text=True,
                          timeout=300, env=_env(floor_site), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("version") == DIFFUSERS_FLOOR and out.pop("file").startswith(floor_site)
    assert set(out) == {"animatediff.unet", "animatediff.text_encoder", "wan.text_encoder", "wan.expert0"}
    for key, found in out.items():
        assert found["wrong"] == [], (key, found)
        assert ("torch.float16" if key.startswith("animatediff") else "torch.bfloat16") in found["dtypes"]


@pytest.mark.slow
def test_the_floor_passes_the_pipeline_parity_tests(floor_site):
    """One window against diffusers' own AnimateDiffPipeline, WanPipeline and WanAnimatePipeline (both guidance
    cases), and the Wan families' streamed decode (built on the VAE's internals) against one whole-clip decode,
    all with the floor."""
    tests = ["tests/test_families.py::test_one_window_matches_the_diffusers_pipeline",
             "tests/test_families.py::test_decode_path_equals_one_whole_decode"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                           "-k", "(animatediff or wan) and not wan22", "-o", "addopts="],
                          capture_output=True, text=True, timeout=300, env=_env(floor_site), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "9 passed" in proc.stdout, proc.stdout[-2000:]  # animatediff, wan, wan_animate: 2 parity + 1 decode each


def test_an_older_diffusers_fails_at_load_naming_the_floor(monkeypatch, tiny_model):
    import diffusers

    from longtake.pipelines import load_backend, load_scheduler

    monkeypatch.setattr(diffusers, "__version__", "0.39.0")
    for load in (load_backend, load_scheduler):
        with pytest.raises(ImportError, match=rf"^longtake needs diffusers>={DIFFUSERS_FLOOR} \(older releases "
                                              r"ignore from_pretrained's dtype=\); found diffusers 0\.39\.0"):
            load(tiny_model)
