"""The serving limits: what one request and the queue may cost. Plain data (the CLI builds its flags
from it without importing torch or Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _limit(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class Limits:
    """What one request may cost on this server (docs/serving.md's limits table; `longtake serve --max-...`)."""

    max_seconds: float = _limit(120.0, "longest clip accepted, seconds")
    max_fps: float = _limit(30.0, "highest frame rate accepted")
    max_steps: int = _limit(50, "most denoising steps accepted")
    max_side: int = _limit(512, "largest height or width accepted, pixels")
    max_timeline_keys: int = _limit(64, "most timeline keys accepted (one text encoding each)")
    max_model_evaluations: int = _limit(10_000, "most window predictions (windows x steps) in one request")
    max_latent_mb: float = _limit(2048.0, "most MB the manager holds for one job: its latents in one step (the clip "
                                          "three times and every window's prediction) and its per-frame media "
                                          "(pose or plan frames, face, background, mask) and reference photo")
    max_queued: int = _limit(16, "queued + running jobs before 429")
    max_running: int = _limit(2, "jobs rendering at once")
    max_body_bytes: int = _limit(64 * 1024, "largest request body, bytes (413 above)")
    max_upload_bytes: int = _limit(512 * 2**20, "largest uploaded file (POST /v1/files), bytes (413 above)")
    max_uploads_per_key: int = _limit(100, "uploaded files one API key may hold at once (429 past it)")
    max_upload_bytes_per_key: int = _limit(4 * 2**30, "bytes of uploaded files one API key may hold at once "
                                                      "(413 past it)")
    max_event_streams: int = _limit(8, "event streams (GET /v1/videos/ID/events) one API key may have open at once "
                                       "on an ingress replica (429 past it)")
    task_timeout_s: float = _limit(600.0, "seconds one window or decode chunk may wait and run on a denoiser, "
                                          "queueing and scale-up included")
    max_attempts: int = _limit(3, "attempts per window, across replicas")
    blocklist_after: int = _limit(3, "failed calls after which a denoiser replica is replaced (0: never)")
    checkpoint_every: int = _limit(5, "steps between checkpoints of a job")
    allow_unlabelled: bool = _limit(False, "accept requests for no visible label (label 'none'; each such file says "
                                           "so in its metadata)")
    retain_uploads: str = _limit("90d", "how long uploaded files are kept (e.g. 90d, 12h), then deleted")
    retain_outputs: str = _limit("365d", "how long a finished job's video and files are kept, then deleted (reads "
                                         "answer 410)")
    sweep_every_s: float = _limit(3600.0, "seconds between retention sweeps")
    lease_s: float = _limit(60.0, "seconds without a heartbeat after which another server takes a job over")
    cp: int = _limit(1, "workers per denoiser replica: each replica is a group of cp workers (GPUs) on one node that "
                        "share every window's tokens (context parallelism, Wan families; max_replicas counts groups)")

    def __post_init__(self):
        from longtake.cluster.retention import parse_duration  # plain Python: no Ray, no torch
        from longtake.request import check_cp

        check_cp(self.cp)

        parse_duration("retain_uploads", self.retain_uploads)
        parse_duration("retain_outputs", self.retain_outputs)
