"""The measuring parts of `longtake bench`: per-window compute times, phase timings, the peak-memory
reset, the encoder timing and the projection model (the full bench is run by hand: BENCHMARKS.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from longtake import bench
from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.engine import prepare


def test_worker_times_every_window_and_the_engine_times_every_phase(tmp_path, tiny_model):
    pool = InProcessPool(WorkerSpec(tiny_model))
    try:
        request = dict(prompt="a red ball", seconds=4, fps=8, steps=3, window=8, overlap=2, model=tiny_model,
                       out=str(tmp_path / "a.mp4"))
        result, compute = bench.timed_render(pool, request)
        assert pool.stats() == [{"predict": [], "decode": []}]  # read and reset by timed_render
    finally:
        pool.shutdown()
    job = prepare(request)
    assert compute["predict_calls"] == len(job.windows) * 3 == result.model_evaluations
    assert 0 < compute["predict_sum"] < result.wall_s
    t = result.timings
    assert set(t) == {"encode_s", "denoise_s", "fuse_s", "scheduler_s", "decode_s"}
    assert t["fuse_s"] + t["scheduler_s"] < t["denoise_s"]
    assert compute["predict_sum"] < t["denoise_s"]  # in-process: predictions run inside the denoise phase
    assert t["encode_s"] + t["denoise_s"] + t["decode_s"] <= result.wall_s + 0.002  # (rounded to ms)


def test_peak_memory_reset_sees_a_new_lower_peak():
    if not bench._reset_peak():
        pytest.skip("no /proc/self/clear_refs here")
    block = np.ones(200 * 2**20 // 8)  # 200 MB touched
    high = bench._peak_mb()
    del block
    assert bench._reset_peak()
    assert bench._peak_mb() < high - 150


def test_encoding_speed_is_measured_on_real_ffmpeg_output(tmp_path):
    out = bench.encoding(64, seconds=2, tmp=tmp_path)
    from longtake.video import probe

    assert out[64]["frames"] == 16 and out[64]["realtime_x"] > 0
    assert probe(tmp_path / "enc512.mp4")["frames"] == 16


MEASURED = {"window_s": 0.5, "driver_step_s": 0.01, "transfer_s": 0.02, "decode_chunk_s": 0.1, "encode_fps": 400.0,
            "encode_s": 0.2}


def test_projection_on_one_worker_is_the_serial_sum():
    wall = bench.project(MEASURED, 1, windows=7, chunks=5, steps=20, frames=80, workers_per_node=8,
                         bandwidth_gbps=10, window_bytes=1e5)
    assert wall == pytest.approx(0.2 + 20 * (0.01 + 7 * 0.52) + max(5 * 0.1, 80 / 400))


def test_projection_rounds_windows_and_is_limited_by_the_drivers_network():
    args = dict(chunks=400, steps=20, frames=4800, workers_per_node=8, window_bytes=4e6)
    one = bench.project(MEASURED, 1, windows=400, bandwidth_gbps=100, **args)
    eff = {k: one / (k * bench.project(MEASURED, k, windows=400, bandwidth_gbps=100, **args)) for k in (8, 64, 400)}
    assert 0.9 < eff[8] <= 1.0 and eff[64] < eff[8]  # 400 windows on 64 workers: 7 rounds, not 6.25
    assert math.isclose(bench.project(MEASURED, 64, windows=400, bandwidth_gbps=100, **args),
                        0.2 + 20 * (0.01 + 7 * 0.52) + max(7 * 0.1, 4800 / 400))
    slow = bench.project(MEASURED, 64, windows=400, bandwidth_gbps=0.1, **args)  # a thin pipe to the driver
    assert slow > 3 * bench.project(MEASURED, 64, windows=400, bandwidth_gbps=100, **args)
    # on one node nothing crosses the network, whatever the bandwidth
    assert bench.project(MEASURED, 8, windows=400, bandwidth_gbps=0.1, **args) == \
        bench.project(MEASURED, 8, windows=400, bandwidth_gbps=100, **args)
