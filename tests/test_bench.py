"""The measuring parts of `longtake bench`: per-window compute times, phase timings, the peak-memory
reset, the encoder timing, the projection model and the start-up of a short render (the full bench is run
by hand: BENCHMARKS.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.engine import prepare
from longtake.tools import bench

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)


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
    assert set(t) == {"encode_s", "denoise_s", "fuse_s", "scheduler_s", "driver_s", "decode_s"}
    assert t["fuse_s"] + t["scheduler_s"] < t["denoise_s"]
    # the driver thread's CPU time: in-process, the predictions run on it too
    assert 0.5 * compute["predict_sum"] < t["driver_s"] <= t["denoise_s"] + 0.002
    assert compute["predict_sum"] < t["denoise_s"]  # in-process: predictions run inside the denoise phase
    assert t["encode_s"] + t["denoise_s"] + t["decode_s"] <= result.wall_s + 0.002  # (rounded to ms)


def test_startup_is_a_new_process_wall_time_minus_the_engines_and_says_where_it_goes(tmp_path, tiny_model):
    from longtake.video import probe

    out = bench.startup(tiny_model, "cpu", tmp_path)
    parts = out["parts"]
    assert out["startup_s"] == pytest.approx(out["process_wall_s"] - parts["engine_s"], abs=0.002)
    # a short job on the CPU: one worker in the render's own process, no Ray started; loading the model is
    # the workers' start, and the rest (interpreter, imports, validation) is positive when the parts are honest
    assert not out["ray"] and out["workers"] == 1 and parts["ray_start_s"] == 0 and parts["workers_start_s"] > 0
    assert 0.1 < parts["interpreter_imports_and_rest_s"] < out["startup_s"]
    assert sum(parts.values()) == pytest.approx(out["process_wall_s"], abs=0.01)
    assert probe(tmp_path / "startup.mp4")["frames"] == bench.STARTUP_SECONDS * 8


def test_startup_with_ray_workers_counts_ray_and_the_workers_starting(tmp_path, tiny_model):
    out = bench.startup(tiny_model, "cpu", tmp_path, workers=2)
    parts = out["parts"]
    # Ray and two workers started and stopped in the render's own process
    assert out["ray"] and out["workers"] == 2 and parts["ray_start_s"] > 0.2 and parts["workers_start_s"] > 0.2
    assert parts["stop_s"] > 0 and 0.1 < parts["interpreter_imports_and_rest_s"] < out["startup_s"]


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


MEASURED = {"window_s": 0.5, "driver_s": 0.004, "fuse_step_s": 0.001, "transfer_s": 0.02, "decode_chunk_s": 0.1,
            "encode_fps": 400.0, "encode_s": 0.2}


def test_projection_on_one_worker_is_the_serial_sum():
    kw = dict(windows=7, chunks=5, steps=20, frames=80, workers_per_node=8, bandwidth_gbps=10, window_bytes=1e5)
    decode = max(5 * 0.1, 80 / 400)
    # wavefront: the driver's work overlaps the worker's; barrier: the fusion and step wait for every window
    assert bench.project(MEASURED, 1, **kw) == pytest.approx(0.2 + 20 * 7 * 0.52 + decode)
    assert bench.project(MEASURED, 1, **kw, schedule="barrier") == pytest.approx(0.2 + 20 * (7 * 0.001 + 7 * 0.52)
                                                                                 + decode)


def test_projection_wavefront_has_no_rounds_and_is_bounded_by_chain_driver_and_network():
    args = dict(chunks=400, steps=20, frames=4800, workers_per_node=8, window_bytes=4e6)
    decode = max(7 * 0.1, 4800 / 400)
    wave = bench.project(MEASURED, 64, windows=400, bandwidth_gbps=100, **args)
    barrier = bench.project(MEASURED, 64, windows=400, bandwidth_gbps=100, **args, schedule="barrier")
    assert wave == pytest.approx(0.2 + math.ceil(400 * 20 / 64) * 0.52 + decode)  # 125 window-steps each
    assert barrier == pytest.approx(0.2 + 20 * (400 * 0.001 + 7 * 0.52) + decode)  # 7 rounds a step, not 6.25
    assert wave < barrier
    # more workers than windows: the chain of steps; a slow driver: its own time per window-step
    fast_driver = {**MEASURED, "driver_s": 0.0001}
    assert bench.project(fast_driver, 1000, windows=400, bandwidth_gbps=1e6, **{**args, "workers_per_node": 1000}) \
        == pytest.approx(0.2 + 20 * 0.52 + max(math.ceil(400 / 1000) * 0.1, 4800 / 400))
    slow_driver = {**MEASURED, "driver_s": 0.05}
    assert bench.project(slow_driver, 64, windows=400, bandwidth_gbps=100, **args) == \
        pytest.approx(0.2 + 400 * 20 * 0.05 + decode)
    thin = bench.project(MEASURED, 64, windows=400, bandwidth_gbps=0.1, **args)  # a thin pipe to the driver
    assert thin > 3 * wave
    # on one node nothing crosses the network, whatever the bandwidth
    assert bench.project(MEASURED, 8, windows=400, bandwidth_gbps=0.1, **args) == \
        bench.project(MEASURED, 8, windows=400, bandwidth_gbps=100, **args)


def _wan_frames(m: int) -> int:
    return 4 * (21 * m - 1) + 1  # 21 latent frames per native window, 4k+1 frames


def test_wan_windows_against_one_whole_clip_window(tmp_path, tiny_wan_model):
    # diffusers on one thread here: several threads on a busy 2-core machine make small ops crawl
    out = bench.wan_scaling("cpu", tmp_path, quick=True, multiples=(1, 2), size=32, steps=1, in_process=True,
                            model=tiny_wan_model, diffusers_threads=1)
    rows = out["rows"]
    assert [r["multiple"] for r in rows] == [1, 2]
    assert (out["window"], out["overlap"], out["size"], out["steps"]) == (21, 5, 32, 1)
    for r in rows:
        m = r["multiple"]
        assert r["frames"] == r["diffusers_frames"] == r["longtake_frames"] == _wan_frames(m)
        assert r["latent_frames"] == 21 * m
        assert r["diffusers_mode"] == "pipeline"
        assert 0 < r["diffusers_denoise_s"] < r["diffusers_wall_s"] and r["diffusers_peak_mb"] >= 0
        assert 0 < r["longtake_compute_s"] and 0 < r["longtake_denoise_s"] < r["longtake_wall_s"]
        assert r["longtake_predict_calls"] == r["windows"]  # one step: one prediction per window
        assert r["vs_diffusers"] == pytest.approx(r["diffusers_wall_s"] / r["longtake_wall_s"])
    one, two = rows
    assert one["windows"] == 1 < two["windows"]
    assert one["growth_diffusers"] == one["growth_longtake"] == 1.0
    assert two["growth_longtake"] == pytest.approx(two["longtake_wall_s"] / one["longtake_wall_s"])
    # one window: diffusers' whole-clip pipeline and longtake render the same frames (uint8 rounding only)
    assert one["frames_max_diff"] is not None and one["frames_max_diff"] <= 1
    assert two["frames_max_diff"] is None  # several windows: not the same computation
    section = "\n".join(bench.wan_table(out))
    assert section.startswith("## Wan: windows against one whole-clip window (tiny-wan)")
    assert section.count("\n| 1x |") == section.count("\n| 2x |") == 1


def test_wan_length_over_the_budget_is_measured_as_one_transformer_pass(tmp_path, tiny_wan_model):
    out = bench.wan_scaling("cpu", tmp_path, quick=True, multiples=(1, 2), size=32, steps=1, in_process=True,
                            model=tiny_wan_model, diffusers_threads=1, budget_s=0)
    one, two = out["rows"]
    assert one["diffusers_mode"] == "pipeline" and one["diffusers_wall_s"] > 0  # the first length is always run
    assert two["diffusers_mode"].startswith("transformer forward only")
    assert two["diffusers_wall_s"] is None and two["vs_diffusers"] is None and two["growth_diffusers"] is None
    assert two["diffusers_forward_s"] > 0 and two["longtake_wall_s"] > 0  # longtake still renders it
    assert "not run whole" in "\n".join(bench.wan_table(out))
