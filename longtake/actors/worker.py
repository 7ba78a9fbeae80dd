"""A worker: one loaded backend, kept for its lifetime. Plain Python; `ray_pool` wraps it as an actor.

The worker turns the job's conditioning (key-prompt embeddings + per-frame schedule) into the
embeddings of one window's frames, so only the few key embeddings travel, once per job.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from longtake.pipelines import load_backend
from longtake.pipelines.windows import interpolate_embeddings


@dataclass(frozen=True)
class WorkerSpec:
    model_path: str
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1  # torch intra-op threads on CPU (fixed: results must not depend on the pool)


@dataclass
class Conditioning:
    """A job's text conditioning: key embeddings and the per-frame interpolation schedule."""

    keys: torch.Tensor  # (K, seq, dim)
    negative: torch.Tensor  # (1, seq, dim)
    a: torch.Tensor  # (F,) key index before each frame
    b: torch.Tensor  # (F,) key index after each frame
    alpha: torch.Tensor  # (F,) weight of key b

    def frames(self, start: int, end: int) -> torch.Tensor:
        return interpolate_embeddings(self.keys, self.a, self.b, self.alpha, start, end)  # (L, seq, dim)


class Worker:
    def __init__(self, spec: WorkerSpec):
        if spec.device == "cpu":
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.backend = load_backend(spec.model_path, device=spec.device, dtype=spec.dtype)
        self.timings: dict[str, list[float]] = {"predict": [], "decode": []}  # seconds per call (for `bench`)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": self.spec.device, "threads": torch.get_num_threads()}

    def stats(self, reset: bool = True) -> dict[str, list[float]]:
        """Seconds spent in each predict / decode call since the last reset: pure model time."""
        out = {k: list(v) for k, v in self.timings.items()}
        if reset:
            for v in self.timings.values():
                v.clear()
        return out

    def encode(self, prompts: list[str], negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.encode(prompts, negative_prompt)

    def predict(
        self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning, start: int, end: int, guidance: float
    ) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.backend.predict(z, t, cond.frames(start, end), cond.negative, guidance)
        self.timings["predict"].append(time.perf_counter() - t0)
        return out

    def decode(self, z: torch.Tensor) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.backend.decode(z)
        self.timings["decode"].append(time.perf_counter() - t0)
        return out
