"""`longtake` command line.

    longtake render "a red ball bouncing" --seconds 60 --fps 8 --workers 2 --out ball.mp4
    longtake render --timeline story.yaml --seconds 90 --model ./animatediff-dir --json

Bad input exits with status 2 and one line naming the field, before Ray or a model starts.
Ctrl-C / SIGTERM stop cleanly: workers, the Ray that longtake started and ffmpeg end, and no
partial file is left at the output path.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from longtake.request import RenderRequest, RequestError, load_timeline, parse_request


def _field_help(name: str) -> str:
    return RenderRequest.model_fields[name].description


def add_render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="text prompt for the whole clip (or use --timeline)")
    p.add_argument("--timeline", metavar="FILE",
                   help="YAML/JSON list of {at: seconds, prompt: text} keys (optionally under 'timeline:' "
                        "with a 'negative_prompt:'); prompts are interpolated per frame between keys")
    p.add_argument("--negative", dest="negative_prompt", metavar="TEXT", help=_field_help("negative_prompt"))
    p.add_argument("--seconds", type=float, help="clip length in seconds (default 10)")
    p.add_argument("--fps", type=float, help="frames per second (default 8); the clip has round(seconds*fps) frames")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of the model's VAE factor (default: model's)")
    p.add_argument("--width", type=int, help="width in pixels, a multiple of the model's VAE factor (default: model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 25)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 = off (default: 7.5)")
    p.add_argument("--seed", type=int, help="random seed; same request + seed = same frames (default 0)")
    p.add_argument("--window", type=int, help="frames per window (default: the model's native length, 16)")
    p.add_argument("--overlap", type=int, help="frames shared by consecutive windows (default: window // 4)")
    p.add_argument("--weighting", choices=["flat", "pyramid", "overlap-linear"],
                   help="taper for fusing overlapping predictions (default: pyramid)")
    p.add_argument("--noise", choices=["independent", "freenoise"],
                   help="initial noise per frame, or FreeNoise-style shuffled windows (default: independent)")
    p.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else one per CPU core)")
    p.add_argument("--model", help="diffusers model directory (AnimateDiff), or 'tiny' (default: tiny)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where workers run (default: auto)")
    p.add_argument("--out", help="output MP4 path (default: longtake.mp4)")
    p.add_argument("--preview", metavar="PNG", help="also write a contact sheet of sampled frames")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--in-process", action="store_true", help="no Ray: one in-process worker (reference result)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


REQUEST_FIELDS = ("prompt", "negative_prompt", "seconds", "fps", "height", "width", "steps", "guidance", "seed",
                  "window", "overlap", "weighting", "noise", "workers", "model", "device", "out", "preview")


def request_from_args(args: argparse.Namespace) -> RenderRequest:
    data = {k: getattr(args, k) for k in REQUEST_FIELDS if getattr(args, k) is not None}
    if args.timeline:
        if args.prompt:
            raise RequestError("prompt", args.prompt, "either a prompt or --timeline, not both")
        keys, negative = load_timeline(args.timeline)
        data["timeline"] = keys
        if negative is not None and "negative_prompt" not in data:
            data["negative_prompt"] = negative
    return parse_request(data)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_render(args: argparse.Namespace) -> int:
    from longtake.cluster.engine import prepare

    try:
        job = prepare(request_from_args(args))  # every check, before Ray or a model starts
    except RequestError as e:
        print(f"longtake render: error: {e}", file=sys.stderr)
        return 2
    from longtake.cluster.runtime import render

    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = render(job.request, progress=not args.quiet, address=args.address, in_process=args.in_process)
    except KeyboardInterrupt:
        print("longtake render: interrupted; stopped workers, no output written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"wrote {result.out}: {result.frames} frames at {result.fps:g} fps, {result.width}x{result.height}, "
              f"{result.windows} windows x {result.steps} steps on {result.workers} workers in {result.wall_s:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtake", description="Long AI video from overlapping windows on Ray.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render a clip to MP4",
                            description="Render a long clip: windows denoised in parallel and fused at every step.")
    add_render_args(render)
    render.set_defaults(func=cmd_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
