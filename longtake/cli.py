"""`longtake` command line.

    longtake render "a red ball bouncing" --seconds 60 --fps 8 --workers 2 --out ball.mp4
    longtake render --timeline story.yaml --seconds 90 --model ./animatediff-dir --json
    longtake submit shots.yaml; longtake farm run; longtake status [ID] [--json]
    longtake cancel|pause|resume|retry ID

Bad input exits with status 2 and one line naming the field, before Ray or a model starts: an
option's bad value too ("longtake render: error: seconds: got 'abc', expected a number"; `_Parser`).
Ctrl-C / SIGTERM stop cleanly: workers, the Ray that longtake started and ffmpeg end, and no
partial file is left at the output path. A reader of stdout that goes away (`longtake verify x.mp4 |
head`) ends the command quietly, exit status 141.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import math
import os
import select
import signal
import sys
from dataclasses import fields
from pathlib import Path

from longtake.cluster.retention import DEFAULT_OUTPUTS
from longtake.serve.keys import DEFAULT_MAX_JOBS
from longtake.request import (ANIMATE_MODES, DEVICES, LABEL_MODES, LABEL_POSITIONS, NOISE_MODES, PLAN_MODES,
                              RETARGET_MODES, SCHEDULES, WEIGHTINGS, RenderRequest, RequestError, load_timeline,
                              parse_request)

# --------------------------------------------------------------------------- what reaches the terminal


class _StdoutToLog(io.TextIOBase):
    """sys.stdout while a command runs: what Python code prints there (Ray's driver prints the raylet's
    messages, e.g. "A worker died or was killed while executing a task...", and Serve's shut-down notices)
    goes line by line to longtake's log at DEBUG (`longtake.lib.stdout`), like the libraries' log records."""

    encoding, errors = "utf-8", "strict"

    def __init__(self):
        super().__init__()
        self._partial = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1  # (pointed at stderr meanwhile)

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        log = logging.getLogger("longtake.lib.stdout")
        for line in lines:
            if line.strip() and log.isEnabledFor(logging.DEBUG):
                log.debug("%s", line)
        return len(text)


@contextlib.contextmanager
def reserved_stdout():
    """Keep stdout for the command's own result. Until the block ends, file descriptor 1 (where C libraries
    and child processes write) points at stderr, and sys.stdout (where Ray's driver prints the raylet's
    messages, such as "A worker died...") at stderr too, or, unless --log-level DEBUG, at longtake's debug
    log; the yielded `emit(text)` writes a line to the real stdout. Every command that prints JSON runs
    inside it, so `longtake ... --json | jq` parses whatever a library printed on the way:

        with reserved_stdout() as emit:
            ...
            emit(json.dumps(result))
    """
    sys.stdout.flush()
    real = sys.stdout
    try:
        to_fd = real.fileno() == 1  # the process's stdout (not a capture such as pytest's or a StringIO)
    except (AttributeError, OSError, ValueError):
        to_fd = False
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = _StdoutToLog() if _routing["on"] else sys.stderr
    out = os.fdopen(os.dup(saved), "w") if to_fd else real

    def emit(text: str) -> None:
        sys.stderr.flush()
        out.write(text + "\n")
        out.flush()

    try:
        yield emit
    finally:
        sys.stdout = real
        try:
            if to_fd:
                out.close()  # (BrokenPipeError when stdout's reader has gone: main handles it)
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def plural(count: int, noun: str) -> str:
    """"1 worker", "2 workers": a count in a line for people."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def strict_json(value):
    """`value` with NaN and infinities as null: what a JSON parser other than Python's accepts (an eval
    summary has NaN for a motion no clip had)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals(handler=_raise_interrupt) -> None:
    """SIGINT and SIGTERM stop a long-running command. Installed explicitly: a command started in the
    background by a script (`longtake render ... &`) inherits SIGINT as ignored, and Ctrl-C must still work."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def close_progress_bars() -> None:
    """Finish any progress bar left open by an interrupted phase, so that a message starts on a fresh line
    and no bar is redrawn after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _interrupted(command: str, what: str) -> int:
    """A long-running command stopped by a signal: the message on a line of its own, exit status 130."""
    close_progress_bars()
    print(f"longtake {command}: interrupted; {what}", file=sys.stderr)
    return 130


@contextlib.contextmanager
def log_above_progress_bars():
    """Log lines (a worker replaced, a retry) printed above the progress bars rather than inside them."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


# library loggers whose records go to longtake's log at DEBUG (`longtake.lib.NAME`), shown only with
# --log-level DEBUG: a user sees longtake's own lines
LIBRARY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.tune", "ray.train", "diffusers", "transformers",
                   "huggingface_hub", "torch", "filelock", "urllib3", "httpx", "uvicorn", "uvicorn.error",
                   "uvicorn.access", "fastapi", "py.warnings")
_routing = {"on": False}


class _LibraryToDebug(logging.Handler):
    """A library's record, re-emitted at DEBUG on longtake's logger `longtake.lib.NAME`."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(f"longtake.lib.{record.name}")
        if target.isEnabledFor(logging.DEBUG):
            target.handle(logging.makeLogRecord({**record.__dict__, "name": target.name, "levelno": logging.DEBUG,
                                                 "levelname": "DEBUG"}))


_TO_DEBUG = _LibraryToDebug()


def setup_logging(level: str) -> None:
    """longtake's log on stderr at `level`. Unless that is DEBUG, the long-running commands send library
    chatter (Ray's token-authentication warning, Serve's start-up lines, diffusers' and transformers' warnings
    and loading bars, Python warnings) to longtake's log at DEBUG: see `quiet_libraries`."""
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    _routing["on"] = logging.getLogger("longtake").getEffectiveLevel() > logging.DEBUG


def quiet_libraries(*modules: str) -> None:
    """Import `modules` (a library configures its loggers when imported), then route every library logger
    and Python's warnings to longtake's debug log and turn off the libraries' progress bars (unless
    --log-level DEBUG). A command calls it once its input is checked (importing Ray or diffusers earlier
    would slow down a bad-input exit) and before it starts Ray."""
    if not _routing["on"]:
        return
    logging.captureWarnings(True)  # to the py.warnings logger, routed below
    # read when huggingface_hub is imported (transformers' loading bars), here and in the Ray workers, which
    # inherit this environment when this process starts Ray
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for module in modules:
        importlib.import_module(module)
    if "diffusers" in sys.modules:
        importlib.import_module("diffusers.utils.logging").disable_progress_bar()  # "Loading pipeline components"
    if "transformers" in sys.modules:
        importlib.import_module("transformers.utils.logging").disable_progress_bar()  # "Loading weights"
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if handler is not _TO_DEBUG:
                lib.removeHandler(handler)
        if _TO_DEBUG not in lib.handlers:
            lib.addHandler(_TO_DEBUG)
        lib.propagate = False


# --------------------------------------------------------------------------- arguments

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_EXPECTED = {int: "an integer", float: "a number"}  # what an option of that type takes, in an error line


def one_of(choices) -> str:
    """"one of 'a', 'b' or 'c'": the request's wording for a list of names."""
    names = [repr(c) for c in choices]
    return "one of " + (f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names))


class _BadValue(Exception):
    """An option's value that its type or its choices refuse: RequestError's line, raised through argparse
    (which would otherwise turn it into "argument --seconds: invalid float value: 'abc'") to the parser."""


class _Value:
    """The `type` of an option with a type or choices: `convert` (int, float, str.upper...) the text, check it is
    among `choices`; _BadValue("seconds: got 'abc', expected a number") otherwise."""

    def __init__(self, field: str, convert, choices):
        self.field, self.convert, self.choices = field, convert, choices

    def __call__(self, text: str):
        try:
            value = text if self.convert is None else self.convert(text)
        except (TypeError, ValueError):
            raise _BadValue(str(RequestError(self.field, text, _EXPECTED.get(self.convert, "a valid value")))) from None
        if self.choices is not None and value not in self.choices:
            raise _BadValue(str(RequestError(self.field, text, one_of(self.choices))))
        return value


class _Parser(argparse.ArgumentParser):
    """argparse with longtake's bad-input contract: every error is one line on stderr and exit status 2, a bad
    value said as RequestError says it ("longtake render: error: seconds: got 'abc', expected a number"), not
    argparse's usage (25 lines for render) and "invalid float value". An option's value may start with '-'
    (`gc --retain-outputs -5d` is refused by the retention check, not as "expected one argument"). Subcommands'
    parsers are of this class too (argparse makes them of their parent's)."""

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:  # (once per parser: the types of options with a type or choices)
            if action.option_strings and not isinstance(action.type, _Value) and \
                    (action.type in _EXPECTED or action.choices is not None):
                action.type = _Value(action.dest, action.type, action.choices)
        args = sys.argv[1:] if args is None else list(args)
        try:
            return super().parse_known_args(self._dash_values(args), namespace)
        except _BadValue as e:
            self.error(str(e))

    def _dash_values(self, args: list[str]) -> list[str]:
        """`--opt -5d` as `--opt=-5d` where --opt takes one value and '-5d' is none of this parser's options
        (argparse takes anything starting with '-' but a plain negative number for an option). A value that
        starts with '--' is still read as a (misspelt) option."""
        takes_value = {s for a in self._actions if a.nargs is None for s in a.option_strings if s.startswith("--")}
        options = {s for a in self._actions for s in a.option_strings}
        out: list[str] = []
        for arg in args:
            if out and out[-1] in takes_value and arg.startswith("-") and not arg.startswith("--") and arg != "-" \
                    and arg not in options and "--" not in out:
                out[-1] = f"{out[-1]}={arg}"
            else:
                out.append(arg)
        return out

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_help(name: str, extra: str = "") -> str:
    """The request field's description (the one text the API schema shows too), `extra`, and its default when
    the field has a fixed one."""
    field = RenderRequest.model_fields[name]
    text = field.description[0].lower() + field.description[1:].rstrip(".") + extra
    if field.default not in (None, "") and "(default" not in text:
        default = f"{field.default:g}" if isinstance(field.default, float) else field.default
        text += f" (default: {default})"
    return text


class _BundledModelDefault:
    """The bundled model's default for a setting, for help texts (`%(bundled)s`): read from the model itself
    (inspect_model: its configs, torch but no Ray or diffusers) only when a help text is printed."""

    def __init__(self, text: str):
        self.text = text  # a format string over ModelInfo's fields

    def __str__(self) -> str:
        from longtake.pipelines import inspect_model

        try:
            info = inspect_model("default")
        except RequestError:  # the bundled model is missing: say so rather than fail --help
            return "the bundled model is missing"
        return "the bundled model: " + self.text.format(**info.to_dict())


def _model_default(action: argparse.Action, text: str) -> None:
    action.bundled = _BundledModelDefault(text)


def add_render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="text prompt for the whole clip (or use --timeline)")
    p.add_argument("--timeline", metavar="FILE",
                   help="YAML/JSON list of {at: seconds, prompt: text} keys (optionally under 'timeline:' "
                        "with a 'negative_prompt:'); prompts are interpolated per frame between keys")
    p.add_argument("--negative", dest="negative_prompt", metavar="TEXT", help=_field_help("negative_prompt"))
    p.add_argument("--seconds", type=float, help=_field_help("seconds"))
    p.add_argument("--fps", type=float, help=_field_help("fps", "; the clip has round(seconds*fps) frames"))
    _model_default(p.add_argument("--height", type=int, help="height in pixels, a multiple of the model's size "
                                  "multiple (its VAE factor; x the patch size for DiTs: 16 for Wan) (default: the "
                                  "model's default (%(bundled)s; 512 for SD1.5 AnimateDiff, 480 for Wan))"),
                   "{default_height}")
    _model_default(p.add_argument("--width", type=int, help="width in pixels, a multiple of the model's size multiple "
                                  "(default: the model's default (%(bundled)s; 512 for SD1.5 AnimateDiff, 832 for "
                                  "Wan))"), "{default_width}")
    _model_default(p.add_argument("--steps", type=int, help=_field_help(
        "steps", " (default: the model's default (%(bundled)s; otherwise 25 for AnimateDiff, 50 for Wan))")),
        "{default_steps} steps, guidance {default_guidance}")
    _model_default(p.add_argument("--guidance", type=float, help=_field_help(
        "guidance", " (default: the model's default (%(bundled)s; otherwise 7.5 for AnimateDiff, 5 for Wan))")),
        "{default_steps} steps, guidance {default_guidance}")
    p.add_argument("--guidance-2", type=float, dest="guidance_2", help=_field_help("guidance_2"))
    p.add_argument("--seed", type=int, help=_field_help("seed"))
    _model_default(p.add_argument("--window", type=int, help=_field_help("window").replace(
        "the model's native length", "the model's native length (%(bundled)s; 16 for AnimateDiff, 21 for Wan)")),
        "{native_window}")
    p.add_argument("--overlap", type=int, help=_field_help("overlap"))
    p.add_argument("--weighting", choices=WEIGHTINGS, help=_field_help("weighting"))
    p.add_argument("--schedule", choices=SCHEDULES, help=_field_help("schedule"))
    _model_default(p.add_argument("--noise", choices=NOISE_MODES, help=_field_help("noise").replace(
        "the model's, else independent", "the model's default (%(bundled)s; independent for models whose "
        "longtake.json names none)")), "{default_noise}")
    p.add_argument("--image", metavar="IMAGE", help="start from this image (frame 0 is the image as the model "
                                                   "renders it)")
    p.add_argument("--keyframe", action="append", metavar="IMAGE@SECONDS",
                   help="pin an image at a time of the new frames, e.g. key.png@12.5 (repeatable)")
    p.add_argument("--extend", metavar="VIDEO", help=_field_help("extend"))
    p.add_argument("--lead-into", dest="lead_into", metavar="VIDEO", help=_field_help("lead_into"))
    p.add_argument("--context", type=float, metavar="SECONDS", help=_field_help("context"))
    p.add_argument("--video", metavar="VIDEO", help=_field_help("video"))
    p.add_argument("--strength", type=float, help=_field_help("strength"))
    p.add_argument("--loop", action="store_true", default=None, help=_field_help("loop"))
    p.add_argument("--pose", metavar="VIDEO_OR_JSON", help=_field_help("pose"))
    p.add_argument("--pose-loop", dest="pose_loop", action="store_true", default=None, help=_field_help("pose_loop"))
    p.add_argument("--reference", metavar="IMAGE", help=_field_help("reference"))
    p.add_argument("--reference-pose", dest="reference_pose", metavar="JSON", help=_field_help("reference_pose"))
    p.add_argument("--pose-from", dest="pose_from", metavar="VIDEO",
                   help="extract the pose from a video of a person with a pose estimator (an optional extra: "
                        "pip install 'longtake[pose]'), written as keypoints to OUT.pose.json and used as --pose; "
                        "with --reference, the photo's pose is estimated too (OUT.reference-pose.json) for "
                        "retargeting")
    p.add_argument("--pose-estimator", dest="pose_estimator", default="rtmlib", metavar="NAME",
                   help="the estimator --pose-from runs: rtmlib (default), or module:factory for your own")
    p.add_argument("--retarget", choices=RETARGET_MODES, help=_field_help("retarget"))
    p.add_argument("--control-scale", dest="control_scale", type=float, help=_field_help("control_scale"))
    p.add_argument("--plan", choices=PLAN_MODES, help=_field_help("plan"))
    p.add_argument("--face", metavar="VIDEO", help=_field_help("face"))
    p.add_argument("--animate-mode", dest="animate_mode", choices=ANIMATE_MODES, help=_field_help("animate_mode"))
    p.add_argument("--background", metavar="VIDEO", help=_field_help("background"))
    p.add_argument("--mask", metavar="VIDEO", help=_field_help("mask"))
    p.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else one per CPU core; a short job "
                   "on the CPU: in this process, unless this is given)")
    p.add_argument("--model", help=_field_help("model"))
    p.add_argument("--device", choices=DEVICES, help=_field_help("device"))
    p.add_argument("--out", help=_field_help("out"))
    p.add_argument("--preview", metavar="PNG", help="also write a contact sheet of sampled frames")
    p.add_argument("--label", choices=LABEL_MODES, help=_field_help("label"))
    p.add_argument("--label-text", dest="label_text", metavar="TEXT", help=_field_help("label_text"))
    p.add_argument("--label-position", dest="label_position", choices=LABEL_POSITIONS,
                   help=_field_help("label_position"))
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout (nothing else is "
                                                       "written there)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--in-process", action="store_true",
                   help="no Ray: one in-process worker (the default for a short job on the CPU; --workers N for Ray)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


REQUEST_FIELDS = ("prompt", "negative_prompt", "seconds", "fps", "height", "width", "steps", "guidance", "guidance_2",
                  "seed", "window", "overlap", "weighting", "schedule", "noise", "workers", "model", "device", "out",
                  "preview", "image", "extend", "lead_into", "context", "loop", "video", "strength", "label", "label_text",
                  "label_position", "pose", "pose_loop", "reference", "reference_pose", "retarget", "control_scale",
                  "plan", "face", "animate_mode", "background", "mask")


def parse_keyframe(value: str) -> dict:
    """--keyframe IMAGE@SECONDS -> {image, at}."""
    image, sep, at = value.rpartition("@")
    try:
        seconds = float(at)
    except ValueError:
        seconds = None
    if not sep or not image or seconds is None:
        raise RequestError("keyframe", value, "IMAGE@SECONDS, e.g. key.png@12.5")
    return {"image": image, "at": seconds}


def poses_from_args(args: argparse.Namespace, data: dict) -> None:
    """--pose-from: run the pose estimator on the video (and on the reference photo, for retargeting) and put
    the keypoint files it writes beside the output into `data`. RequestError naming the field."""
    from longtake.pose import extract_poses, extract_reference_pose, load_estimator

    if data.get("pose") is not None:
        raise RequestError("pose_from", args.pose_from, "no value with --pose (give one)")
    out = Path(data.get("out") or RenderRequest.model_fields["out"].default)
    estimator = load_estimator(args.pose_estimator, args.pose_from)
    fps = data.get("fps") or RenderRequest.model_fields["fps"].default
    data["pose"] = extract_poses(args.pose_from, fps, estimator, str(out.with_suffix(".pose.json")))
    if data.get("reference") and not data.get("reference_pose") and data.get("retarget", "reference") != "none":
        data["reference_pose"] = extract_reference_pose(data["reference"], estimator,
                                                        str(out.with_suffix(".reference-pose.json")))


def request_from_args(args: argparse.Namespace) -> RenderRequest:
    data = {k: getattr(args, k) for k in REQUEST_FIELDS if getattr(args, k) is not None}
    if getattr(args, "pose_from", None):
        poses_from_args(args, data)
    if args.keyframe:
        data["keyframes"] = [parse_keyframe(v) for v in args.keyframe]
    if args.timeline:
        if args.prompt:
            raise RequestError("prompt", args.prompt, "either a prompt or --timeline, not both")
        keys, negative = load_timeline(args.timeline)
        data["timeline"] = keys
        if negative is not None and "negative_prompt" not in data:
            data["negative_prompt"] = negative
    return parse_request(data)


def cmd_render(args: argparse.Namespace) -> int:
    from longtake.cluster.engine import prepare
    from longtake.provenance import Provenance

    try:
        job = prepare(request_from_args(args))  # every check, before Ray or a model starts
        provenance = Provenance.local()  # the key, and C2PA credentials if configured
    except (RequestError, ValueError) as e:
        print(f"longtake render: error: {e}", file=sys.stderr)
        return 2
    stop_on_signals()
    with reserved_stdout() as emit, log_above_progress_bars():
        try:
            from longtake.cluster.runtime import local_reason, render

            local = args.in_process or local_reason(job, args.address) is not None
            quiet_libraries(*(("diffusers", "transformers") if local else ("ray", "diffusers")))
            result = render(job, progress=not args.quiet, address=args.address,
                            in_process=True if args.in_process else None, provenance=provenance)
        except KeyboardInterrupt:
            return _interrupted("render", "stopped workers, no output written")
        if args.json:
            emit(json.dumps(result.to_dict()))
        else:
            emit(f"wrote {result.out}: {plural(result.frames, 'frame')} at {result.fps:g} fps, {result.width}x"
                 f"{result.height}, {plural(result.windows, 'window')} x {plural(result.steps, 'step')} on "
                 f"{plural(result.workers, 'worker')} in {result.wall_s:.1f} s")
    return 0


def _publish(name: str, write, result: dict, args: argparse.Namespace, emit, key: str) -> None:
    """bench / eval: the JSON file (and the Markdown table, where asked), then the figures on stdout."""
    command = f"longtake {name} " + " ".join(sys.argv[2:]) if sys.argv[1:2] == [name] else f"longtake {name}"
    write(result, args.out, args.table, command)
    emit(json.dumps(strict_json(result[key]), indent=2))


def cmd_eval(args: argparse.Namespace) -> int:
    from longtake.cluster.engine import prepare
    from longtake.cluster.runtime import make_ray_pool
    from longtake.tools.evaluate import evaluate, junctions, pose_follow, write, write_junctions, write_pose

    try:
        for name, low in (("clips", 1), ("long_clips", 0), ("visible_prompts", 0), ("visible_seeds", 1),
                          ("pose_renders", 1), ("modes_seeds", 1)):
            if getattr(args, name) < low:
                raise RequestError(name, getattr(args, name), f"an integer >= {low}")
        for name in ("seconds", "long_seconds", "visible_seconds", "pose_seconds"):
            if not getattr(args, name) > 0:
                raise RequestError(name, getattr(args, name), "a number of seconds > 0")
        job = prepare({"prompt": "a red ball moving right on a blue background", "model": args.model,
                       "workers": args.workers, "out": "eval.mp4"})
    except RequestError as e:
        print(f"longtake eval: error: {e}", file=sys.stderr)
        return 2
    stop_on_signals()
    with reserved_stdout() as emit, log_above_progress_bars():
        try:
            quiet_libraries("ray", "diffusers")
            from longtake.actors.ray_boot import stop_ray

            pool, started = make_ray_pool(job)
            try:
                if args.suite == "pose":
                    result = pose_follow(pool, args.model, args.pose_renders, args.pose_seconds,
                                         progress=not args.quiet)
                elif args.suite == "modes":
                    result = junctions(pool, args.model, args.modes_seeds, progress=not args.quiet)
                else:
                    result = evaluate(pool, args.model, args.clips, args.seconds, args.long_clips,
                                      args.long_seconds, progress=not args.quiet,
                                      visible_prompts=args.visible_prompts, visible_seeds=args.visible_seeds,
                                      visible_seconds=args.visible_seconds, plan=args.plan)
            finally:
                pool.shutdown()
                if started:
                    stop_ray()
        except KeyboardInterrupt:
            return _interrupted("eval", "nothing written")
        writer = {"pose": write_pose, "modes": write_junctions}.get(args.suite, write)
        _publish("eval", writer, result, args, emit, "summary")
    return 0


def default_data_dir() -> str:
    from longtake.serve import default_data_dir  # one definition, shared with serve.app.app_builder

    return default_data_dir()


def cmd_serve(args: argparse.Namespace) -> int:
    import threading
    from pathlib import Path

    from longtake.cluster.private import private_dir
    from longtake.pipelines import inspect_model
    from longtake.provenance import load_c2pa
    from longtake.serve import load_or_create_token
    from longtake.serve.limits import Limits
    from longtake.serve.pages import served_hosts

    try:
        model = inspect_model(args.model)
        if not 0 <= args.min_replicas <= args.max_replicas:
            raise RequestError("min_replicas", args.min_replicas, f"0 <= min_replicas <= max_replicas ({args.max_replicas})")
        limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
        hosts = served_hosts(args.host, args.allowed_host)
        private_dir(args.data_dir, "data_dir")  # before anything is read from it or written to it
        load_c2pa(args.data_dir)  # C2PA credentials that cannot sign: say so now, not at the first job
    except (RequestError, ValueError) as e:
        print(f"longtake serve: error: {e}", file=sys.stderr)
        return 2
    os.umask(0o077)  # the job store, uploads, videos and keys are the owner's only (local Ray inherits this)
    data_dir = Path(args.data_dir).resolve()
    token, created = load_or_create_token(data_dir)
    if created:
        print(f"API token (saved to {data_dir / 'api_token'}, owner-only): {token}", file=sys.stderr)
    stop, serving = threading.Event(), threading.Event()

    def on_stop(signum, frame):  # SIGINT / SIGTERM: say so at once (stopping takes a while), then stop
        if not stop.is_set() and not args.quiet:
            print("longtake serve: stopping...", file=sys.stderr, flush=True)
        stop.set()
        if not serving.is_set():
            raise KeyboardInterrupt(f"signal {signum}")  # still starting: interrupt the start

    stop_on_signals(on_stop)
    with reserved_stdout():  # serve prints nothing on stdout; Ray's messages go to the log
        started, rc = False, 0
        try:
            quiet_libraries("ray", "ray.serve")
            from longtake.serve.app import start_server

            started = start_server(model.path, str(data_dir), token, args.host, args.port, args.min_replicas,
                                   args.max_replicas, limits, model_name=args.model, allowed_hosts=hosts,
                                   address=args.address)
            serving.set()
            if not stop.is_set():
                if not args.quiet:
                    print(f"longtake serving {args.model} on http://{args.host}:{args.port} (Ctrl-C to stop); "
                          f"web monitor: http://{args.host}:{args.port}/ (log in with an API key: `longtake keys add "
                          f"NAME --data-dir {data_dir}`, or the admin token in {data_dir / 'api_token'}); it "
                          f"answers to Host {', '.join(hosts)} (others: --allowed-host NAME)", file=sys.stderr)
                from longtake.serve.manager import FailedJobs

                failed = FailedJobs(data_dir)  # the job threads run in a replica: their failures are said here
                while not stop.wait(1):
                    for job in failed.new():
                        print(f"longtake serve: job {job.id} failed: {job.error} (its log: GET /v1/videos/{job.id}/log)",
                              file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            rc = 130  # stopped before it served
        finally:
            serving.set()  # from here on a signal only sets `stop`: the clean-up below runs to the end
            if "longtake.serve.app" in sys.modules:  # (an interrupted start may have got this far or not)
                sys.modules["longtake.serve.app"].stop_server(started)
    return rc


def cmd_submit(args: argparse.Namespace) -> int:
    from longtake.cluster import farm

    jobs = []
    try:
        for path in args.specs:
            for n, spec in enumerate(farm.read_specs(path)):
                try:
                    request, priority, token = farm.split_spec(spec, args.priority)
                    farm.validate(args.farm_dir, request)
                except RequestError as e:
                    raise RequestError(f"{path}: job {n + 1}: {e.field}", e.value, e.expected) from None
                jobs.append((request, priority, token))
        submitted = farm.submit(args.farm_dir, jobs)  # refuses, queueing nothing, an output path another job writes
    except RequestError as e:
        print(f"longtake submit: error: {e} (nothing was submitted)", file=sys.stderr)
        return 2
    for record, created in submitted:
        print(record.id)
        if not created:
            print(f"longtake submit: {record.id}: already submitted with this token ({record.state})", file=sys.stderr)
    return 0


def cmd_farm_run(args: argparse.Namespace) -> int:
    from longtake.cluster.farm import Runner
    from longtake.cluster.retention import Retention
    from longtake.provenance import load_c2pa

    try:
        runner = Runner(args.farm_dir, address=args.address, workers=args.workers,
                        checkpoint_every=args.checkpoint_every, max_attempts=args.max_attempts,
                        blocklist_after=args.blocklist_after, task_timeout_s=args.task_timeout,
                        min_free_mb=args.min_free_mb, progress=not args.quiet,
                        keep=Retention(outputs=args.retain_outputs))
        load_c2pa(args.farm_dir)
    except (RequestError, ValueError) as e:
        print(f"longtake farm run: error: {e}", file=sys.stderr)
        return 2

    def stop(signum, frame):  # finish nothing more: checkpoint the current job and requeue it
        runner.stop.set()

    stop_on_signals(stop)
    quiet_libraries("ray", "diffusers")  # before the runner starts Ray
    logging.getLogger("longtake.cluster.farm").setLevel(logging.INFO)  # one line per job start and end
    print(f"longtake farm runner {runner.id} on {args.farm_dir} (Ctrl-C to stop)", file=sys.stderr)
    runner.serve_forever(exit_when_idle=args.exit_when_idle)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from longtake.cluster import farm

    try:
        if not 1 <= args.limit <= 10_000:
            raise RequestError("limit", args.limit, "an integer from 1 to 10000")
        store = farm.open_store(args.farm_dir, create=False)
        record = store.get(args.id) if args.id else None
        if args.id and record is None:
            raise RequestError("id", args.id, f"the id of a job in {args.farm_dir}")
    except RequestError as e:
        print(f"longtake status: error: {e}", file=sys.stderr)
        return 2
    # a deleted job leaves the list (as over HTTP); `status ID` says it was deleted, and why (its error)
    listed = [] if record else store.list(limit=args.limit, hide=("deleted",))
    if args.json:  # the job-status shape of longtake.cluster.jobs, also the HTTP API's
        with reserved_stdout() as emit:
            emit(json.dumps(record.to_dict() if record else [r.to_dict() for r in listed]))
        return 0
    if record is None:
        print("\n".join(farm.table_rows(listed)))
        return 0
    info = record.to_dict()
    if record.state == "deleted":
        for key, value in (("id", info["id"]), ("status", "deleted"), ("submitted", info["created"]),
                           ("deleted", info["updated"]), ("why", info["error"] or "-")):
            print(f"{key:9} {value}")
        return 0
    p = info["progress"]
    lines = [("id", info["id"]), ("status", info["status"]), ("priority", info["priority"]),
             ("submitted", info["created"]), ("updated", info["updated"]),
             ("progress", f"{p['phase']}: step {p['step'] or 0}/{p['steps']}" if p["steps"] else "-"),
             ("dir", farm.job_dir(args.farm_dir, record.id))]
    lines += [("error", info["error"])] if info["error"] else []
    if record.result:
        lines += [("out", record.result["out"]), ("sha256", record.result["frames_sha256"])]
    for key, value in lines:
        print(f"{key:9} {value}")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from longtake.cluster import farm

    try:
        if args.command == "delete":
            done = farm.delete(args.farm_dir, args.id)
            line = f"{args.id} deleted: {plural(len(done['files']), 'file')}, {plural(done['bytes'], 'byte')}" + \
                "".join(f"; kept {k['file']} ({k['why']})" for k in done["kept"])
        else:
            record = farm.control(args.farm_dir, args.command, args.id)
            line = f"{record.id} {record.state}"
    except RequestError as e:
        print(f"longtake {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(line)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """longtake keys add | list | revoke: the serve API's client keys (serve/keys.py)."""
    from longtake.cluster.jobs import iso
    from longtake.cluster.private import private_dir
    from longtake.serve.keys import KeyStore

    store = KeyStore(args.data_dir)
    try:
        private_dir(args.data_dir, "data_dir", create=args.keys_command == "add")  # a key file no one else wrote
        if args.keys_command == "add":
            key = store.add(args.name, admin=args.admin, max_jobs=args.max_jobs)
            print(key)
            print(f"key of {args.name}{' (admin)' if args.admin else ''} added to {store.path}; only its hash is kept: "
                  "this is the one time it is shown", file=sys.stderr)
        elif args.keys_command == "revoke":
            store.revoke(args.name)
            print(f"{args.name}: revoked")
        else:
            clients = store.list()
            if args.json:
                print(json.dumps([{"name": c.name, "admin": c.admin, "max_jobs": c.max_jobs, "created": iso(c.created)}
                                  for c in clients]))
            else:
                for c in clients:
                    print(f"{c.name:24} {'admin' if c.admin else 'client':6} max_jobs {c.max_jobs:<5} "
                          f"created {iso(c.created)}")
                if not clients:
                    print(f"no keys in {store.path} (the admin token in api_token still works)", file=sys.stderr)
    except RequestError as e:
        print(f"longtake keys {args.keys_command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_farm_monitor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from longtake.cluster.private import private_dir
    from longtake.serve.farm_monitor import build_monitor, monitor_key
    from longtake.serve.pages import served_hosts

    if not (Path(args.farm_dir) / "farm.db").is_file():
        print(f"longtake farm monitor: error: farm_dir: got {args.farm_dir!r}, expected a farm directory (no farm.db "
              "there: submit a job first, or give --farm-dir / $LONGTAKE_FARM_DIR)", file=sys.stderr)
        return 2
    try:
        private_dir(args.farm_dir, "farm_dir", create=False)
        hosts = served_hosts(args.host, args.allowed_host)
        key, created = monitor_key(args.farm_dir, args.host)
    except RequestError as e:
        print(f"longtake farm monitor: error: {e}", file=sys.stderr)
        return 2
    if created:
        print(f"monitor key (saved to {Path(args.farm_dir) / 'monitor_key'}, owner-only): {key}", file=sys.stderr)
    import uvicorn

    print(f"longtake farm monitor of {Path(args.farm_dir).resolve()} on http://{args.host}:{args.port}/ "
          f"({'key needed' if key else 'no key: loopback only'}; Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.run(build_monitor(args.farm_dir, key, hosts), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from longtake.tools.bench import bench, write
    from longtake.pipelines import inspect_model

    try:
        inspect_model(args.model)
    except RequestError as e:
        print(f"longtake bench: error: {e}", file=sys.stderr)
        return 2
    stop_on_signals()
    with reserved_stdout() as emit, log_above_progress_bars():
        try:
            quiet_libraries("ray", "ray.serve", "diffusers", "transformers")
            result = bench(quick=args.quick, device=args.device, model=args.model, progress=not args.quiet,
                           workers_per_node=args.workers_per_node, bandwidth_gbps=args.bandwidth_gbps)
        except KeyboardInterrupt:
            return _interrupted("bench", "nothing written")
        _publish("bench", write, result, args, emit, "figures")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from longtake.provenance import home, load_key, verify

    try:
        if args.key_file:
            key_dir, name = Path(args.key_file).parent, Path(args.key_file).name
            if name != "provenance.key" or not Path(args.key_file).is_file():
                raise RequestError("key_file", args.key_file, "a provenance.key file")
            source = f"--key-file {args.key_file}"
        else:
            key_dir = Path(args.farm_dir or args.data_dir or home())
            source = f"--farm-dir {args.farm_dir}" if args.farm_dir else f"--data-dir {args.data_dir}" \
                if args.data_dir else f"$LONGTAKE_HOME's, {key_dir / 'provenance.key'}"
        key = load_key(key_dir, create=False)
        report = verify(args.file, key, key_source=source)
    except (RequestError, FileNotFoundError, ValueError) as e:
        print(f"longtake verify: error: {e}", file=sys.stderr)
        return 2
    report["job"] = None
    store_path = Path(args.farm_dir) / "farm.db" if args.farm_dir else Path(args.data_dir) / "jobs.db" \
        if args.data_dir else None
    if store_path is not None and store_path.is_file():  # the job the metadata names, else the watermark
        from longtake.cluster.jobs import JobStore
        from longtake.watermark import payload_of

        store = JobStore(store_path, create=False)
        named, via = (report["aigc"] or {}).get("ProduceID"), "metadata"
        record = store.get(str(named)) if named else None
        if record is None and report["watermark"]["found"]:
            via = "watermark"
            record = next((r for r in store.list(limit=10**9)
                           if f"{payload_of(r.id):08x}" == report["watermark"]["payload"]), None)
        if record is not None:
            report["job"] = {"id": record.id, "state": record.state, "found_by": via}
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        aigc, visible = report["aigc"], report["visible_label"]
        print(f"{report['file']}: {'marked as AI-generated' if report['marked'] else 'no AI-generated mark found'}")
        print(f"  AIGC metadata: {json.dumps(aigc, ensure_ascii=False) if aigc else report['aigc_error'] or 'none'}")
        if report["integrity"]:
            print(f"  integrity: {report['integrity']} ({report['integrity_scheme']}: covers "
                  f"{', '.join(report['integrity_covers'] or [])})")
            if report["integrity_note"]:
                print(f"    {report['integrity_note']}")
        print(f"  visible label: {'present' if visible['present'] else 'not found'} ({visible['text']!r}, "
              f"{visible['position']})")
        mark = report["watermark"]
        edits = ([f"cropped {'/'.join(f'{c:.1%}' for c in mark['crop'])} (left/right/top/bottom)"]
                 if mark.get("crop") else []) + (["inside bars"] if mark.get("bars") else []) + \
            ([f"gain x{mark['gain']:.2f}"] if mark.get("gain") not in (None, 1.0) else [])
        print("  watermark: " + (f"payload {mark['payload']} ({mark['scheme']}, confidence {mark['confidence']:.2f}, "
                                f"read from {mark['voters']} of the {mark['frames']} frames sampled"
                                + "".join(f", {e}" for e in edits) + ")" if mark["found"] else
                                f"not found ({mark['frames']} frames read)"))
        c2pa = report["c2pa"]
        print("  C2PA manifest: " + ("signed by " + str(c2pa["signer"].get("common_name") or c2pa["signer"])
                                     + f" ({', '.join(c2pa['validation']) or 'valid'})" if c2pa["present"]
                                     else c2pa.get("note") or c2pa.get("error") or "none"))
        if report["job"]:
            print(f"  job: {report['job']['id']} ({report['job']['state']}, found by its "
                  f"{report['job']['found_by']})")
    return 0 if report["marked"] else 1


def cmd_gc(args: argparse.Namespace) -> int:
    from pathlib import Path

    from longtake.cluster.retention import RetentionError, load_policy

    directory = args.farm_dir or args.data_dir
    try:
        policy = load_policy(directory, args.retain_uploads, args.retain_outputs)
        if args.farm_dir:
            from longtake.cluster import farm

            done = farm.gc(args.farm_dir, policy, dry_run=args.dry_run)
        else:
            from longtake.serve.manager import gc

            if not (Path(directory) / "jobs.db").is_file():
                raise RequestError("data_dir", directory, "a serve data directory (no jobs.db there)")
            done = gc(directory, policy, dry_run=args.dry_run)
    except (RequestError, RetentionError) as e:
        print(f"longtake gc: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "policy": {"uploads": policy.uploads, "outputs": policy.outputs},
                          "deleted": done}))
        return 0
    for item in done:
        print(f"{'would delete' if args.dry_run else 'deleted'} {item['what']} {item['id']}: "
              f"{plural(len(item['files']), 'file')}, {plural(item['bytes'], 'byte')} ({item['why']})"
              + "".join(f"; kept {k['file']} ({k['why']})" for k in item.get("kept", ())))
    print(f"{plural(len(done), 'item')} {'would be deleted' if args.dry_run else 'deleted'} (uploads kept "
          f"{policy.uploads}, outputs {policy.outputs})")
    return 0


def _farm_dir_arg(p: argparse.ArgumentParser) -> None:
    from longtake.cluster.farm import default_farm_dir

    p.add_argument("--farm-dir", default=default_farm_dir(),
                   help="farm directory: job store and job files (default $LONGTAKE_FARM_DIR or "
                        "~/.local/share/longtake/farm)")


def build_parser() -> argparse.ArgumentParser:
    allowed_host = ("also answer to this Host name or address (repeatable; '*': any); other than these, only the "
                    "loopback names and --host's address are answered, other Host headers get 421 (DNS rebinding)")
    parser = _Parser(prog="longtake", description="Long AI video from overlapping windows on Ray.")
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render a clip to MP4",
                            description="Render a long clip: windows denoised in parallel and fused at every step.")
    add_render_args(render)
    render.set_defaults(func=cmd_render)
    ev = sub.add_parser("eval", help="measure colour, motion, seams and drift of a model on fixed prompts",
                        description="Render fixed prompts and seeds and measure colour accuracy, motion accuracy, "
                                    "seam continuity (fused vs naive windows) and drift.")
    ev.add_argument("--model", default="default", help="model directory or name (default: the bundled model)")
    ev.add_argument("--clips", type=int, default=50, help="short clips (default 50)")
    ev.add_argument("--seconds", type=float, default=8, help="length of the short clips (default 8)")
    ev.add_argument("--long-clips", type=int, default=2, help="60-second clips for drift (default 2)")
    ev.add_argument("--long-seconds", type=float, default=60, help="length of the long clips (default 60)")
    ev.add_argument("--visible-prompts", type=int, default=5, help="prompts of the object-visible renders, make "
                                                                    "demo's first (default 5; 0: none)")
    ev.add_argument("--visible-seeds", type=int, default=2, help="seeds per object-visible prompt (default 2)")
    ev.add_argument("--visible-seconds", type=float, default=60, help="length of the object-visible renders "
                                                                      "(default 60)")
    ev.add_argument("--suite", choices=("main", "pose", "modes"), default="main",
                    help="main: the figures above; pose: pose-driven renders (a reference image and a silhouette "
                         "path each): the share of frames on the path and how well the reference's look is kept; "
                         "modes: how smoothly image to video, extend, bridge and loop join their inputs")
    ev.add_argument("--pose-renders", type=int, default=4, help="pose suite: renders, paths and scenes in turn "
                                                                "(default 4)")
    ev.add_argument("--pose-seconds", type=float, default=20, help="pose suite: length of each render (default 20)")
    ev.add_argument("--plan", choices=PLAN_MODES, default="auto", help="main suite: every request's plan (auto, the "
                    "default: the bundled model's motion plan; none: the model alone)")
    ev.add_argument("--modes-seeds", type=int, default=5, help="modes suite: seeds of each mode (default 5)")
    ev.add_argument("--workers", type=int, help="Ray workers (default: one per CPU core)")
    ev.add_argument("--out", default="eval.json", help="JSON results (default eval.json)")
    ev.add_argument("--table", metavar="PATH", help="also write the Markdown table there (default: no table; "
                                                    "the bundled model's is longtake/models/default/EVAL.md)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)
    sv = sub.add_parser("serve", help="run the HTTP job API on Ray Serve",
                        description="Deploy the Ray Serve app: FastAPI ingress, job manager, autoscaled denoiser. "
                                    "Every /v1 route needs 'Authorization: Bearer TOKEN' ($LONGTAKE_API_TOKEN, or "
                                    "a token generated once into DATA_DIR/api_token).")
    sv.add_argument("--model", default="default", help="the model every job uses (default: the bundled model)")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; anything else is "
                                                        "reachable from outside: keep the token secret)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sv.add_argument("--allowed-host", action="append", metavar="NAME", help=allowed_host)
    sv.add_argument("--min-replicas", type=int, default=0, help="denoiser replicas when idle (default 0)")
    sv.add_argument("--max-replicas", type=int, default=2, help="denoiser replicas at most (default 2)")
    sv.add_argument("--data-dir", default=default_data_dir(), help="job store, videos and token "
                                                                   "(default $LONGTAKE_DATA_DIR or ~/.local/share/longtake/serve)")
    sv.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    from longtake.serve.limits import Limits  # no Ray, no torch: the limits are plain data

    for f in fields(Limits):  # one flag per request limit, its default and help from Limits
        if isinstance(f.default, bool):  # a switch, off by default
            sv.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=f.metadata["help"])
            continue
        shown = f.default if isinstance(f.default, (int, str)) else format(f.default, "g")
        sv.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        help=f"{f.metadata['help']} (default {shown})")
    sv.add_argument("-q", "--quiet", action="store_true", help="no start and stop lines (errors and a newly "
                                                               "generated token are still printed)")
    sv.set_defaults(func=cmd_serve)
    ky = sub.add_parser("keys", help="the serve API's client keys: add, list, revoke",
                        description="API keys of `longtake serve`, one per client, stored hashed in DATA_DIR/"
                                    "api_keys.json. A job, its files and its uploads belong to the key's client; an "
                                    "admin key sees every client's. The admin token (DATA_DIR/api_token) keeps working.")
    ksub = ky.add_subparsers(dest="keys_command", required=True)
    ka = ksub.add_parser("add", help="a new key for a client (printed once)")
    ka.add_argument("name", help="client name: lower-case letters, digits, '_', '.', '-'")
    ka.add_argument("--admin", action="store_true", help="sees and manages every client's jobs")
    ka.add_argument("--max-jobs", type=int, default=DEFAULT_MAX_JOBS,
                    help=f"jobs queued, running or paused at once before 429 (default {DEFAULT_MAX_JOBS})")
    kl = ksub.add_parser("list", help="names, roles, limits (never keys)")
    kl.add_argument("--json", action="store_true", help="print one JSON list")
    kr = ksub.add_parser("revoke", help="revoke a client's key (its jobs stay)")
    kr.add_argument("name", help="client name")
    for p in (ka, kl, kr):
        p.add_argument("--data-dir", default=default_data_dir(), help="the serve data dir (default $LONGTAKE_DATA_DIR "
                                                                      "or ~/.local/share/longtake/serve)")
    ky.set_defaults(func=cmd_keys)

    bn = sub.add_parser("bench", help="measure efficiency, overhead, seams, memory, encoding, vs diffusers",
                        description="Benchmarks, every figure a ratio taken in one run; writes a JSON file and, "
                                    "with --table, a Markdown table (see BENCHMARKS.md).")
    bn.add_argument("--quick", action="store_true", help="shorter clips and fewer of them (under 10 minutes on 2 cores)")
    bn.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where workers run (default cpu)")
    bn.add_argument("--model", default="default", help="the model for scaling, seams and memory (default: bundled)")
    bn.add_argument("--out", default="bench.json", help="JSON results (default bench.json)")
    bn.add_argument("--table", metavar="PATH", help="also write the Markdown table there (default: no table; "
                                                    "the repository's is BENCHMARKS.md)")
    bn.add_argument("--workers-per-node", type=int, default=8, help="projection: workers per node (default 8)")
    bn.add_argument("--bandwidth-gbps", type=float, default=10.0, help="projection: driver network, Gb/s (default 10)")
    bn.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    bn.set_defaults(func=cmd_bench)

    vf = sub.add_parser("verify", help="what an MP4 carries: AI-generated label, metadata, integrity",
                        description="Report a video's AIGC metadata (GB 45438-2025) and whether its integrity code "
                                    "matches the file (with the key that made it), its visible label, and the job it "
                                    "names (with --farm-dir or --data-dir). Exit 0: marked as AI-generated; 1: not; "
                                    "2: bad input.")
    vf.add_argument("file", help="an MP4 file")
    vf.add_argument("--json", action="store_true", help="print one JSON object")
    where = vf.add_mutually_exclusive_group()
    where.add_argument("--farm-dir", help="the farm that made it: its key and job store")
    where.add_argument("--data-dir", help="the serve data dir that made it: its key and job store")
    where.add_argument("--key-file", help="a provenance.key file (default: $LONGTAKE_HOME/provenance.key, the CLI's)")
    vf.set_defaults(func=cmd_verify)

    sb = sub.add_parser("submit", help="queue render jobs on the farm",
                        description="Queue the jobs of one or more spec files (YAML or JSON: a job, a list of jobs, "
                                    "or {jobs: [...]}). A job is a render request plus optional 'priority' (higher "
                                    "first) and 'token' (a client token: the same token submits once). Every job is "
                                    "checked first; if one is invalid nothing is submitted. Prints one id per job.")
    sb.add_argument("specs", nargs="+", metavar="SPEC", help="spec files")
    sb.add_argument("--priority", type=int, default=0, help="priority of jobs that give none (default 0)")
    _farm_dir_arg(sb)
    sb.set_defaults(func=cmd_submit)
    fm = sub.add_parser("farm", help="the farm runner")
    fsub = fm.add_subparsers(dest="farm_command", required=True)
    fr = fsub.add_parser("run", help="render queued jobs until stopped",
                         description="Take queued jobs by priority, then submit time, and render them on the Ray "
                                     "cluster with checkpoints; requeue jobs whose runner died. Ctrl-C / SIGTERM "
                                     "checkpoint the current job and put it back in the queue.")
    _farm_dir_arg(fr)
    fr.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    fr.add_argument("--workers", type=int, help="workers per job (default: one per GPU, else one per CPU core)")
    fr.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints (default 5)")
    fr.add_argument("--max-attempts", type=int, default=3, help="attempts per window before the job fails (default 3)")
    fr.add_argument("--blocklist-after", type=int, default=3,
                    help="failed windows after which a worker is excluded (default 3; 0: never)")
    fr.add_argument("--task-timeout", type=float, help="seconds after which a window counts as hung: its worker is "
                    "replaced and the window retried (default: 10x the slowest window so far, at least 120 s; 600 s "
                    "before the first returns)")
    fr.add_argument("--min-free-mb", type=float, default=256,
                    help="fail a job (keeping its checkpoints) when less disk is free (default 256)")
    fr.add_argument("--exit-when-idle", action="store_true", help="stop when the queue is empty")
    fr.add_argument("--retain-outputs", default=DEFAULT_OUTPUTS, help="how long a finished job's video, preview "
                    f"and files are kept, then deleted (default {DEFAULT_OUTPUTS}; e.g. 30d, 12h)")
    fr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    fr.set_defaults(func=cmd_farm_run)
    mo = fsub.add_parser("monitor", help="a read-only web view of the farm's jobs",
                         description="Serve a read-only web page of the farm's jobs: priorities, states, steps, worker "
                                     "retries and excluded workers from the job logs. On an address other than "
                                     "127.0.0.1 it needs a key ($LONGTAKE_MONITOR_KEY, else one generated into "
                                     "FARM/monitor_key and printed).")
    _farm_dir_arg(mo)
    mo.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    mo.add_argument("--port", type=int, default=8100, help="HTTP port (default 8100)")
    mo.add_argument("--allowed-host", action="append", metavar="NAME", help=allowed_host)
    mo.set_defaults(func=cmd_farm_monitor)
    st = sub.add_parser("status", help="farm jobs, or one job", description="List the farm's jobs, or show one.")
    st.add_argument("id", nargs="?", help="a job id")
    st.add_argument("--json", action="store_true", help="JSON: one job-status object, or a list of them (the HTTP "
                                                        "API's shape; a done job includes the render summary)")
    st.add_argument("--limit", type=int, default=50, help="newest jobs listed (default 50)")
    _farm_dir_arg(st)
    st.set_defaults(func=cmd_status)
    for name, text in (("cancel", "cancel a queued, paused or running job (frees its workers)"),
                       ("pause", "pause a queued or running job (a running one is checkpointed at its step)"),
                       ("resume", "put a paused job back in the queue"),
                       ("retry", "requeue a failed or cancelled job; it resumes from its last checkpoint"),
                       ("delete", "delete a job that is not running (cancel a running one first) at once: its video, "
                                  "preview, checkpoints and log unlinked, its row scrubbed, a line in the farm's "
                                  "audit.log (over HTTP: DELETE /v1/videos/ID)")):
        c = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        c.add_argument("id", help="a job id")
        _farm_dir_arg(c)
        c.set_defaults(func=cmd_control)
    gcp = sub.add_parser("gc", help="delete what retention says has expired",
                         description="The retention sweep a server or farm runner makes by itself, now: outputs of "
                                     "jobs finished longer ago than kept, uploads older than kept (not while a job "
                                     "that has not finished names them). Each deletion is a line in audit.log. The "
                                     "policy: the flags, else what the server or runner recorded, else 90d / 365d.")
    where = gcp.add_mutually_exclusive_group(required=True)
    where.add_argument("--farm-dir", help="a farm directory")
    where.add_argument("--data-dir", help="a serve data directory")
    gcp.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    gcp.add_argument("--retain-uploads", help="how long uploads are kept (e.g. 90d)")
    gcp.add_argument("--retain-outputs", help="how long outputs are kept (e.g. 365d)")
    gcp.add_argument("--json", action="store_true", help="print one JSON object")
    gcp.set_defaults(func=cmd_gc)
    return parser


def _stdout_gone() -> bool:
    """Whether the process's stdout is a pipe whose reader has gone (`longtake verify x.mp4 | head`): poll
    reports POLLERR on such a pipe's write end."""
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(1, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def main(argv: list[str] | None = None) -> int:
    """Run a command; its exit status. When stdout's reader goes away (`longtake status | head`), the command
    stops without a traceback, exit status 141 (128 + SIGPIPE, what a shell shows for a tool stopped so)."""
    try:
        try:
            args = build_parser().parse_args(argv)  # (--help prints and exits here)
            setup_logging(args.log_level)
            return args.func(args)
        finally:
            sys.stdout.flush()  # what is left in the buffer: a reader that left shows here, not at exit
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # Python flushes stdout again at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
