"""Chaos run: several farm jobs on a local multi-node Ray cluster while workers and nodes are killed.

    python scripts/chaos.py [--jobs 3] [--nodes 3] [--limit 300] [--kill-every 3] [--max-faults 0] [--model tiny]

1. Render every job undisturbed, in one process (the reference frames_sha256).
2. Start a `ray.cluster_utils.Cluster`: a head with no CPUs and N worker nodes with 1 CPU each.
3. Submit the jobs to a fresh farm and run a farm runner on the cluster (in this process).
4. Every few seconds, at random: SIGKILL a worker actor's process, or remove a worker node without
   grace and add a fresh one (capacity comes back, as an autoscaler would bring it).
5. Every job must finish, within --limit seconds, with the frames of its undisturbed run.
Prints a JSON summary (and writes it to --out); exits 0 on success, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def references(jobs: list[dict], tmp: Path) -> list[str]:
    from longtake.actors.pool import InProcessPool
    from longtake.actors.worker import WorkerSpec
    from longtake.cluster.engine import prepare, run

    shas = []
    pool = None
    for i, request in enumerate(jobs):
        job = prepare({**request, "out": str(tmp / f"ref-{i}.mp4")})
        pool = pool or InProcessPool(WorkerSpec(job.model.path))
        shas.append(run(job, pool, progress=False).frames_sha256)
    pool.shutdown()
    return shas


def actor_processes() -> list[psutil.Process]:
    """Live longtake worker actors of this script's cluster (descendants of its nodes; Ray titles
    them 'ray::Worker...')."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::Worker"):
            found.append(p)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3, help="worker nodes, 1 CPU each")
    ap.add_argument("--workers", type=int, default=2, help="workers per job")
    ap.add_argument("--limit", type=float, default=300, help="seconds for the whole run")
    ap.add_argument("--kill-every", type=float, default=3.0, help="seconds between faults")
    ap.add_argument("--max-faults", type=int, default=0, help="stop disturbing after this many faults (0: never)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    ap.add_argument("--farm-dir", help="default: a temporary directory")
    ap.add_argument("--out", help="also write the JSON summary to this file")
    args = ap.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from longtake.cluster import farm

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="longtake-chaos-"))
    farm_dir = Path(args.farm_dir or tmp / "farm")
    jobs = [dict(prompt=p, seconds=args.seconds, fps=8, steps=args.steps, window=8, overlap=2, seed=i,
                 model=args.model)
            for i, p in enumerate(["a red ball moving right on a blue background",
                                   "a green square moving left on a black background",
                                   "a yellow triangle bouncing on a gray background",
                                   "a blue ball moving up on a white background"] * args.jobs)][: args.jobs]
    t0 = time.monotonic()
    expected = references(jobs, tmp)
    ref_s = time.monotonic() - t0

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(args.nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    records = [r for r, _ in farm.submit(farm_dir, [(req, 0, None) for req in jobs])]
    runner = farm.Runner(farm_dir, workers=args.workers, checkpoint_every=2, min_free_mb=0,
                         blocklist_after=0, max_attempts=10)
    thread = threading.Thread(target=runner.serve_forever, kwargs={"exit_when_idle": True}, daemon=True)
    faults = []
    deadline = time.monotonic() + args.limit
    thread.start()
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(rng.uniform(0.5, 1.5) * args.kill_every)
            if not thread.is_alive():
                break
            if args.max_faults and len(faults) >= args.max_faults:  # the rest of the run undisturbed
                continue
            kill = rng.random() < 0.7
            if args.max_faults:  # a short run still has both kinds: the last faults are the kinds not yet seen
                missing = {"killed_worker_pid", "replaced_node"} - {k for f in faults for k in f}
                if args.max_faults - len(faults) <= len(missing):
                    kill = "killed_worker_pid" in missing
            if kill:
                victims = actor_processes()
                if victims:
                    victim = rng.choice(victims)
                    try:
                        victim.send_signal(signal.SIGKILL)
                        faults.append({"t": round(time.monotonic() - t0, 1), "killed_worker_pid": victim.pid})
                    except psutil.NoSuchProcess:
                        pass
            else:
                node = rng.choice(nodes)
                cluster.remove_node(node, allow_graceful=False)
                nodes.remove(node)
                nodes.append(cluster.add_node(num_cpus=1))
                faults.append({"t": round(time.monotonic() - t0, 1), "replaced_node": True})
        finished = not thread.is_alive()
        if not finished:
            runner.stop.set()
            thread.join(30)
    finally:
        ray.shutdown()
        cluster.shutdown()
    store = farm.open_store(farm_dir)
    results = []
    for record, sha in zip(records, expected):
        now = store.get(record.id)
        got = (now.result or {}).get("frames_sha256")
        results.append({"id": record.id, "state": now.state, "same_frames": got == sha, "error": now.error})
    ok = finished and all(r["state"] == "done" and r["same_frames"] for r in results)
    summary = json.dumps({"ok": ok, "jobs": results, "faults": faults, "reference_s": round(ref_s, 1),
                          "chaos_s": round(time.monotonic() - t0 - ref_s, 1), "farm_dir": str(farm_dir)}, indent=2)
    print(summary)
    if args.out:
        Path(args.out).write_text(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
