"""The farm's commands: `longtake submit` (queue jobs from spec files), `farm run` (the runner), `farm monitor`
(a read-only web view), `status`, `cancel` / `pause` / `resume` / `retry` / `delete` of one job, and `gc` (the
retention sweep, of a farm or a serve data directory)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from longtake.cli.options import ALLOWED_HOST_HELP, farm_dir_arg, plural
from longtake.cli.output import quiet_libraries, reserved_stdout, stop_on_signals
from longtake.cluster.retention import DEFAULT_OUTPUTS
from longtake.request import RequestError


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
        runner = Runner(args.farm_dir, address=args.address, workers=args.workers, max_jobs=args.max_jobs,
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
    if record.story:
        lines += [("story", f"{record.story['film']}, shot {record.story['shot']} ({record.story['begin']})")]
    lines += [("waits for", ", ".join(record.depends))] if record.depends else []
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


def cmd_farm_monitor(args: argparse.Namespace) -> int:
    from longtake.private import private_dir
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


def cmd_gc(args: argparse.Namespace) -> int:
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


def add_parsers(sub) -> None:
    sb = sub.add_parser("submit", help="queue render jobs on the farm",
                        description="Queue the jobs of one or more spec files (YAML or JSON: a job, a list of jobs, "
                                    "or {jobs: [...]}). A job is a render request plus optional 'priority' (higher "
                                    "first) and 'token' (a client token: the same token submits once). Every job is "
                                    "checked first; if one is invalid nothing is submitted. Prints one id per job.")
    sb.add_argument("specs", nargs="+", metavar="SPEC", help="spec files")
    sb.add_argument("--priority", type=int, default=0, help="priority of jobs that give none (default 0)")
    farm_dir_arg(sb)
    sb.set_defaults(func=cmd_submit)
    fm = sub.add_parser("farm", help="the farm runner")
    fsub = fm.add_subparsers(dest="farm_command", required=True)
    fr = fsub.add_parser("run", help="render queued jobs until stopped",
                         description="Take queued jobs by priority, then submit time, and render them on the Ray "
                                     "cluster with checkpoints; requeue jobs whose runner died. Ctrl-C / SIGTERM "
                                     "checkpoint the current job and put it back in the queue.")
    farm_dir_arg(fr)
    fr.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    fr.add_argument("--workers", type=int, help="the runner's workers, shared by the jobs it renders at once "
                                                "(default: one per GPU, else one per CPU core)")
    fr.add_argument("--max-jobs", type=int, help="at most this many jobs at once (default: as many as the workers "
                                                 "allow)")
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
    farm_dir_arg(mo)
    mo.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    mo.add_argument("--port", type=int, default=8100, help="HTTP port (default 8100)")
    mo.add_argument("--allowed-host", action="append", metavar="NAME", help=ALLOWED_HOST_HELP)
    mo.set_defaults(func=cmd_farm_monitor)
    st = sub.add_parser("status", help="farm jobs, or one job", description="List the farm's jobs, or show one.")
    st.add_argument("id", nargs="?", help="a job id")
    st.add_argument("--json", action="store_true", help="JSON: one job-status object, or a list of them (the HTTP "
                                                        "API's shape; a done job includes the render summary)")
    st.add_argument("--limit", type=int, default=50, help="newest jobs listed (default 50)")
    farm_dir_arg(st)
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
        farm_dir_arg(c)
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
