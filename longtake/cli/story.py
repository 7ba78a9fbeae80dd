"""`longtake story FILE --out film.mp4`: a story of shots rendered as farm jobs (story.py, cluster/film.py),
joined into one film with film.otio (and film.edl) beside it."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from longtake.cli.output import quiet_libraries, reserved_stdout, stop_on_signals
from longtake.request import RequestError


def cmd_story(args: argparse.Namespace) -> int:
    from longtake import story as stories
    from longtake.cluster import film

    t0 = time.perf_counter()
    out = str(Path(args.out or Path(args.story).with_suffix(".mp4").name).resolve())
    store = stories.store_dir(out)
    farm_dir = Path(args.farm_dir).resolve() if args.farm_dir else store
    only = [s for part in args.only or [] for s in part.split(",") if s] or None
    try:
        story = stories.load(args.story)
        if args.workers is not None and args.workers < 1:
            raise RequestError("workers", args.workers, "an integer >= 1")
        store.mkdir(parents=True, exist_ok=True)
        pictures = {n: c.image for n, c in story.characters.items()}
        shots = stories.plan(story, store, pictures, only)
        geometry = stories.check(story, store)  # every shot's checks before anything renders or is queued
        references = film.character_frames(story, store)
        if references != pictures:  # a character's picture rendered from its prompt: the shots showing it change
            shots = stories.plan(story, store, references, only)
            stories.check(story, store)
        jobs = film.submit(farm_dir, story, shots, priority=args.priority)
    except RequestError as e:
        print(f"longtake story: error: {e} (nothing was submitted)", file=sys.stderr)
        return 2
    if args.submit_only:
        for shot in shots:
            record = jobs[shot.id]
            print(f"{shot.id}\t{record.id if record else 'kept'}\t{record.state if record else 'done'}")
        return 0
    from longtake.cluster.farm import Runner

    if all(r is None or r.state == "done" for r in jobs.values()):  # every shot reused: no runner, no Ray
        done = {s: r for s, r in jobs.items() if r is not None}
        return _film(args, story, shots, jobs, done, store, farm_dir, geometry, out, t0)
    quiet_libraries()
    runner = Runner(farm_dir, address=args.address, workers=args.workers, progress=False, poll_s=0.2)
    thread = threading.Thread(target=runner.serve_forever, name="story-runner", daemon=True)
    stop_on_signals(lambda signum, frame: runner.stop.set())  # running shots checkpoint and are requeued
    thread.start()
    try:
        done = film.wait(farm_dir, jobs, alive=thread.is_alive)
    except RuntimeError as e:
        print(f"longtake story: error: {e} (the shots resume from their checkpoints when it runs again)",
              file=sys.stderr)
        return 1
    finally:
        runner.stop.set()
        thread.join()
    return _film(args, story, shots, jobs, done, store, farm_dir, geometry, out, t0)


def _film(args, story, shots, jobs, done, store, farm_dir, geometry, out, t0) -> int:
    from longtake import story as stories
    from longtake.cluster import film

    film.record_shots(store, shots, done)
    failed = {s: r for s, r in done.items() if r.state != "done"}
    if failed:
        for shot_id, record in failed.items():
            print(f"longtake story: shot {shot_id} (job {record.id}) {record.state}: {record.error or ''}",
                  file=sys.stderr)
        print(f"longtake story: no film: {len(failed)} shot(s) did not render (`longtake story` again retries "
              f"them; their logs: {farm_dir}/jobs/ID/log.txt)", file=sys.stderr)
        return 1
    kept = stories.manifest(store)
    produce_ids = {s.id: done[s.id].id if s.id in done else kept.get(s.id, {}).get("job", "") for s in shots}
    from longtake.provenance import Provenance

    summary = film.assemble(story, out, geometry, produce_ids, Provenance.local(farm_dir))
    otio_path = str(Path(out).with_suffix(".otio"))
    written = film.timeline(story, otio_path, geometry["fps"], produce_ids)
    result = {"out": out, "otio": otio_path, "edl": next((w for w in written if w.endswith(".edl")), None),
              "frames": summary["frames"], "fps": geometry["fps"], "width": geometry["width"],
              "height": geometry["height"], "cuts": summary["cuts"], "dissolves": summary["dissolves"],
              "frames_sha256": summary["frames_sha256"], "produce_id": summary["produce_id"],
              "farm_dir": str(farm_dir), "wall_s": round(time.perf_counter() - t0, 3),
              "shots": [{"id": s.id, "begin": s.begin, "after": s.after, "frames": s.frames, "out": s.out,
                         "hash": s.hash, "job": produce_ids.get(s.id),
                         "rendered": jobs.get(s.id) is not None and jobs[s.id].state != "done"}
                        for s in shots]}
    with reserved_stdout() as emit:
        if args.json:
            emit(json.dumps(result))
        else:
            for s in result["shots"]:
                emit(f"{s['id']:12} {'rendered' if s['rendered'] else 'reused':8} {s['frames']:5d} frames  {s['out']}")
            emit(f"{out}: {result['frames']} frames at {result['fps']:g} fps, {len(shots)} shots; {otio_path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("story", help="render a story of shots as one film (farm jobs, OpenTimelineIO)",
                       description="Render a story file (YAML or JSON: style, characters, shots) as farm jobs, one "
                                   "per shot (cut-separated shots at once), join them into one film and write "
                                   "film.otio beside it. Shots whose request is unchanged are reused.")
    p.add_argument("story", help="the story file")
    p.add_argument("--out", help="the film (default: the story's name .mp4 in the current directory); its shots "
                                 "go to FILM.story/ beside it")
    p.add_argument("--farm-dir", help="the farm whose jobs the shots are (default: FILM.story/)")
    p.add_argument("--only", action="append", metavar="ID[,ID]", help="render only these shots (and what they "
                   "need); the others keep their newest MP4")
    p.add_argument("--submit-only", action="store_true", help="queue the shots and return (runners elsewhere "
                                                              "render them; run again to join the film)")
    p.add_argument("--workers", type=int, help="the runner's workers (default: one per GPU, else one per CPU core)")
    p.add_argument("--priority", type=int, default=0, help="the shots' priority (default 0)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_story)
