"""Checkpoints of a running job: the latents, the scheduler's state and the step index.

    ckpt = Checkpointer(job_dir / "checkpoints", every=5, fingerprint=...)
    ckpt.save(step, z, scheduler)          # atomic: temp file, fsync, rename; keeps the newest `keep`
    ckpt.save(step, z, [state, ...])       # or the states (`scheduler_state`) of one scheduler per frame range
    ckpt.save(step, z, states, private)    # and the windows' private frames (W, C, p, h, w) (sampler.py)
    state = ckpt.load_latest()             # newest valid one, or None; corrupt ones are skipped, logged
    restore_scheduler(scheduler, state.schedulers[0])  # (the sampler restores one per frame range)

One safetensors file per checkpoint: tensors (z, the private frames if any, and each scheduler's tensor state) plus metadata (step,
the schedulers' scalar state, the job's fingerprint, and a SHA-256 over every tensor's bytes). No
pickle anywhere: a checkpoint file is data only. A truncated file fails to parse; a flipped byte fails
the checksum; either way the previous checkpoint is used, or the job restarts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longtake.core.frames import update_digest
from longtake.pipelines import weights_identity

logger = logging.getLogger(__name__)

NAME = re.compile(r"^step-(\d{6})\.safetensors$")


@dataclass
class CheckpointState:
    step: int  # denoising steps already applied to z
    z: torch.Tensor  # (1, C, F, h, w) float32
    schedulers: list[dict]  # per frame range (then per window's private frames): attribute -> value
    path: Path
    private: torch.Tensor | None = None  # (W, C, p, h, w): each window's private frames (sampler.py), if any


# Instance attributes a checkpoint leaves out: the config (the scheduler is rebuilt from the model's own), and
# what __init__ or set_timesteps derive from it again before a restore (PNDM's timestep tables, SA-Solver's
# tau function). Anything else that cannot be stored fails the save: a resume without it would not be exact.
DERIVED_SCHEDULER_ATTRIBUTES = frozenset({"_internal_dict", "config", "_timesteps", "prk_timesteps",
                                          "plms_timesteps", "tau_func"})
_SCALARS = (bool, int, float, str)


def _copy(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    """A tensor to store: a copy of its own on the CPU (some share memory: views; safetensors refuses them)."""
    return tensor.detach().cpu().clone() if copy else tensor.detach()


def scheduler_state(scheduler, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The scheduler's mutable state after `set_timesteps`: tensors apart, scalars as JSON. `copy=False`:
    the tensors themselves (the sampler's snapshots: a diffusers scheduler replaces its tensors, it never
    writes them; `Checkpointer.save` copies what it writes).

    Generic over diffusers schedulers: every instance attribute that is a tensor, a list of tensors/None
    (multistep solvers' history), a scalar or a list of scalars. An attribute of any other type (a dict, a
    numpy array, a generator...) raises CheckpointError naming the scheduler and the attribute, unless it
    is one of DERIVED_SCHEDULER_ATTRIBUTES: state that cannot be saved is never silently dropped."""
    tensors, scalars = {}, {}
    for name, value in vars(scheduler).items():
        if name.startswith("__") or name in DERIVED_SCHEDULER_ATTRIBUTES:
            continue
        if isinstance(value, np.generic) and isinstance(value.item(), _SCALARS):
            value = value.item()  # a numpy scalar: stored as the Python one
        if isinstance(value, torch.Tensor):
            tensors[f"scheduler.{name}"] = _copy(value, copy)
        elif isinstance(value, (list, tuple)) and all(v is None or isinstance(v, torch.Tensor) for v in value) \
                and any(isinstance(v, torch.Tensor) for v in value):
            scalars[name] = {"tensor_list": len(value)}
            for i, v in enumerate(value):
                if v is not None:
                    tensors[f"scheduler.{name}.{i}"] = _copy(v, copy)
        elif value is None or isinstance(value, _SCALARS):
            scalars[name] = {"value": value}
        elif isinstance(value, (list, tuple)) and all(v is None or isinstance(v, _SCALARS) for v in value):
            scalars[name] = {"value": list(value)}  # scalars, or a solver history not yet filled (all None)
        else:
            kind = type(value).__name__
            if isinstance(value, (list, tuple)):
                kind += " of " + ", ".join(sorted({type(v).__name__ for v in value}))
            raise CheckpointError(f"cannot checkpoint {type(scheduler).__name__}.{name}: a {kind} (a checkpoint "
                                  f"stores tensors, lists of tensors and JSON scalars); a resume without it "
                                  f"would not be exact")
    return tensors, scalars


def restore_scheduler(scheduler, state: dict) -> None:
    """Put one saved scheduler state (a `CheckpointState.schedulers` entry) back (call after `set_timesteps`
    with the same step count)."""
    for name, value in state.items():
        setattr(scheduler, name, value)


def _tensor_state(prefix: str, tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    """One scheduler's state from a checkpoint's tensors (named `prefix` + attribute) and JSON scalars."""
    state: dict = {}
    for name, entry in scalars.items():
        if "tensor_list" in entry:
            state[name] = [tensors.get(f"{prefix}{name}.{i}") for i in range(entry["tensor_list"])]
        else:
            state[name] = entry["value"]
    for key, t in tensors.items():
        if key.startswith(prefix) and "." not in key[len(prefix):]:
            state[key[len(prefix):]] = t
    return state


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CheckpointError(Exception):
    """A checkpoint file that cannot be trusted (truncated, corrupt, or from another plan)."""


class Checkpointer:
    def __init__(self, directory: str | Path, every: int, fingerprint: str, keep: int = 2, log=None):
        if every < 1:
            raise ValueError(f"checkpoint_every: got {every}, expected an integer >= 1")
        self.dir = Path(directory)
        self.every = every
        self.fingerprint = fingerprint  # what the latents belong to: model, plan, seed, prompts...
        self.keep = max(1, keep)
        self.log = log or logger
        self.saved: list[float] = []  # seconds per save (for the cost figure)

    def due(self, step: int, steps: int) -> bool:
        """After `step` steps: every k steps, and always after the last one (decode may still fail)."""
        return step % self.every == 0 or step == steps

    def paths(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir() if NAME.match(p.name)), reverse=True)

    def save(self, step: int, z: torch.Tensor, scheduler, private: torch.Tensor | None = None) -> Path:
        """`scheduler`: a scheduler, or a list of `scheduler_state`s (one per frame range, then one per
        window's private frames); `private`: the windows' private frames (W, C, p, h, w), or None."""
        t0 = time.perf_counter()
        self.dir.mkdir(exist_ok=True)  # never its parent: a deleted job's directory is not made again
        states = scheduler if isinstance(scheduler, list) else [scheduler_state(scheduler)]
        tensors, scalars = {}, []
        for r, (range_tensors, range_scalars) in enumerate(states):
            tensors.update({f"{r}.{name}": _copy(t, True) for name, t in range_tensors.items()})
            scalars.append(range_scalars)
        tensors["z"] = z.detach().cpu().clone()
        if private is not None:
            tensors["private"] = private.detach().cpu().clone()
        meta = {"step": str(step), "fingerprint": self.fingerprint, "schedulers": json.dumps(scalars),
                "sha256": _digest(tensors)}
        final = self.dir / f"step-{step:06d}.safetensors"
        tmp = self.dir / f".{final.name}.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        self.saved.append(time.perf_counter() - t0)
        return final

    def read(self, path: Path) -> CheckpointState:
        """Load and verify one checkpoint; raises CheckpointError."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a bad header or a short file
            raise CheckpointError(f"unreadable ({type(e).__name__}: {e})") from e
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointError("made for a different request or plan")
        if _digest(tensors) != meta.get("sha256"):
            raise CheckpointError("checksum mismatch")
        try:
            scalars = json.loads(meta["schedulers"])  # (a checkpoint of an older longtake has "scheduler")
            step = int(meta["step"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"bad metadata ({type(e).__name__}: {e})") from e
        states = [_tensor_state(f"{r}.scheduler.", tensors, entry) for r, entry in enumerate(scalars)]
        return CheckpointState(step=step, z=tensors["z"], schedulers=states, path=path, private=tensors.get("private"))

    def load_latest(self) -> CheckpointState | None:
        """The newest checkpoint that verifies; corrupt ones are logged and skipped."""
        paths = self.paths()
        for i, path in enumerate(paths):
            try:
                return self.read(path)
            except CheckpointError as e:
                fallback = paths[i + 1].name if i + 1 < len(paths) else "step 0 (no valid checkpoint left)"
                self.log.warning("checkpoint %s is corrupt: %s; falling back to %s", path.name, e, fallback)
        return None

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                p.unlink(missing_ok=True)
            self.dir.rmdir()


def fingerprint(job, dtype: str, device: str) -> str:
    """What a job's latents depend on (`job`: an engine.Job): a checkpoint is only reused for the same fingerprint. That includes
    the model's weights (`weights_identity`: paths, sizes and times of its files) and the dtype and device
    the workers run in (the pool's WorkerSpec.dtype / .device): a job paused on a GPU in float16 never
    resumes from those latents on a CPU in float32. (Not the output path, the preview or the worker count:
    they do not change the latents.)"""
    req = job.request
    data = {"model": job.model.path, "weights": weights_identity(job.model.path), "dtype": dtype,
            "device": device, "frames": job.frames, "size": [job.height, job.width], "steps": job.steps,
            "guidance": job.guidance, "windows": job.windows, "seed": req.seed, "noise": job.noise,
            "weighting": req.weighting, "keys": [[k.at, k.prompt] for k in job.keys],
            "negative": req.negative_prompt, "fps": req.fps}
    if job.inputs.pinned or job.loop or job.inputs.source is not None:  # the inputs (file hashes) and where they sit
        data["inputs"] = {"hashes": job.inputs.hashes, "pinned": [[p.source, p.frame, len(p.pixels)]
                                                                  for p in job.inputs.pinned], "loop": job.loop}
    if job.model.experts > 1:
        data["guidance_2"] = job.guidance_2
    if job.control is not None:  # the pose as drawn (retargeting and resampling included)
        pose = hashlib.sha256()
        update_digest(pose, job.control)  # the RGB frames' bytes, however they are held
        data["pose"] = {"sha256": pose.hexdigest(), "scale": job.control_scale}
    if job.media:  # the reference photo, face, background and mask as read (resized), and the mode
        data["media"] = {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
                         for name, a in sorted(job.media.items())}
        data["animate_mode"] = req.animate_mode
    if job.model.options.get("private_frames"):  # the windows' own frames are in the checkpoint too
        data["private_frames"] = job.model.options["private_frames"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
