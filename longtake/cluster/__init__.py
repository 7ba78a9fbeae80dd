"""The engine and what runs jobs: no HTTP, no Ray (Ray is reached through `actors/`).

    engine.py      prepare(request) -> Job; run(job, pool) -> RenderResult, in four numbered steps
    inputs.py      known frames (image, keyframes, extend, lead_into, video) and their latents
    sampler.py     the latents and scheduler states per frame range; when each window runs (wavefront)
    delivery.py    the output sink chain: frames_sha256, label, watermark, the MP4, the contact sheet
    checkpoint.py  checkpoints (safetensors, no pickle) and the job's fingerprint
    runtime.py     `render()`: the Python API (in process, or on Ray workers through actors/ray_boot)
    jobs.py        the job store (SQLite) and leases
    job_runner.py  one claimed job's execution: lease, checkpoints, the stop policy (farm and serve)
    farm.py        the studio farm: specs, submit, control, and the Runner (a thin scheduler over job_runner)
    retention.py   deletion and retention, audited

May import: the request, the pure core, the model families (`pipelines`: inspection and schedulers), the
executors (`actors/`), media, compliance (label, watermark, provenance) and the bundled model's planner.
Never `serve/`, the CLI or `tools/`.
"""
