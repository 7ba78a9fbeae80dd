"""`longtake` command line.

    longtake render "a red ball bouncing" --seconds 60 --fps 8 --workers 2 --out ball.mp4
    longtake render --timeline story.yaml --seconds 90 --model ./animatediff-dir --json
    longtake submit shots.yaml; longtake farm run; longtake status [ID] [--json]
    longtake cancel|pause|resume|retry ID

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
    p.add_argument("--height", type=int, help="height in pixels, a multiple of the model's size multiple (its VAE "
                                              "factor; x the patch size for DiTs: 16 for Wan) (default: the model's)")
    p.add_argument("--width", type=int, help="width in pixels, a multiple of the model's size multiple "
                                             "(default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's; 25 for AnimateDiff, 50 for Wan)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 = off (default: the model's; "
                                                  "7.5 for AnimateDiff, 5 for Wan)")
    p.add_argument("--guidance-2", type=float, dest="guidance_2",
                   help="guidance of the low-noise expert, for two-expert models (Wan 2.2 A14B) (default: --guidance)")
    p.add_argument("--seed", type=int, help="random seed; same request + seed = same frames (default 0)")
    p.add_argument("--window", type=int, help="window length in the model's latent frames (= frames for AnimateDiff; "
                                              "Wan: 4 frames each, 21 = 81 frames) (default: the model's native "
                                              "length, 16 for AnimateDiff, 21 for Wan)")
    p.add_argument("--overlap", type=int, help="latent frames shared by consecutive windows (default: window // 4)")
    p.add_argument("--weighting", choices=["flat", "pyramid", "overlap-linear"],
                   help="taper for fusing overlapping predictions (default: pyramid)")
    p.add_argument("--noise", choices=["independent", "freenoise", "correlated"],
                   help="initial noise per frame, FreeNoise-style shuffled windows, or correlated across frames "
                        "(AR(1)) (default: the model's; independent for most models, correlated for the bundled one)")
    p.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else one per CPU core)")
    p.add_argument("--model", help="a local diffusers model directory (AnimateDiffPipeline or WanPipeline), "
                                   "'default' (the bundled model), or 'tiny' / 'tiny-wan' (random weights, for quick "
                                   "checks) (default: default)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where workers run (default: auto)")
    p.add_argument("--out", help="output MP4 path (default: longtake.mp4)")
    p.add_argument("--preview", metavar="PNG", help="also write a contact sheet of sampled frames")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--in-process", action="store_true", help="no Ray: one in-process worker (reference result)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


REQUEST_FIELDS = ("prompt", "negative_prompt", "seconds", "fps", "height", "width", "steps", "guidance", "guidance_2",
                  "seed", "window", "overlap", "weighting", "noise", "workers", "model", "device", "out", "preview")


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


def cmd_eval(args: argparse.Namespace) -> int:
    from longtake.cluster.engine import prepare
    from longtake.cluster.runtime import make_ray_pool
    from longtake.evaluate import evaluate, write

    try:
        job = prepare({"prompt": "a red ball moving right on a blue background", "model": args.model,
                       "workers": args.workers, "out": "eval.mp4"})
    except RequestError as e:
        print(f"longtake eval: error: {e}", file=sys.stderr)
        return 2
    import ray

    signal.signal(signal.SIGTERM, _raise_interrupt)
    pool, started = make_ray_pool(job)
    try:
        result = evaluate(pool, args.model, args.clips, args.seconds, args.long_clips, args.long_seconds)
    finally:
        pool.shutdown()
        if started:
            ray.shutdown()
    command = "longtake eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else "longtake eval"
    write(result, args.out, args.table, command)
    print(json.dumps(result["summary"], indent=2))
    return 0


def default_data_dir() -> str:
    import os
    from pathlib import Path

    return os.environ.get("LONGTAKE_DATA_DIR") or str(Path.home() / ".local" / "share" / "longtake" / "serve")


def cmd_serve(args: argparse.Namespace) -> int:
    import threading
    from pathlib import Path

    from longtake.pipelines import inspect_model
    from longtake.serve import load_or_create_token
    from longtake.serve.manager import Limits

    try:
        model = inspect_model(args.model)
        if not 0 <= args.min_replicas <= args.max_replicas:
            raise RequestError("min_replicas", args.min_replicas, f"0 <= min_replicas <= max_replicas ({args.max_replicas})")
    except RequestError as e:
        print(f"longtake serve: error: {e}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).resolve()
    token, created = load_or_create_token(data_dir)
    if created:
        print(f"API token (saved to {data_dir / 'api_token'}, owner-only): {token}", file=sys.stderr)
    import ray
    from ray import serve

    from longtake.cluster.runtime import start_ray
    from longtake.serve.app import build_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = start_ray(args.address)
    try:
        device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        serve.start(http_options={"host": args.host, "port": args.port})
        limits = Limits(max_seconds=args.max_seconds, max_steps=args.max_steps, max_side=args.max_side,
                        max_queued=args.max_queued, max_running=args.max_running)
        serve.run(build_app(model.path, str(data_dir), token, device, args.min_replicas, args.max_replicas, limits),
                  name="longtake", route_prefix="/")
        print(f"longtake serving {args.model} on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
        try:
            while not stop.wait(1):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0


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
    except RequestError as e:
        print(f"longtake submit: error: {e} (nothing was submitted)", file=sys.stderr)
        return 2
    for record, created in farm.submit(args.farm_dir, jobs):
        print(record.id)
        if not created:
            print(f"longtake submit: {record.id}: already submitted with this token ({record.state})", file=sys.stderr)
    return 0


def cmd_farm_run(args: argparse.Namespace) -> int:
    from longtake.cluster.farm import Runner

    try:
        runner = Runner(args.farm_dir, address=args.address, workers=args.workers,
                        checkpoint_every=args.checkpoint_every, max_attempts=args.max_attempts,
                        blocklist_after=args.blocklist_after, task_timeout_s=args.task_timeout,
                        min_free_mb=args.min_free_mb, progress=not args.quiet)
    except RequestError as e:
        print(f"longtake farm run: error: {e}", file=sys.stderr)
        return 2

    def stop(signum, frame):  # finish nothing more: checkpoint the current job and requeue it
        runner.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("longtake.cluster.farm").setLevel(logging.INFO)  # one line per job start and end
    print(f"longtake farm runner {runner.id} on {args.farm_dir} (Ctrl-C to stop)", file=sys.stderr)
    runner.serve_forever(exit_when_idle=args.exit_when_idle)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from longtake.cluster import farm

    store = farm.open_store(args.farm_dir)
    if args.id:
        record = store.get(args.id)
        if record is None:
            print(f"longtake status: error: id: got {args.id!r}, expected the id of a job in {args.farm_dir}",
                  file=sys.stderr)
            return 2
        info = record.to_dict() | {"dir": str(farm.job_dir(args.farm_dir, record.id))}
        if args.json:
            print(json.dumps(info))
        else:
            for key in ("id", "status", "priority", "progress", "error", "dir"):
                print(f"{key:9} {info[key]}")
            if record.result:
                print(f"{'out':9} {record.result['out']}\n{'sha256':9} {record.result['frames_sha256']}")
        return 0
    rows = farm.status_rows(store)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'ID':16}  {'STATE':9}  {'PRI':>4}  {'STEP':>7}  {'SUBMITTED':11}  WHAT")
    for r in rows:
        print(f"{r['id']:16}  {r['state']:9}  {r['priority']:>4}  {r['progress']:>7}  {r['submitted']:11}  {r['what']}")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from longtake.cluster import farm

    try:
        record = farm.control(args.farm_dir, args.command, args.id)
    except RequestError as e:
        print(f"longtake {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"{record.id} {record.state}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from longtake.bench import bench, write
    from longtake.pipelines import inspect_model

    try:
        inspect_model(args.model)
    except RequestError as e:
        print(f"longtake bench: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    result = bench(quick=args.quick, device=args.device, model=args.model, progress=not args.quiet,
                   workers_per_node=args.workers_per_node, bandwidth_gbps=args.bandwidth_gbps)
    command = "longtake bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "longtake bench"
    write(result, args.out, args.table, command)
    print(json.dumps(result["figures"], indent=2))
    return 0


def _farm_dir_arg(p: argparse.ArgumentParser) -> None:
    from longtake.cluster.farm import default_farm_dir

    p.add_argument("--farm-dir", default=default_farm_dir(),
                   help="farm directory: job store and job files (default $LONGTAKE_FARM_DIR or "
                        "~/.local/share/longtake/farm)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtake", description="Long AI video from overlapping windows on Ray.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
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
    ev.add_argument("--workers", type=int, help="Ray workers (default: one per CPU core)")
    ev.add_argument("--out", default="eval.json", help="JSON results (default eval.json)")
    ev.add_argument("--table", default="EVAL.md", help="Markdown table (default EVAL.md)")
    ev.set_defaults(func=cmd_eval)
    sv = sub.add_parser("serve", help="run the HTTP job API on Ray Serve",
                        description="Deploy the Ray Serve app: FastAPI ingress, job manager, autoscaled denoiser. "
                                    "Every /v1 route needs 'Authorization: Bearer TOKEN' ($LONGTAKE_API_TOKEN, or "
                                    "a token generated once into DATA_DIR/api_token).")
    sv.add_argument("--model", default="default", help="the model every job uses (default: the bundled model)")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; anything else is "
                                                        "reachable from outside: keep the token secret)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sv.add_argument("--min-replicas", type=int, default=0, help="denoiser replicas when idle (default 0)")
    sv.add_argument("--max-replicas", type=int, default=2, help="denoiser replicas at most (default 2)")
    sv.add_argument("--data-dir", default=default_data_dir(), help="job store, videos and token "
                                                                   "(default $LONGTAKE_DATA_DIR or ~/.local/share/longtake/serve)")
    sv.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    sv.add_argument("--max-seconds", type=float, default=120, help="longest clip accepted (default 120)")
    sv.add_argument("--max-steps", type=int, default=50, help="most steps accepted (default 50)")
    sv.add_argument("--max-side", type=int, default=512, help="largest height/width accepted (default 512)")
    sv.add_argument("--max-queued", type=int, default=16, help="queued + running jobs before 429 (default 16)")
    sv.add_argument("--max-running", type=int, default=2, help="jobs rendering at once (default 2)")
    sv.set_defaults(func=cmd_serve)

    bn = sub.add_parser("bench", help="measure efficiency, overhead, seams, memory, encoding, vs diffusers",
                        description="Benchmarks, every figure a ratio taken in one run; writes a JSON file and a "
                                    "Markdown table (see BENCHMARKS.md).")
    bn.add_argument("--quick", action="store_true", help="shorter clips and fewer of them (under 10 minutes on 2 cores)")
    bn.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where workers run (default cpu)")
    bn.add_argument("--model", default="default", help="the model for scaling, seams and memory (default: bundled)")
    bn.add_argument("--out", default="bench.json", help="JSON results (default bench.json)")
    bn.add_argument("--table", default="BENCHMARKS.md", help="Markdown table (default BENCHMARKS.md; '' for none)")
    bn.add_argument("--workers-per-node", type=int, default=8, help="projection: workers per node (default 8)")
    bn.add_argument("--bandwidth-gbps", type=float, default=10.0, help="projection: driver network, Gb/s (default 10)")
    bn.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    bn.set_defaults(func=cmd_bench)

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
    fr.add_argument("--task-timeout", type=float, help="seconds after which a window counts as hung (default: none)")
    fr.add_argument("--min-free-mb", type=float, default=256,
                    help="fail a job (keeping its checkpoints) when less disk is free (default 256)")
    fr.add_argument("--exit-when-idle", action="store_true", help="stop when the queue is empty")
    fr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    fr.set_defaults(func=cmd_farm_run)
    st = sub.add_parser("status", help="farm jobs, or one job", description="List the farm's jobs, or show one.")
    st.add_argument("id", nargs="?", help="a job id")
    st.add_argument("--json", action="store_true", help="JSON (a done job includes the render summary)")
    _farm_dir_arg(st)
    st.set_defaults(func=cmd_status)
    for name, text in (("cancel", "cancel a queued, paused or running job (frees its workers)"),
                       ("pause", "pause a queued or running job (a running one is checkpointed at its step)"),
                       ("resume", "put a paused job back in the queue"),
                       ("retry", "requeue a failed or cancelled job; it resumes from its last checkpoint")):
        c = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        c.add_argument("id", help="a job id")
        _farm_dir_arg(c)
        c.set_defaults(func=cmd_control)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
