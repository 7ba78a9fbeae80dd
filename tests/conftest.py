"""Shared fixtures: a tiny AnimateDiff model built from configs, and one Ray for the session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # the built-in 'tiny' model is built into this cache, never into the user's home
    os.environ["LONGTAKE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny AnimateDiff pipeline directory (UNetMotionModel + VAE + CLIP + local tokenizer)."""
    from longtake.pipelines.tiny import build_tiny_animatediff

    path = tmp_path_factory.mktemp("models") / "tiny-animatediff"
    build_tiny_animatediff(path, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started once for the whole test session (2 cores: logical CPUs are oversubscribed)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
