"""Shared fixtures: a tiny AnimateDiff model built from configs, and one Ray for the session.

Two tiers: `make test` runs everything (CI); `make test-fast` runs `-m "not slow"`: the pure and
single-process tests, no Ray, no browser, no network, under 90 s. A test is slow when it is marked so, or
uses a fixture below (Ray, a Serve app, a browser): `pytest_collection_modifyitems` marks those.

`make test` runs in two pytest-xdist processes, a whole test file to each (`--dist loadfile`): a session
fixture (Ray, a tiny model) exists once per process, a module fixture once per file. Tests must not reach
outside their own process tree: a check for leftover processes looks at its own children only, a server
takes a free port, files go under tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from longtake.tools.samples import walking_pose, write_animate_media

SLOW_FIXTURES = {"ray_session", "browser"}  # a test using one (even through another fixture) is in the full tier


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # the built-in 'tiny' model is built into this cache, never into the user's home; the CLI's provenance key
    # (longtake.private.home) too
    os.environ["LONGTAKE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["LONGTAKE_HOME"] = str(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny AnimateDiff pipeline directory (UNetMotionModel + VAE + CLIP + local tokenizer)."""
    from longtake.pipelines.tiny import build_tiny_animatediff

    path = tmp_path_factory.mktemp("models") / "tiny-animatediff"
    build_tiny_animatediff(path, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_pose_model(tmp_path_factory) -> str:
    """A tiny AnimateDiffControlNetPipeline directory (the tiny AnimateDiff model plus a pose ControlNet with
    random output convolutions), with a walking skeleton's keypoints beside it in pose.json."""
    from longtake.pipelines.tiny import build_tiny_animatediff

    path = tmp_path_factory.mktemp("models") / "tiny-pose"
    build_tiny_animatediff(path, seed=0, controlnet=True)
    walking_pose(path / "pose.json")
    return str(path)


@pytest.fixture(scope="session")
def tiny_pose_ip_model(tmp_path_factory) -> str:
    """The tiny pose model plus an IP-Adapter (ip_adapter/, image_encoder/, feature_extractor/), with beside it
    pose.json (a walking skeleton) and two photos of another size than the output (80 x 64): photo.png (a red
    figure on black) and photo2.png (a blue one on white)."""
    import numpy as np
    from PIL import Image

    from longtake.pipelines.tiny import build_tiny_animatediff

    path = tmp_path_factory.mktemp("models") / "tiny-pose-ip"
    build_tiny_animatediff(path, seed=0, controlnet=True, ip_adapter=True)
    walking_pose(path / "pose.json")
    for name, figure, ground in (("photo.png", (220, 40, 40), 0), ("photo2.png", (40, 60, 230), 255)):
        photo = np.full((64, 80, 3), ground, np.uint8)
        photo[8:60, 28:52] = figure
        photo[12:20, 34:46] = (240, 200, 160)  # a face
        Image.fromarray(photo).save(path / name)
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started once for the whole test session (2 cores: logical CPUs are oversubscribed); a new local
    one, never the multi-node cluster a test in the other pytest process may have up (test_bench_scale)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _tiny_wan(tmp_path_factory, name: str, **kw) -> str:
    from longtake.pipelines.tiny import build_tiny_wan

    path = tmp_path_factory.mktemp("models") / name
    build_tiny_wan(path, **kw)
    return str(path)


@pytest.fixture(scope="session")
def tiny_wan_model(tmp_path_factory) -> str:
    """A tiny Wan 2.1 T2V pipeline directory (WanTransformer3DModel + AutoencoderKLWan + UMT5 + local tokenizer)."""
    return _tiny_wan(tmp_path_factory, "tiny-wan", seed=0)


@pytest.fixture(scope="session")
def tiny_wan22_model(tmp_path_factory) -> str:
    """A tiny Wan 2.2 A14B-style pipeline: two transformer experts switching at boundary_ratio 0.875."""
    return _tiny_wan(tmp_path_factory, "tiny-wan22", seed=1, two_experts=True)


@pytest.fixture(scope="session")
def render_in_process():
    """render(request dict) -> the RenderResult of the in-process pool: the reference for Ray, farm and serve."""
    from longtake.actors.pool import InProcessPool
    from longtake.actors.worker import WorkerSpec
    from longtake.cluster.engine import prepare, run

    def render(request: dict):
        pool = InProcessPool(WorkerSpec(request["model"]))
        try:
            return run(prepare(request), pool, progress=False)
        finally:
            pool.shutdown()

    return render


CASES_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from longtake.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
        results.append({"rc": rc, "err": err.getvalue()})
    results.append({"ray_imported": "ray" in sys.modules, "diffusers_imported": "diffusers" in sys.modules})
    print(json.dumps(results))
""")


@pytest.fixture(scope="session")
def cli_cases():
    """Run `longtake` argument lists in one fresh process: [{rc, err}] per case (and, with report_imports,
    whether Ray or diffusers were imported by the end)."""

    def run(argvs: list[list[str]], tmp_path, report_imports: bool = False) -> list[dict]:
        proc = subprocess.run([sys.executable, "-c", CASES_SCRIPT, json.dumps(argvs)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "LONGTAKE_CACHE": str(tmp_path)})
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        return results if report_imports else results[:-1]

    return run


@pytest.fixture(scope="session")
def tiny_sim_model(tmp_path_factory) -> str:
    """A simulated Wan-14B-720p directory at a reduced size (64 x 64, 5-frame windows, 8 x 32 text), no sleep:
    the real model's channels, compression and scheduler (pipelines/sim.py)."""
    from longtake.pipelines.sim import build_sim

    path = tmp_path_factory.mktemp("models") / "tiny-sim"
    build_sim(path, "wan-14b-720p", height=64, width=64, native_window=5, overlap=2, text_tokens=8, text_dim=32,
              predict_s=0, decode_s=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_wan_animate_model(tmp_path_factory) -> str:
    """A tiny WanAnimatePipeline directory (a 16 px face), with beside it: pose.json (a walking skeleton),
    photo.png (the character, 64 x 64), face.mp4 (16 x 16), background.mp4 and mask.mp4 (64 x 64), 2 s at 8 fps."""
    from longtake.pipelines.tiny import build_tiny_wan_animate

    path = tmp_path_factory.mktemp("models") / "tiny-wan-animate"
    build_tiny_wan_animate(path, seed=0)
    write_animate_media(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sim_animate_model(tmp_path_factory) -> str:
    """The simulated Wan-Animate-14B-720p at the tiny Wan-Animate's size (64 x 64, a 16 px face, 5-frame
    windows), no sleep, with the same media beside it."""
    from longtake.pipelines.sim import build_sim

    path = tmp_path_factory.mktemp("models") / "tiny-sim-animate"
    build_sim(path, "wan-animate-14b-720p", height=64, width=64, native_window=5, overlap=2, text_tokens=8,
              text_dim=32, face_size=16, predict_s=0, decode_s=0)
    write_animate_media(path)
    return str(path)
