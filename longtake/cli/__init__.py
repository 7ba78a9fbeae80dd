"""`longtake` command line.

    longtake render "a red ball bouncing" --seconds 60 --fps 8 --workers 2 --out ball.mp4
    longtake render --timeline story.yaml --seconds 90 --model ./animatediff-dir --json
    longtake submit shots.yaml; longtake farm run; longtake status [ID] [--json]
    longtake cancel|pause|resume|retry ID

Bad input exits with status 2 and one line naming the field, before Ray or a model starts: an
option's bad value too ("longtake render: error: seconds: got 'abc', expected a number"; `Parser`).
Ctrl-C / SIGTERM stop cleanly: workers, the Ray that longtake started and ffmpeg end, and no
partial file is left at the output path. A reader of stdout that goes away (`longtake verify x.mp4 |
head`) ends the command quietly, exit status 141.

The package owns the commands: `main` and `build_parser` here; `options` (the parser with one-line errors,
the render option table, the options several commands share: one definition of each default); `output`
(what reaches the terminal); one module per command group, each with its `cmd_*` functions and the parsers
of its subcommands: `render`, `serve`, `keys` (keys and verify), `farm` (submit, farm run / monitor, status,
job control, gc) and `tools` (eval, bench).

It may import the rest of longtake through public functions, mostly inside the command that needs them (a
bad-input exit loads no model and no Ray), and longtake.tools only in the tools commands. It imports no Ray
itself: the commands that run on Ray call longtake.cluster.runtime, the farm's Runner, longtake.actors.ray_boot
(stop_ray) and longtake.serve.deployments' start_server / stop_server.
"""

from __future__ import annotations

import argparse
import os
import sys

from longtake.cli import farm, keys, render, serve, story, tools
from longtake.cli.options import LOG_LEVELS, Parser
from longtake.cli.output import setup_logging, stdout_gone

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="longtake", description="Long AI video from overlapping windows on Ray.")
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    render.add_parser(sub)  # (in the order `longtake --help` lists them)
    tools.add_eval_parser(sub)
    serve.add_parser(sub)
    keys.add_keys_parser(sub)
    tools.add_bench_parser(sub)
    keys.add_verify_parser(sub)
    farm.add_parsers(sub)
    story.add_parser(sub)
    return parser


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
        if not stdout_gone():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # Python flushes stdout again at exit
        return 141
