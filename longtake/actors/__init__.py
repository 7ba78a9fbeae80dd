"""The executors: where a job's tasks run, and the only place besides `serve/` that knows Ray.

    pool.py        the pool core: the Pool interface, the one ticket book (`Tickets`: queue by key, cancel,
                   attempts), the one `RetryPolicy`, `ordered` (imap on tickets), and the in-process pool
                   (the reference result)
    worker.py      a worker: one loaded model family (its roles: encode, predict, decode), plain Python
    ray_pool.py    Ray actors, one per GPU or CPU slot: dynamic dispatch, dead and hung workers replaced
    serve_pool.py  serve's Denoiser deployment as a pool: jobs share its replicas shortest first
    ray_boot.py    the one Ray bootstrap: start, join, stop, resources; fate-sharing with its starter

May import: torch, Ray and Ray Serve (the executors and ray_boot only), the model families (`pipelines`,
through `worker.py`) and the pure core. Never the engine, the job store or HTTP.
"""
