"""`longtake keys` (the serve API's client keys: add, list, revoke) and `longtake verify` (what an MP4
carries: its AI-generated label and metadata, integrity code, watermark, C2PA manifest, and the job that
made it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longtake.cli.options import data_dir_arg
from longtake.request import RequestError
from longtake.serve.keys import DEFAULT_MAX_JOBS


def cmd_keys(args: argparse.Namespace) -> int:
    """longtake keys add | list | revoke: the serve API's client keys (serve/keys.py)."""
    from longtake.cluster.jobs import iso
    from longtake.private import private_dir
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


def cmd_verify(args: argparse.Namespace) -> int:
    from longtake.private import home
    from longtake.provenance import load_key, verify

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


def add_keys_parser(sub) -> None:
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
        data_dir_arg(p, "the serve data dir")
    ky.set_defaults(func=cmd_keys)


def add_verify_parser(sub) -> None:
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
