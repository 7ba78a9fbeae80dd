"""The refactor guard: frames_sha256 of a fixed set of requests, in process and on 2 Ray workers.

    .venv/bin/python scripts/frames_guard.py guard.json            # write the table
    .venv/bin/python scripts/frames_guard.py after.json before.json  # and compare with an earlier one

A restructuring with no change of behaviour gives the same hash for every row (DESIGN.md: determinism is
the oracle). Every family and mode is here: text, timeline, image, extend, loop, bridge, keyframes, video
to video, pose and the bundled model's plan (on and off), tiny (AnimateDiff), tiny-wan, tiny-wan22 (two
experts), Wan-Animate. A few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cases(work: Path) -> dict[str, dict]:
    """name -> request (without out); media made in `work` on first use."""
    from longtake.pipelines.tiny import build_tiny_wan

    wan22 = work / "tiny-wan22"
    if not (wan22 / "model_index.json").exists():
        build_tiny_wan(wan22, seed=1, two_experts=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import walking_pose  # the tests' walking skeleton (keypoint JSON)

    pose = walking_pose(work / "pose.json")
    d = {"seconds": 2, "steps": 4, "seed": 3}
    ball = "a red ball moving right on a blue background"
    return {
        "text": {**d, "prompt": ball},
        "timeline": {**d, "seconds": 3, "timeline": [{"at": 0, "prompt": ball},
                                                     {"at": 2, "prompt": "a yellow square moving up on green"}]},
        "plan-none": {**d, "prompt": ball, "plan": "none"},
        "image": {**d, "prompt": ball, "image": str(ROOT / "examples" / "ball.png")},
        "keyframes": {**d, "prompt": "a red ball on blue", "keyframes": [
            {"image": str(ROOT / "examples" / "ball.png"), "at": 1.0}]},
        "extend": {**d, "prompt": ball, "extend": "@a.mp4"},
        "loop": {**d, "prompt": "a red ball bouncing on blue", "loop": True},
        "bridge": {**d, "prompt": "a ball on blue", "extend": "@a.mp4", "lead_into": "@b.mp4"},
        "video": {**d, "prompt": "a green ball on yellow", "video": "@a.mp4", "strength": 0.6},
        "pose": {**d, "prompt": "a red ball on a blue background", "reference": str(ROOT / "examples" / "ball.png"),
                 "pose": str(ROOT / "examples" / "path_mask.mp4")},
        "tiny": {**d, "prompt": "a cat", "model": "tiny"},
        "tiny-pose": {**d, "prompt": "a dancer", "model": "tiny-pose", "pose": pose},
        "tiny-wan": {**d, "prompt": "a cat", "model": "tiny-wan"},
        "tiny-wan22": {**d, "prompt": "a cat", "model": str(wan22)},
        "wan-animate": {**d, "prompt": "a person", "model": "tiny-wan-animate", "pose": pose,
                        "reference": str(ROOT / "examples" / "ball.png")},
    }


def main() -> int:
    import longtake

    out, before = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    work = Path(os.environ.get("GUARD_WORK") or tempfile.mkdtemp(prefix="guard-"))
    work.mkdir(parents=True, exist_ok=True)
    for name, prompt, seed in (("a.mp4", "a red ball moving right on blue", 1), ("b.mp4", "a yellow ball on green", 2)):
        if not (work / name).exists():
            longtake.render({"prompt": prompt, "seconds": 2, "steps": 4, "seed": seed, "out": str(work / name)},
                            in_process=True)
    table: dict[str, dict] = {}
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, request in cases(work).items():
            request = {k: (str(work / v[1:]) if isinstance(v, str) and v.startswith("@") else v)
                       for k, v in request.items()}
            row = {}
            for where, extra in (("in_process", {}), ("ray_2", {"workers": 2})):
                t0 = time.perf_counter()
                result = longtake.render({**request, **extra, "out": str(work / f"{name}-{where}.mp4")},
                                         in_process=not extra)
                row[where] = result.frames_sha256
                print(f"{name:12} {where:10} {result.frames_sha256[:16]} {time.perf_counter() - t0:5.1f} s",
                      file=sys.stderr, flush=True)
            row["same"] = row["in_process"] == row["ray_2"]
            table[name] = row
    finally:
        ray.shutdown()
    Path(out).write_text(json.dumps(table, indent=2))
    ok = all(r["same"] for r in table.values())
    if before:
        old = json.loads(Path(before).read_text())
        print("| request | before | after | equal |\n|---|---|---|---|")
        for name, row in table.items():
            was = old.get(name, {}).get("in_process", "-")
            equal = was == row["in_process"] == row["ray_2"]
            ok &= equal or name not in old
            print(f"| {name} | {was[:12]} | {row['in_process'][:12]} | {'yes' if equal else 'NO'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
