"""Developer tooling, installed and reachable from the CLI but apart from the runtime: nothing in the runtime
(request, core, pipelines, actors, cluster, serve, media) imports it.

    bench.py            `longtake bench`: every figure a ratio taken in one run (BENCHMARKS.md)
    bench_watermark.py  the watermark's robustness and PSNR table (`python -m longtake.tools.bench_watermark`)
    evaluate.py         `longtake eval`: the bundled model's quality suites (EVAL.md)
    train_default.py    the bundled model's training (`python -m longtake.tools.train_default`)
    train_control.py    its control branch's training (`python -m longtake.tools.train_control`)
    card.py             the bundled model's MODEL_CARD.md, written from its training record and eval
"""
