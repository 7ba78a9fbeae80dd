"""What the commands write where: stdout carries only the result (one JSON object with --json, whatever a
library or a dying Ray worker prints), stderr only longtake's own lines (no bar of a library building a tiny
model), counts in plain words ("1 worker", "1 item would be deleted"), and bench / eval write a Markdown
table only where asked."""

from __future__ import annotations

import pytest

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from longtake.cli import build_parser

pytestmark = pytest.mark.slow  # renders or starts Ray: the full tier only (conftest.py)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--seconds", "2", "--fps", "8", "--steps", "2", "--window", "8", "--overlap", "2"]
# longtake's own stderr lines: its progress bars, its messages, its log records
OWN = re.compile(r"^(denoise|decode|eval|bench)\b|^longtake\b|^(DEBUG|INFO|WARNING|ERROR|CRITICAL) longtake[.:]"
                 r"|^API token \(saved to ")


def foreign_lines(stderr: str) -> list[str]:
    """Lines on stderr that longtake did not write (a progress bar redraws with \\r: each draw is a line)."""
    lines = (line.strip() for line in re.split(r"[\r\n]", stderr))
    return [line for line in lines if line and not OWN.search(line)]


def test_in_process_quiet_render_prints_nothing_but_the_result(tmp_path, tiny_model):
    out = tmp_path / "q.mp4"
    proc = subprocess.run([sys.executable, "-m", "longtake", "render", "a red ball", "--model", tiny_model, *TINY,
                           "--in-process", "-q", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # diffusers' "Loading pipeline components" and transformers' "Loading weights" bars and warnings are gone
    assert proc.stderr == "", foreign_lines(proc.stderr)
    assert proc.stdout.startswith(f"wrote {out}: 16 frames") and len(proc.stdout.splitlines()) == 1
    assert " x 2 steps on 1 worker in " in proc.stdout, proc.stdout  # in-process: one worker, not "1 workers"


def kill_tree(proc: subprocess.Popen) -> None:
    """A command that failed the test: kill it and the Ray processes it started."""
    if proc.poll() is None:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait()


def _name(p: psutil.Process) -> str:
    try:
        return (p.cmdline() or [""])[0]
    except psutil.Error:
        return ""


def test_render_json_survives_a_killed_worker(tmp_path, tiny_model):
    """A Ray worker killed mid-render: the render replaces it, retries its window and succeeds; Ray's
    driver prints the raylet's "A worker died or was killed while executing a task..." on sys.stdout, which
    must not reach stdout: stdout is exactly the one JSON summary. On stderr, longtake says what happened
    and nothing is a library's (that raylet line, the token-authentication warning: in the debug log)."""
    out = tmp_path / "k.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "longtake", "render", "a red ball", "--model", tiny_model, "--seconds", "4",
         "--fps", "8", "--steps", "10", "--window", "8", "--overlap", "2", "--workers", "2", "--json", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        deadline = time.time() + 180
        while "denoise" not in seen and time.time() < deadline:  # the workers are predicting windows
            char = proc.stderr.read(1)
            if not char:
                break
            seen += char
        assert "denoise" in seen, seen
        names = {p: _name(p) for p in psutil.Process(proc.pid).children(recursive=True)}
        workers = [p for p, name in names.items() if name.startswith("ray::Worker")]  # the pool's actors
        assert len(workers) == 2, sorted(names.values())
        workers[0].kill()
        stdout, rest = proc.communicate(timeout=240)
    finally:
        kill_tree(proc)
    stderr = seen + rest
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)  # exactly one JSON object: nothing before or after it
    assert isinstance(summary, dict) and summary["frames"] == 32 and summary["workers"] == 2
    assert out.is_file()
    assert re.search(r"WARNING longtake\S*: worker \d died", stderr), stderr  # longtake tells of the death
    assert foreign_lines(stderr) == []


def _serve_jobs(base: str, token: str, tmp_path) -> tuple[dict, dict]:
    """A job that renders, and one that passes the server's checks but fails as it runs (control_scale with a
    context showing no object: only its pixels tell the bundled model's plan there is nothing to follow)."""
    import numpy as np

    from longtake.video import VideoWriter

    auth = {"Authorization": f"Bearer {token}"}
    with VideoWriter(tmp_path / "blank.mp4", 64, 64, 8) as w:
        w.write(np.full((8, 64, 64, 3), (30, 50, 160), np.uint8))
    with open(tmp_path / "blank.mp4", "rb") as f:
        blank = requests.post(f"{base}/v1/files", headers=auth, files={"file": f}, timeout=60).json()["id"]
    ids = [requests.post(f"{base}/v1/videos", headers=auth, json=body, timeout=60).json()["id"] for body in (
        {"prompt": "a red ball", "seconds": 1, "steps": 2},
        {"prompt": "a red ball", "seconds": 1, "steps": 2, "extend": blank, "control_scale": 0.5})]
    deadline, jobs = time.time() + 240, {}
    while len(jobs) < 2 and time.time() < deadline:
        for job_id in ids:
            job = requests.get(f"{base}/v1/videos/{job_id}", headers=auth, timeout=60).json()
            if job["status"] in ("done", "failed", "cancelled"):
                jobs[job_id] = job
        time.sleep(0.5)
    return jobs[ids[0]], jobs[ids[1]]


def test_serve_from_any_directory_says_failures_and_stops_at_once_on_sigint(tmp_path):
    """Started from the directory above a clone (a folder named longtake, without __init__.py, in the working
    directory, which Ray puts first on its workers' sys.path), serve's replicas still import the installed
    package: a job renders to the end. A job that fails says so on serve's stderr, not only in its log.
    `longtake serve ... &` from a script inherits SIGINT as ignored: serve installs its own handler, says
    "stopping..." at once (stopping takes a while), stops, and leaves stdout empty (Ray's "Task
    ServeController.graceful_shutdown failed..." notice is not printed there) and stderr longtake's own."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "longtake" / "tests").mkdir(parents=True)  # a clone's top directory, seen from above
    proc = subprocess.Popen([str(Path(sys.executable).parent / "longtake"), "serve", "--port", str(port),
                             "--data-dir", str(tmp_path / "serve")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), cwd=tmp_path)
    lines: list[tuple[float, str]] = []  # (when, line) on stderr
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while not any("(Ctrl-C to stop)" in line for _, line in lines) and time.time() < deadline:
            assert proc.poll() is None, "".join(line for _, line in lines)
            time.sleep(0.1)
        assert any("(Ctrl-C to stop)" in line for _, line in lines), "".join(line for _, line in lines)
        said = "".join(line for _, line in lines)
        assert f"web monitor: http://127.0.0.1:{port}/" in said and "longtake keys add" in said, said
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=30)  # where it says the monitor is
        assert page.status_code == 200 and 'id="login"' in page.text
        token = (tmp_path / "serve" / "api_token").read_text().strip()
        done, failed = _serve_jobs(f"http://127.0.0.1:{port}", token, tmp_path)
        assert done["status"] == "done", done
        assert failed["status"] == "failed" and "control_scale" in failed["error"], failed
        deadline = time.time() + 10
        while not any(f"job {failed['id']} failed: " in line for _, line in lines) and time.time() < deadline:
            time.sleep(0.2)
        asked = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # without a handler of its own, serve would ignore it and run on
    finally:
        kill_tree(proc)
    reader.join(10)
    stderr = "".join(line for _, line in lines)
    said = [when - asked for when, line in lines if line == "longtake serve: stopping...\n"]
    assert said and said[0] < 5, stderr  # at once, not after the ~10 s it takes to stop
    assert proc.returncode == 0, stderr
    assert proc.stdout.read() == ""
    assert foreign_lines(stderr) == []
    assert f"longtake serve: job {failed['id']} failed: request: control_scale: got 0.5" in stderr, stderr
    assert f"job {done['id']}" not in stderr


def _result(path: str) -> dict:
    """A real result from the repository (JSON turned the integer keys, such as worker counts, into strings)."""
    return json.loads((ROOT / path).read_text(),
                      object_hook=lambda d: {int(k) if k.isdigit() else k: v for k, v in d.items()})


def test_bench_and_eval_write_a_table_only_where_asked(tmp_path, monkeypatch):
    from longtake.tools import bench, evaluate

    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    for command, module, result in (("bench", bench, _result("benchmarks/bench-quick.json")),
                                    ("eval", evaluate, _result("longtake/models/default/eval.json"))):
        args = parser.parse_args([command])
        assert args.table is None
        module.write(result, args.out, args.table, f"longtake {command}")  # what cmd_bench / cmd_eval do
        assert [p.name for p in tmp_path.iterdir()] == [args.out]  # the JSON, no Markdown table
        assert not list(tmp_path.glob("*.md"))
        Path(args.out).unlink()

        args = parser.parse_args([command, "--out", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md")])
        module.write(result, args.out, args.table, f"longtake {command}")
        assert (tmp_path / "t.md").read_text().startswith("# ")
        for p in tmp_path.iterdir():
            p.unlink()


def test_printed_results_are_strict_json():
    """bench and eval print their figures as JSON: NaN (an eval summary's motion that no clip had) is null,
    not Python's NaN, which other JSON parsers refuse."""
    from longtake.cli.output import strict_json

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    figures = {"seam_ratio": float("nan"), "by_motion": {"left": 0.5, "up": float("nan")}, "ratios": [float("inf"), 1]}
    assert json.loads(json.dumps(strict_json(figures)), parse_constant=refuse) == \
        {"seam_ratio": None, "by_motion": {"left": 0.5, "up": None}, "ratios": [None, 1]}


def test_building_a_tiny_model_shows_no_library_bars(tmp_path, cli_cases, monkeypatch):
    """The first `--model tiny-wan` builds the model into the cache: transformers' "Writing model shards" bar
    is not shown (here the command then refuses the width: its one line is all of stderr)."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # (the bars' default: on)
    res, = cli_cases([["render", "a ball", "--model", "tiny-wan", "--width", "30", "--out", str(tmp_path / "o.mp4")]],
                     tmp_path)  # (LONGTAKE_CACHE=tmp_path: built now)
    assert (tmp_path / "models" / "tiny-wan-v1" / "model_index.json").is_file()
    assert "Writing model shards" not in res["err"], res
    assert res["rc"] == 2 and res["err"].startswith("longtake render: error: width: got 30") and \
        len(res["err"].splitlines()) == 1, res


def test_gc_says_what_it_would_delete_in_plain_words(tmp_path, capsys):
    """`gc --dry-run`: "1 item would be deleted" (not "1 item would delete"), "1 file", "2 files"."""
    import sqlite3

    from longtake.cli import main
    from longtake.cluster import farm

    farm_dir, out = tmp_path / "farm", tmp_path / "clip.mp4"
    (record, _), = farm.submit(farm_dir, [({"prompt": "a ball", "seconds": 2, "out": str(out)}, 0, None)])
    out.write_bytes(b"\0")
    farm.open_store(farm_dir).update(record.id, state="done", result={"out": str(out), "frames": 16})
    with sqlite3.connect(farm_dir / "farm.db") as db:  # finished two days ago
        db.execute("UPDATE jobs SET updated = updated - 2 * 86400")
    assert main(["gc", "--farm-dir", str(farm_dir), "--retain-outputs", "1d", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"would delete output {record.id}: \d+ files?, \d+ bytes? \(.+\)", lines[0]), lines
    assert lines[1:] == ["1 item would be deleted (uploads kept 90d, outputs 1d)"]
    assert not re.search(r"\b1 (files|bytes)\b", lines[0]), lines
    assert main(["gc", "--farm-dir", str(farm_dir), "--retain-outputs", "1d"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 item deleted (uploads kept 90d, outputs 1d)"
