"""The command line: bad input (a bad option value too) exits 2 with one line naming the field before Ray
starts; --json; SIGINT / SIGTERM stop a render cleanly; a reader of stdout that goes away stops a command
quietly."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

@pytest.fixture(scope="module")
def bad_models(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    no_st = root / "no-safetensors"
    shutil.copytree(tiny_model, no_st)
    for f in (no_st / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    other = root / "other-family"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    return {"no_st": str(no_st), "other": str(other), "missing": str(root / "nope")}


def _timeline(tmp_path, name, keys):
    path = tmp_path / name
    path.write_text(json.dumps(keys))
    return str(path)


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line_naming_the_field(tmp_path, tiny_model, bad_models, cli_cases):
    out = str(tmp_path / "o.mp4")
    base = ["render", "a ball", "--model", tiny_model, "--out", out]
    tl = lambda name, keys: ["render", "--timeline", _timeline(tmp_path, name, keys), "--model", tiny_model,
                             "--seconds", "10", "--out", out]
    cases = [  # (argv, field, value shown in the message)
        (base + ["--seconds", "-1"], "seconds", "-1"),
        (base + ["--seconds", "0"], "seconds", "0"),
        (base + ["--seconds", "100000"], "seconds", "100000"),
        (base + ["--fps", "0"], "fps", "0"),
        (base + ["--fps", "10000"], "fps", "10000"),
        (base + ["--steps", "0"], "steps", "0"),
        (base + ["--steps", "99999"], "steps", "99999"),
        (base + ["--guidance", "0"], "guidance", "0"),
        (base + ["--guidance", "-3"], "guidance", "-3"),
        (base + ["--guidance", "1000"], "guidance", "1000"),
        (base + ["--height", "66"], "height", "66"),  # the tiny model's factor is 4
        (base + ["--width", "30"], "width", "30"),
        (base + ["--window", "8", "--overlap", "8"], "overlap", "8"),
        (base + ["--overlap", "16"], "overlap", "16"),  # the default window is 16
        (base + ["--window", "64"], "window", "64"),  # longer than the motion modules allow
        (base + ["--workers", "0"], "workers", "0"),
        (tl("unsorted.json", [{"at": 5, "prompt": "a"}, {"at": 2, "prompt": "b"}]), "timeline[1].at", "2"),
        (tl("dup.json", [{"at": 2, "prompt": "a"}, {"at": 2, "prompt": "b"}]), "timeline[1].at", "2"),
        (tl("range.json", [{"at": 0, "prompt": "a"}, {"at": 30, "prompt": "b"}]), "timeline[1].at", "30"),
        (tl("neg.json", [{"at": -1, "prompt": "a"}]), "timeline[0].at", "-1"),
        (tl("empty.json", [{"at": 0, "prompt": "  "}]), "timeline[0].prompt", "'  '"),
        (tl("none.json", []), "timeline", ""),
        (["render", "--timeline", str(tmp_path / "missing.yaml"), "--out", out], "timeline", "missing.yaml"),
        (["render", "--out", out], "prompt", "None"),
        (["render", "a ball", "--model", bad_models["missing"], "--out", out], "model", "nope"),
        (["render", "a ball", "--model", bad_models["no_st"], "--out", out], "model", "no-safetensors"),
        (["render", "a ball", "--model", bad_models["other"], "--out", out], "model", "StableDiffusionPipeline"),
        (base[:-1] + [str(tmp_path / "no" / "such" / "dir" / "o.mp4")], "out", "o.mp4"),
        (base[:-1] + [str(tmp_path)], "out", str(tmp_path)),
        (base[:-1] + [str(tmp_path / "o.avi")], "out", "o.avi"),
        (base + ["--preview", str(tmp_path / "no" / "p.png")], "preview", "p.png"),
    ]
    *results, imported = cli_cases([c[0] for c in cases], tmp_path, report_imports=True)
    for (argv, field, value), res in zip(cases, results):
        lines = res["err"].strip().splitlines()
        assert res["rc"] == 2, (argv, res)
        assert len(lines) == 1, (argv, lines)
        assert lines[0].startswith(f"longtake render: error: {field}: got "), (argv, lines)
        assert value in lines[0] and "expected" in lines[0], (argv, lines)
    assert imported == {"ray_imported": False, "diffusers_imported": False}  # nothing started
    assert not list(tmp_path.glob("*.mp4"))


@pytest.mark.slow
def test_help_explains_every_option():
    proc = subprocess.run([sys.executable, "-m", "longtake", "render", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--timeline", "--seconds", "--fps", "--height", "--width", "--steps", "--guidance", "--seed",
                 "--window", "--overlap", "--weighting", "--noise", "--workers", "--model", "--out", "--json",
                 "--preview"):
        assert flag in proc.stdout
    # the defaults it names are the real ones: the bundled model's, read from the model, and the request's
    from longtake.pipelines import inspect_model
    from longtake.request import RenderRequest

    bundled = inspect_model("default")
    text = " ".join(proc.stdout.split())
    text = text[text.index("options:"):]  # after the usage line

    def option(flag, following):  # the help of `flag`: up to the next option
        start = text.index(f" {flag} ")
        return text[start:text.index(f" {following} ", start + 1)]

    for flag, following in (("--steps", "--guidance"), ("--guidance", "--guidance-2")):
        assert f"the bundled model: {bundled.default_steps} steps, guidance {bundled.default_guidance}" in \
            option(flag, following), option(flag, following)
    assert f"the bundled model: {bundled.native_window}" in option("--window", "--overlap")
    assert f"the bundled model: {bundled.default_noise}" in option("--noise", "--workers")
    from longtake.request import DEFAULT_SECONDS

    assert f"(default {DEFAULT_SECONDS:g}; with a video: the video's length)" in option("--seconds", "--fps")
    for flag, following, field in (("--fps", "--height", "fps"),
                                   ("--seed", "--window", "seed"), ("--weighting", "--noise", "weighting")):
        default = RenderRequest.model_fields[field].default
        assert (f"(default: {default:g})" if isinstance(default, float) else f"(default: {default})") in \
            option(flag, following), option(flag, following)


def test_choices_are_the_one_list_of_names():
    import typing

    from longtake.cli import build_parser
    from longtake.core.windows import NOISE_MODES, WEIGHTINGS
    from longtake.request import RenderRequest

    render = build_parser()._subparsers._group_actions[0].choices["render"]
    actions = {a.dest: a for a in render._actions}
    assert tuple(actions["weighting"].choices) == WEIGHTINGS
    assert tuple(actions["noise"].choices) == NOISE_MODES

    def literal(field):  # the names in the field's type, Literal[...] or Literal[...] | None
        annotation = RenderRequest.model_fields[field].annotation
        return next(typing.get_args(t) for t in (annotation, *typing.get_args(annotation))
                    if typing.get_origin(t) is typing.Literal)

    assert literal("weighting") == WEIGHTINGS and literal("noise") == NOISE_MODES


@pytest.mark.slow
def test_render_json_summary(tmp_path, tiny_model):
    out = tmp_path / "c.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "longtake", "render", "a red ball", "--model", tiny_model, "--seconds", "2", "--fps", "6",
         "--steps", "2", "--window", "8", "--overlap", "2", "--in-process", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    for key in ("out", "frames", "fps", "seconds", "width", "height", "window", "overlap", "windows", "workers",
                "steps", "model_evaluations", "wall_s", "frames_sha256"):
        assert key in summary
    assert summary["frames"] == 12 and summary["windows"] == 2 and summary["model_evaluations"] == 4
    assert "denoise" in proc.stderr  # the progress bar is on stderr
    assert "Loading pipeline components" not in proc.stderr  # diffusers' loading bar is not (tests/test_cli_output.py)
    assert out.is_file()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_signal_stops_render_cleanly(tmp_path, tiny_model):
    """SIGINT and SIGTERM, each to its own render on a Ray worker (the two run side by side: one Ray start's
    wait for both): exit 130, "interrupted" on the last line, no Ray process and no file left behind."""
    renders = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        outdir = tmp_path / sig.name
        outdir.mkdir()
        renders[sig] = outdir, subprocess.Popen(
            [sys.executable, "-m", "longtake", "render", "a red ball", "--model", tiny_model, "--seconds", "60",
             "--steps", "25", "--workers", "1", "--out", str(outdir / "long.mp4")],
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            # as when started in the background by a script (`longtake render ... &`): SIGINT inherited as
            # ignored; the render installs its own handlers, so Ctrl-C / kill -INT still stop it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    children = {}
    for sig, (_, proc) in renders.items():
        seen = ""
        deadline = time.time() + 240
        while "denoise" not in seen and time.time() < deadline:  # wait until the workers are rendering
            seen += proc.stderr.read(1)
        assert "denoise" in seen, seen
        children[sig] = _descendants(proc.pid)
        assert children[sig], "Ray processes should be running"
    time.sleep(1)
    for sig, (_, proc) in renders.items():
        proc.send_signal(sig)
    for sig, (outdir, proc) in renders.items():
        rc = proc.wait(timeout=60)
        rest = proc.stderr.read()
        assert rc == 130, (sig, rest)
        assert "interrupted" in rest
        # on a line of its own, the last one: the progress bar is closed first, not redrawn after it
        assert [line for line in rest.splitlines() if line.strip()][-1].startswith("longtake render: interrupted"), rest
        gone, alive = psutil.wait_procs(children[sig], timeout=30)
        assert not alive, f"left running: {[p.name() for p in alive]}"
        assert list(outdir.iterdir()) == []  # no output, no partial file


@pytest.mark.slow
def test_eval_bad_arguments_exit_2_naming_the_field(tmp_path, cli_cases):
    cases = [(["eval", "--visible-seeds", "0"], "visible_seeds"), (["eval", "--visible-seconds", "0"], "visible_seconds"),
             (["eval", "--visible-prompts", "-1"], "visible_prompts"), (["eval", "--clips", "0"], "clips"),
             (["eval", "--suite", "modes", "--modes-seeds", "0"], "modes_seeds")]
    for (argv, field), res in zip(cases, cli_cases([c for c, _ in cases], tmp_path)):
        assert res["rc"] == 2 and res["err"].startswith(f"longtake eval: error: {field}: got"), (argv, res)


def _parsers(parser, path=()):
    """(argv prefix, parser) of `longtake` and of every subcommand, nested ones included."""
    import argparse

    yield list(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


@pytest.mark.slow
def test_every_bad_option_value_is_one_line_naming_the_field(tmp_path, cli_cases):
    """argparse's type and choice errors (every int / float option, every option with choices, of every
    subcommand) are said as RequestError says a bad value, in one line, exit 2: not 25 lines of usage and
    "invalid float value". A value starting with '-' reaches its check ('-5d' is not "expected one argument")."""
    from longtake.cli import build_parser

    cases = []  # (argv, the line's start, words it has)
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or not (action.type in (int, float) or action.choices is not None):
                continue
            for bad in ("abc", "-abc"):
                words = [repr(c) for c in action.choices] if action.choices is not None else \
                    ["an integer" if action.type is int else "a number"]
                cases.append(([*path, action.option_strings[-1], bad],
                              f"{parser.prog}: error: {action.dest}: got {bad!r}, expected ", words))
    assert len(cases) > 60 and {c[0][0] for c in cases} >= {"render", "eval", "serve", "keys", "bench", "farm",
                                                            "status", "submit", "--log-level"}
    retention = "retain_outputs: got '-5d', expected a duration > 0 such as 90d, 12h, 30m or 45s"
    exact = [(["gc", "--farm-dir", str(tmp_path), "--retain-outputs", "-5d"], f"longtake gc: error: {retention}"),
             (["farm", "run", "--farm-dir", str(tmp_path), "--retain-outputs", "-5d"],
              f"longtake farm run: error: {retention}"),
             (["render", "a ball", "--seconds", "abc"],
              "longtake render: error: seconds: got 'abc', expected a number"),
             (["render", "a ball", "--out"], "longtake render: error: argument --out: expected one argument"),
             (["render", "a ball", "--out", "-q"], "longtake render: error: argument --out: expected one argument"),
             (["render", "a ball", "--bogus"], "longtake: error: unrecognized arguments: --bogus"),
             (["gc"], "longtake gc: error: one of the arguments --farm-dir --data-dir is required")]
    helps = [["--help"], ["gc", "--help"], ["farm", "run", "--help"]]
    results = cli_cases([c[0] for c in cases] + [c[0] for c in exact] + helps, tmp_path)
    for (argv, start, words), res in zip(cases, results):
        lines = res["err"].splitlines()
        assert res["rc"] == 2 and len(lines) == 1 and lines[0].startswith(start), (argv, res)
        assert all(word in lines[0] for word in words), (argv, lines)
    for (argv, line), res in zip(exact, results[len(cases):]):
        assert res["rc"] == 2 and res["err"] == line + "\n", (argv, res)
    for argv, res in zip(helps, results[-len(helps):]):
        assert res == {"rc": 0, "err": ""}, (argv, res)


def test_option_values_may_start_with_a_dash():
    from longtake.cli import build_parser

    args = build_parser().parse_args(["render", "--negative", "-blurry", "--seconds", "-1", "-q", "--out", "-o.mp4"])
    assert (args.negative_prompt, args.seconds, args.quiet, args.out) == ("-blurry", -1.0, True, "-o.mp4")
    assert build_parser().parse_args(["--log-level", "debug", "status"]).log_level == "DEBUG"


@pytest.mark.slow
def test_a_reader_that_goes_away_stops_a_command_quietly(tmp_path):
    """`longtake verify x.mp4 | head -c1`: stdout's reader closes its end; the command stops without a
    traceback (or Python's "Exception ignored ... BrokenPipeError" at exit), exit status 141 (128 + SIGPIPE).
    Buffered stdout (a pipe's default) and unbuffered (PYTHONUNBUFFERED) fail at different writes."""
    import os

    import numpy as np

    from longtake.cluster import farm
    from longtake.video import VideoWriter

    video = tmp_path / "x.mp4"
    with VideoWriter(video, 64, 64, 8) as writer:
        writer.write(np.zeros((8, 64, 64, 3), np.uint8))
    farm.submit(tmp_path / "farm", [({"prompt": "a ball", "seconds": 2, "out": str(tmp_path / "a.mp4")}, 0, None)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    runs = []
    for argv, unbuffered in ((["verify", str(video)], False), (["verify", str(video)], True),
                             (["verify", str(video), "--json"], False),  # print(json.dumps(...)): one write
                             (["status", "--farm-dir", str(tmp_path / "farm"), "--json"], False),  # reserved_stdout
                             (["status", "--farm-dir", str(tmp_path / "farm")], True)):
        proc = subprocess.Popen([sys.executable, "-m", "longtake", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**env, "PYTHONUNBUFFERED": "1"} if unbuffered
                                else env)
        proc.stdout.close()  # before the command writes anything (it is still importing)
        runs.append((argv, proc))
    for argv, proc in runs:
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 141 and err == "", (argv, proc.returncode, err)
