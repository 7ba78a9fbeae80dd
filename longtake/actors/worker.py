"""A worker: one loaded backend, kept for its lifetime. Plain Python; `ray_pool` wraps it as an actor.

Workers have roles (`WorkerSpec.roles`): an encoder ("encode") turns the job's prompts into its
conditioning once; predictors ("predict", "decode") denoise windows and decode. A backend loads only
what its roles use, so predictors of a family with a large text encoder (Wan's UMT5) never hold it.

A window's prediction carries a `WindowConditioning`: the job's conditioning as a `Held` (its content hash
and where to fetch it: the pool's `put`) and the window's own slices of the per-frame conditioning (pose or
plan frames, face, background, mask). A worker fetches the job's conditioning once, keeps it by its hash
(`held`) until the pool releases it when the job ends (or HELD newer ones push it out), and attaches each
window's slices to it (`for_window`); each window's embeddings are made on the worker that predicts it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from longtake.pipelines import ROLES, load_backend
from longtake.pipelines.parallel import Member, join_group


@dataclass(frozen=True)
class WorkerSpec:
    model_path: str
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1  # torch intra-op threads on CPU (fixed: results must not depend on the pool)
    roles: tuple[str, ...] = ROLES  # what this worker does: encode, predict, decode
    cp: int = 1  # workers per window (context parallelism): this one is a member of a group of cp
    cp_mode: str = ""  # how the group attends: 'ulysses' or 'ring' (pipelines/parallel.py)


@dataclass(frozen=True, eq=False)
class Held:
    """A job's conditioning as the pool's `put` made it: `key` its content hash, `nbytes` its tensors' size,
    `value` the object (in-process) or where a worker fetches it from (the Ray pools': [ObjectRef], in a
    list so that Ray passes it unresolved: a worker that holds the key never fetches it again)."""

    key: str
    nbytes: int
    value: Any


@dataclass(frozen=True, eq=False)
class WindowConditioning:
    """A window prediction's conditioning: the job's (`Held`) and the window's own slices of the per-frame
    conditioning, name -> (n, ...) numpy frames (`core.windows.conditioning_frames`)."""

    job: Held
    frames: dict


HELD = 8  # job conditionings a worker keeps at most (serve runs several jobs at once; a job's end releases its own)
ENCODER_THREADS = 8  # torch threads of a CPU encoder beside GPU workers


def encoder_spec(spec: WorkerSpec) -> WorkerSpec:
    """The encode-only worker of a pool whose workers do not encode (a large text encoder), on the CPU: with
    a CPU pool's own dtype and thread count (frames must not depend on the pool); beside GPU workers in
    bfloat16 on a few threads (UMT5-XXL: 11 GB, about 5 TFLOP a prompt: seconds to tens)."""
    cpu = spec.device == "cpu"
    return replace(spec, device="cpu", dtype="float32" if cpu else "bfloat16",
                   threads=spec.threads if cpu else ENCODER_THREADS, roles=("encode",), cp=1, cp_mode="")


class Worker:
    def __init__(self, spec: WorkerSpec, member: Member | None = None):
        """`member`: this worker's place in its group when spec.cp > 1 (the executor starts the group's
        members together): it joins the group's process group first, and every member then runs each
        window's forward on its share of the tokens (pipelines/parallel.py)."""
        if spec.device == "cpu":
            torch.set_num_threads(spec.threads)
        self.spec, self.member = spec, member
        cp = None
        if spec.cp > 1:
            if member is None or member.size != spec.cp:
                raise ValueError(f"a worker of a group of {spec.cp} needs its place in it (got {member})")
            join_group(member, spec.device)
            cp = (spec.cp, spec.cp_mode)
        self.backend = load_backend(spec.model_path, device=spec.device, dtype=spec.dtype, roles=spec.roles, cp=cp)
        self.timings: dict[str, list[float]] = {"predict": [], "decode": []}  # seconds per call (for `bench`)
        self.held: OrderedDict[str, Any] = OrderedDict()  # content hash -> a job's conditioning, newest last

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": self.spec.device, "threads": torch.get_num_threads()}

    def stats(self, reset: bool = True) -> dict[str, list[float]]:
        """Seconds spent in each predict / decode call since the last reset: pure model time."""
        out = {k: list(v) for k, v in self.timings.items()}
        if reset:
            for v in self.timings.values():
                v.clear()
        return out

    def encode(self, prompts: list[str], negative_prompt: str, schedule):
        return self.backend.encode(prompts, negative_prompt, schedule)

    def fetch(self, held: Held) -> Any:
        """A job's conditioning from where the pool put it (in-process: the object; Ray actors override)."""
        return held.value

    def conditioning(self, cond) -> Any:
        """The backend's conditioning for one window: the job's, fetched once and kept by its hash, with the
        window's own frames attached; anything else (a backend object) as it is."""
        if not isinstance(cond, WindowConditioning):
            return cond
        key = cond.job.key
        if key in self.held:
            self.held.move_to_end(key)
        else:
            self.held[key] = self.fetch(cond.job)
            while len(self.held) > HELD:
                self.held.popitem(last=False)
        with warnings.catch_warnings():  # frames mapped read-only from Ray's object store: only ever read
            warnings.filterwarnings("ignore", message=".*not writable.*")
            frames = {name: torch.from_numpy(np.asarray(a)) for name, a in cond.frames.items()}  # Indexed: expanded
        return self.held[key].for_window(frames)

    def forget(self, key: str) -> None:
        """The job whose conditioning has this hash has ended (the pool's `release`)."""
        self.held.pop(key, None)

    def predict(self, z: torch.Tensor, t: torch.Tensor, cond, start: int, end: int,
                guidance: tuple[float, ...]) -> torch.Tensor:
        """One window: `cond` its `WindowConditioning` (or the backend's own object), `guidance` one scale
        per expert."""
        t0 = time.perf_counter()
        out = self.backend.predict(z, t, self.conditioning(cond), (start, end), guidance)
        self.timings["predict"].append(time.perf_counter() - t0)
        return out

    def decode(self, z: torch.Tensor) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.backend.decode(z)
        self.timings["decode"].append(time.perf_counter() - t0)
        return out

    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """Known frames (n, H, W, 3) uint8 -> their latents (1, C, n', h, w): the inverse of `decode`."""
        return self.backend.encode_frames(frames)

    def decode_stream(self, z: torch.Tensor, chunk: int, skip: int = 0):
        """Frame chunks of one ordered decode session (causal VAEs); the first `skip` chunks are decoded
        (they feed the cache) but not sent: a retried stream resumes where the lost one stopped."""
        t0 = time.perf_counter()
        for i, frames in enumerate(self.backend.decode_stream(z, chunk)):
            if i >= skip:
                self.timings["decode"].append(time.perf_counter() - t0)
                yield frames
            t0 = time.perf_counter()
