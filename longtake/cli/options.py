"""The options: `Parser` (argparse with longtake's one-line errors), the render option table
(`add_render_args`, its help texts and defaults from the request's fields, REQUEST_FIELDS) and the options
several commands share (--data-dir, --farm-dir, --allowed-host): one definition of each default and help text.
"""

from __future__ import annotations

import argparse
import sys

from longtake.private import default_data_dir, default_farm_dir
from longtake.request import (ANIMATE_MODES, CP_MODES, DEVICES, LABEL_MODES, LABEL_POSITIONS, NOISE_MODES,
                              PLAN_MODES, RETARGET_MODES, SCHEDULES, WEIGHTINGS, RenderRequest, RequestError)

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


class Parser(argparse.ArgumentParser):
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
    p.add_argument("--cp", type=int, help=_field_help("cp"))
    p.add_argument("--cp-mode", dest="cp_mode", choices=CP_MODES, help=_field_help("cp_mode"))
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
                  "seed", "window", "overlap", "weighting", "schedule", "noise", "workers", "cp", "cp_mode", "model",
                  "device", "out", "preview", "image", "extend", "lead_into", "context", "loop", "video", "strength",
                  "label", "label_text", "label_position", "pose", "pose_loop", "reference", "reference_pose",
                  "retarget", "control_scale", "plan", "face", "animate_mode", "background", "mask")


ALLOWED_HOST_HELP = ("also answer to this Host name or address (repeatable; '*': any); other than these, only the "
                     "loopback names and --host's address are answered, other Host headers get 421 (DNS rebinding)")


def plural(count: int, noun: str) -> str:
    """"1 worker", "2 workers": a count in a line for people."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def data_dir_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--data-dir of a command on serve's data directory (serve, keys): `what` is there, and the default."""
    p.add_argument("--data-dir", default=default_data_dir(), help=f"{what} (default $LONGTAKE_DATA_DIR or "
                                                                  "~/.local/share/longtake/serve)")


def farm_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--farm-dir", default=default_farm_dir(),
                   help="farm directory: job store and job files (default $LONGTAKE_FARM_DIR or "
                        "~/.local/share/longtake/farm)")
