"""`longtake eval` and `longtake bench`: developer tools reached from the CLI. longtake.tools.evaluate and
longtake.tools.bench are imported only when their command runs; each writes a JSON file (and, with --table,
a Markdown table) and prints its figures as strict JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys

from longtake.cli.output import (interrupted, log_above_progress_bars, quiet_libraries, reserved_stdout,
                                 stop_on_signals, strict_json)
from longtake.request import PLAN_MODES, RequestError


def _publish(name: str, write, result: dict, args: argparse.Namespace, emit, key: str) -> None:
    """bench / eval: the JSON file (and the Markdown table, where asked), then the figures on stdout."""
    command = f"longtake {name} " + " ".join(sys.argv[2:]) if sys.argv[1:2] == [name] else f"longtake {name}"
    write(result, args.out, args.table, command)
    emit(json.dumps(strict_json(result[key]), indent=2))


def _tool(name: str, check, work) -> int:
    """A tool command's frame: `check()` first (a RequestError: exit 2 naming the field, nothing run), then
    `work(emit)` with SIGTERM handled and progress off stdout (Ctrl-C: nothing written, exit 130)."""
    try:
        check()
    except RequestError as e:
        print(f"longtake {name}: error: {e}", file=sys.stderr)
        return 2
    stop_on_signals()
    with reserved_stdout() as emit, log_above_progress_bars():
        try:
            work(emit)
        except KeyboardInterrupt:
            return interrupted(name, "nothing written")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from longtake.cluster.engine import prepare
    from longtake.cluster.runtime import make_ray_pool
    from longtake.tools.evaluate import evaluate, junctions, pose_follow, write, write_junctions, write_pose

    checked = {}

    def check():
        for name, low in (("clips", 1), ("long_clips", 0), ("visible_prompts", 0), ("visible_seeds", 1),
                          ("pose_renders", 1), ("modes_seeds", 1)):
            if getattr(args, name) < low:
                raise RequestError(name, getattr(args, name), f"an integer >= {low}")
        for name in ("seconds", "long_seconds", "visible_seconds", "pose_seconds"):
            if not getattr(args, name) > 0:
                raise RequestError(name, getattr(args, name), "a number of seconds > 0")
        checked["job"] = prepare({"prompt": "a red ball moving right on a blue background", "model": args.model,
                                  "workers": args.workers, "out": "eval.mp4"})

    def work(emit):
        quiet_libraries("ray", "diffusers")
        from longtake.actors.ray_boot import stop_ray

        pool, started = make_ray_pool(checked["job"])
        try:
            if args.suite == "pose":
                result = pose_follow(pool, args.model, args.pose_renders, args.pose_seconds, progress=not args.quiet)
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
        writer = {"pose": write_pose, "modes": write_junctions}.get(args.suite, write)
        _publish("eval", writer, result, args, emit, "summary")

    return _tool("eval", check, work)


def cmd_bench(args: argparse.Namespace) -> int:
    from longtake.pipelines import inspect_model
    from longtake.tools.bench import bench, write

    if args.simulate is not None:
        return cmd_simulate(args)

    def work(emit):
        quiet_libraries("ray", "ray.serve", "diffusers", "transformers")
        result = bench(quick=args.quick, device=args.device, model=args.model, progress=not args.quiet,
                       workers_per_node=args.workers_per_node, bandwidth_gbps=args.bandwidth_gbps)
        _publish("bench", write, result, args, emit, "figures")

    return _tool("bench", lambda: inspect_model(args.model), work)


def _workers(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise RequestError("workers", text, "worker counts >= 1, comma-separated (e.g. 1,8,16,32)")
    return counts


def cmd_simulate(args: argparse.Namespace) -> int:
    """`longtake bench --simulate PRESET` (tools/bench_scale.py): a simulated cluster on this machine."""
    import psutil

    from longtake.pipelines.sim import PRESETS
    from longtake.tools import bench_scale

    settings = {}

    def check():
        if args.simulate not in PRESETS:
            raise RequestError("simulate", args.simulate, f"one of {', '.join(PRESETS)}")
        workers = _workers(args.workers) if args.workers else bench_scale.DEFAULTS["workers"]
        seconds = args.seconds if args.seconds is not None else bench_scale.default_seconds(args.simulate)
        steps = args.steps if args.steps is not None else bench_scale.DEFAULTS["steps"]
        for name, value, ok, expected in (("seconds", seconds, seconds > 0, "a number of seconds > 0"),
                                          ("steps", steps, steps >= 1, "an integer >= 1"),
                                          ("predict_s", args.predict_s, args.predict_s is None or args.predict_s > 0,
                                           "a number of seconds > 0"),
                                          ("kill", args.kill, 0 <= args.kill < max(workers),
                                           f"0 <= kill < the largest worker count ({max(workers)})")):
            if not ok:
                raise RequestError(name, value, expected)
        # what the run needs against this machine, before an hour's run ends in Ray's out-of-memory kills: the
        # default clip shortened to what fits (said on stderr), a --seconds given refused
        memory = psutil.virtual_memory().total * bench_scale.MEMORY_SHARE
        needed = bench_scale.memory_needed(args.simulate, seconds, max(workers))
        if needed > memory:
            fit = bench_scale.seconds_that_fit(args.simulate, max(workers), memory)
            if args.seconds is None and fit >= bench_scale.SHORTEST_S:
                print(f"longtake bench: a {seconds:g} s clip beside {max(workers)} simulated workers needs about "
                      f"{needed / 1e9:.1f} GB, {memory / 1e9:.1f} GB can be used here: {fit:g} s instead",
                      file=sys.stderr)
                seconds = fit
            else:
                raise RequestError("seconds", seconds, f"a clip whose run fits this machine's memory: "
                                   f"{max(workers)} simulated workers on {seconds:g} s need about "
                                   f"{needed / 1e9:.1f} GB, {memory / 1e9:.1f} GB can be used here ("
                                   + (f"--seconds {fit:g} fits" if fit >= bench_scale.SHORTEST_S
                                      else "fewer --workers") + ")")
        settings.update(workers=workers, seconds=seconds, steps=steps)

    def work(emit):
        quiet_libraries("ray")
        say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
        result = bench_scale.simulate(args.simulate, predict_s=args.predict_s, kill=args.kill, progress=say,
                                      **settings)
        out = args.out if args.out != "bench.json" else f"benchmarks/scale-{args.simulate}.json"
        command = "longtake bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "longtake bench"
        bench_scale.write(result, out, args.table, command)
        emit(json.dumps(strict_json(result["figures"]), indent=2) if args.json
             else "\n".join(bench_scale.table_lines(result, command)))

    return _tool("bench", check, work)


def add_eval_parser(sub) -> None:
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


def add_bench_parser(sub) -> None:
    bn = sub.add_parser("bench", help="measure efficiency, overhead, seams, memory, encoding, vs diffusers",
                        description="Benchmarks, every figure a ratio taken in one run; writes a JSON file and, "
                                    "with --table, a Markdown table (see BENCHMARKS.md).")
    bn.add_argument("--quick", action="store_true",
                    help="shorter clips and fewer of them (under 10 minutes on 2 cores)")
    bn.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where workers run (default cpu)")
    bn.add_argument("--model", default="default", help="the model for scaling, seams and memory (default: bundled)")
    bn.add_argument("--out", default="bench.json", help="JSON results (default bench.json)")
    bn.add_argument("--table", metavar="PATH", help="also write the Markdown table there (default: no table; "
                                                    "the repository's is BENCHMARKS.md)")
    bn.add_argument("--workers-per-node", type=int, default=8, help="projection: workers per node (default 8)")
    bn.add_argument("--bandwidth-gbps", type=float, default=10.0, help="projection: driver network, Gb/s (default 10)")
    bn.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sim = bn.add_argument_group("a simulated cluster at a real model's sizes (--simulate; tools/bench_scale.py)")
    sim.add_argument("--simulate", metavar="PRESET", help="render a long clip of a simulated model (sim:PRESET) on a "
                     "local multi-node Ray cluster once per worker count: efficiency, bytes per window-step, driver "
                     "CPU and memory, the same frames (writes benchmarks/scale-PRESET.json)")
    sim.add_argument("--workers", help="worker counts, comma-separated (default 1,8,16,32)")
    sim.add_argument("--seconds", type=float, help="clip length (default 600; 30 for an animating preset)")
    sim.add_argument("--steps", type=int, help="denoising steps (default 10)")
    sim.add_argument("--predict-s", type=float, help="simulated seconds per window-step (default: the preset's)")
    sim.add_argument("--kill", type=int, default=2, help="workers killed a third of the way into one more run at "
                                                         "the largest count (default 2; 0: no such run)")
    sim.add_argument("--json", action="store_true", help="print the figures as one JSON object (default: the table)")
    bn.set_defaults(func=cmd_bench)
