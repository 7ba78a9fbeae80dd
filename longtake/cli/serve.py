"""`longtake serve`: the HTTP job API on Ray Serve. Its options (one flag per request limit, from
longtake.serve.limits) and checks run before Ray starts; Ray is reached only through
longtake.serve.deployments' start_server and stop_server. serve prints nothing on stdout: its lines
(the start, a failed job, the stop) go to stderr."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import fields
from pathlib import Path

from longtake.cli.options import ALLOWED_HOST_HELP, data_dir_arg
from longtake.cli.output import quiet_libraries, reserved_stdout, stop_on_signals
from longtake.request import RequestError
from longtake.serve.limits import Limits  # no Ray, no torch: the limits are plain data


def cmd_serve(args: argparse.Namespace) -> int:
    from longtake.private import private_dir
    from longtake.pipelines import inspect_model
    from longtake.pipelines.parallel import server_mode
    from longtake.provenance import load_c2pa
    from longtake.serve import load_or_create_token
    from longtake.serve.pages import served_hosts

    try:
        model = inspect_model(args.model)
        if not 0 <= args.min_replicas <= args.max_replicas:
            raise RequestError("min_replicas", args.min_replicas, f"0 <= min_replicas <= max_replicas ({args.max_replicas})")
        limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
        server_mode(model, limits.cp)  # a model that cannot shard its windows refuses --cp
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
            from longtake.serve.deployments import start_server

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
            if "longtake.serve.deployments" in sys.modules:  # (an interrupted start may have got this far or not)
                sys.modules["longtake.serve.deployments"].stop_server(started)
    return rc


def add_parser(sub) -> None:
    sv = sub.add_parser("serve", help="run the HTTP job API on Ray Serve",
                        description="Deploy the Ray Serve app: FastAPI ingress, job manager, autoscaled denoiser. "
                                    "Every /v1 route needs 'Authorization: Bearer TOKEN' ($LONGTAKE_API_TOKEN, or "
                                    "a token generated once into DATA_DIR/api_token).")
    sv.add_argument("--model", default="default", help="the model every job uses (default: the bundled model)")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; anything else is "
                                                        "reachable from outside: keep the token secret)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sv.add_argument("--allowed-host", action="append", metavar="NAME", help=ALLOWED_HOST_HELP)
    sv.add_argument("--min-replicas", type=int, default=0, help="denoiser replicas when idle (default 0)")
    sv.add_argument("--max-replicas", type=int, default=2, help="denoiser replicas at most (default 2)")
    data_dir_arg(sv, "job store, videos and token")
    sv.add_argument("--address", help="join this Ray cluster instead of starting a local one")
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
