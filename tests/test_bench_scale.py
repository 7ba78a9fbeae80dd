"""`longtake bench --simulate` (tools/bench_scale.py) on a small simulated cluster: 2 nodes of 2 workers, the
simulated Wan-Animate at a reduced size (64 x 64, 5-latent-frame windows, a 16 px face), a short clip. The
same denoised latents for 1 and 4 workers and after a worker is killed; each window call carries exactly
its own media slice; the job's conditioning reaches each worker once."""

from __future__ import annotations

import json

import pytest

from longtake.cli import main
from longtake.tools import bench_scale

SIZES = dict(height=64, width=64, native_window=5, overlap=2, text_tokens=8, text_dim=32, face_size=16, decode_s=0)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return bench_scale.simulate("wan-animate-14b-720p", workers=(1, 4), seconds=3, steps=2, predict_s=0.05, kill=1,
                                tmp=tmp_path_factory.mktemp("scale"), per_node=2, **SIZES)


@pytest.mark.slow  # a Ray cluster of its own
def test_every_worker_count_and_a_kill_give_the_same_latents(result):
    runs = {(r["workers"], r["killed"]): r for r in result["runs"]}
    assert set(runs) == {(1, 0), (4, 0), (4, 1)} and result["nodes"] == 2
    assert len({r["latents_sha256"] for r in runs.values()}) == 1 and result["figures"]["same_frames"]
    assert runs[(4, 1)]["retries"] >= 1  # the killed worker's window ran again
    assert runs[(4, 0)]["frames"] == 3 * 16 and len(runs[(4, 0)]["frames_sha256"]) == 64  # the one delivered run


@pytest.mark.slow  # a Ray cluster of its own
def test_a_window_call_carries_its_own_media_slice_and_the_job_conditioning_once_per_worker(result):
    for r in result["runs"]:
        media = {(s, e): n for s, e, n in r["window_media"]}
        assert len(media) == result["windows"] and all(n > 0 for n in media.values())
        per_call = r["traffic"]["bytes"]["media"] / r["traffic"]["calls"]["predict"]
        assert max(media.values()) == result["window_media_slice_bytes"]
        assert per_call <= result["window_media_slice_bytes"] < result["conditioning_bytes"]["whole_clip_media"] / 2
        fetched = r["traffic"]["bytes"]["conditioning"]
        assert fetched % r["job_conditioning_bytes"] == 0  # whole fetches: one per worker that ran a window
        assert 1 <= fetched // r["job_conditioning_bytes"] <= r["workers"] + r["killed"]


@pytest.mark.slow  # a Ray cluster of its own
def test_the_json_figures_and_the_section_it_writes(result, tmp_path):
    f = result["figures"]
    assert set(f["efficiency"]) == {"1", "4"} and all(0 < v <= 1.05 for v in f["efficiency"].values())
    assert f["bytes_per_window_step_ratio"] > 0 and f["driver_ms_per_window_step"] > 0 and f["driver_rss_ratio"] > 0
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nkept\n")
    for _ in range(2):  # written twice: replaced, not appended
        bench_scale.write(result, str(tmp_path / "s.json"), str(md), "longtake bench --simulate x")
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count("<!-- scale:wan-animate-14b-720p:begin -->") == 1
    assert json.loads((tmp_path / "s.json").read_text())["figures"] == f


@pytest.mark.parametrize("args, field", [(["--simulate", "wan-15b"], "simulate"), (["--workers", "0,4"], "workers"),
                                         (["--seconds", "-1"], "seconds"), (["--kill", "8"], "kill"),
                                         (["--predict-s", "0"], "predict_s")])
def test_bad_bench_simulate_arguments_name_the_field(args, field, capsys):
    argv = ["bench", "--simulate", "wan-14b-720p", "--workers", "1,8", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {field}: got" in err and "Traceback" not in err


def test_a_run_this_machine_cannot_hold_is_refused_before_it_starts(capsys):
    """A 10-hour clip beside 64 simulated workers: refused up front (exit 2, the field, the memory it needs,
    what fits), not an hour in by Ray's out-of-memory kills."""
    assert main(["bench", "--simulate", "wan-14b-720p", "--workers", "64", "--seconds", "36000"]) == 2
    err = capsys.readouterr().err
    assert "error: seconds: got 36000" in err and "fits this machine's memory" in err and "GB" in err
    needed = bench_scale.memory_needed("wan-14b-720p", 36000, 64)
    assert needed > 2 * bench_scale.memory_needed("wan-14b-720p", 600, 64) > 0
    fit = bench_scale.seconds_that_fit("wan-14b-720p", 8, 64e9)
    assert bench_scale.memory_needed("wan-14b-720p", fit, 8) <= 64e9 < bench_scale.memory_needed("wan-14b-720p",
                                                                                                  fit + 2, 8)


def test_the_default_clip_is_shortened_to_what_this_machine_holds(monkeypatch, capsys):
    """No --seconds: the 10-minute default, shortened (and said) where 20 GB would not hold it beside 32
    simulated workers; the run gets the clip that fits."""
    import psutil

    monkeypatch.setattr(bench_scale, "MEMORY_SHARE", 20e9 / psutil.virtual_memory().total)
    got = {}

    def simulate(preset, **kw):  # the run itself is the slow tests' (above): stop where it would start
        got.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_scale, "simulate", simulate)
    assert main(["bench", "--simulate", "wan-14b-720p", "--workers", "1,32"]) == 130
    fit = bench_scale.seconds_that_fit("wan-14b-720p", 32, 20e9)
    assert bench_scale.SHORTEST_S <= fit < bench_scale.DEFAULTS["seconds"] and got["seconds"] == fit
    assert f"600 s clip beside 32 simulated workers needs about" in capsys.readouterr().err
    # 200 workers leave no room for any clip: refused, naming what to change
    assert main(["bench", "--simulate", "wan-14b-720p", "--workers", "200"]) == 2
    err = capsys.readouterr().err
    assert "error: seconds: got 600" in err and "fewer --workers" in err
