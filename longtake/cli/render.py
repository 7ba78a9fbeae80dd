"""`longtake render`: a request from the options (--keyframe, --timeline, --pose-from read here), checked
before Ray or a model starts, then rendered in this process or on Ray workers; one line or one JSON object
on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longtake.cli.options import REQUEST_FIELDS, add_render_args, plural
from longtake.cli.output import interrupted, log_above_progress_bars, quiet_libraries, reserved_stdout, stop_on_signals
from longtake.request import RenderRequest, RequestError, load_timeline, parse_request


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
        if args.in_process:
            from longtake.cluster.runtime import check_in_process

            check_in_process(job)
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
            return interrupted("render", "stopped workers, no output written")
        if args.json:
            emit(json.dumps(result.to_dict()))
        else:
            emit(f"wrote {result.out}: {plural(result.frames, 'frame')} at {result.fps:g} fps, {result.width}x"
                 f"{result.height}, {plural(result.windows, 'window')} x {plural(result.steps, 'step')} on "
                 f"{plural(result.workers, 'worker')} in {result.wall_s:.1f} s")
    return 0


def add_parser(sub) -> None:
    render = sub.add_parser("render", help="render a clip to MP4",
                            description="Render a long clip: windows denoised in parallel and fused at every step.")
    add_render_args(render)
    render.set_defaults(func=cmd_render)
