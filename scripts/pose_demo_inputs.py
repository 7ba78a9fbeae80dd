"""Write the inputs of docs/rendering.md's laptop pose demo: examples/ball.png (a red ball on blue, where the path
starts) and examples/path_mask.mp4 (its silhouette, white on black, going round a circle: 20 s at 8 fps,
256x256; any size works, longtake resamples it like a pose video).

    .venv/bin/python scripts/pose_demo_inputs.py [--out examples]
    .venv/bin/python scripts/pose_demo_inputs.py --sheet pose.mp4 docs/pose.png    # the README's picture

Deterministic (no randomness): running it again writes the same frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from longtake.tools.evaluate import write_pose_inputs
from longtake.models.shapes import ClipSpec

SIZE, SECONDS, FPS, PERIOD_S = 256, 20, 8, 4.0


def circle(frames: int, size: int) -> np.ndarray:
    """(frames, 2) centres going round a circle of 0.28 x size about the middle, once every PERIOD_S."""
    angle = 2 * np.pi * np.arange(frames) / (PERIOD_S * FPS) - np.pi / 2  # starts at the top
    return np.stack([size / 2 + 0.28 * size * np.cos(angle), size / 2 + 0.28 * size * np.sin(angle)], axis=1)


def sheet(render: Path, out: Path, count: int = 8) -> None:
    """The README's picture: the silhouettes (top) over the rendered frames (bottom), `count` frames of the
    first circle (every 4th frame), each frame at 128 px."""
    from longtake.pose import pose_frames
    from longtake.video import read_frames

    frames = read_frames(render)
    masks = pose_frames("pose", str(Path(__file__).resolve().parent.parent / "examples" / "path_mask.mp4"),
                        len(frames), FPS, frames.shape[2], frames.shape[1])
    pick = [4 * i for i in range(count)]
    big = lambda a: np.asarray(Image.fromarray(a).resize((128, 128), Image.Resampling.NEAREST))
    rows = [np.concatenate([big(masks[i]) for i in pick], axis=1), np.concatenate([big(frames[i]) for i in pick], axis=1)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    print(f"wrote {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("examples"))
    p.add_argument("--sheet", nargs=2, type=Path, metavar=("RENDER", "PNG"),
                   help="instead: write the README's picture of a render of the demo (make pose-demo's pose.mp4)")
    args = p.parse_args(argv)
    if args.sheet:
        return sheet(*args.sheet)
    args.out.mkdir(parents=True, exist_ok=True)
    frames = SECONDS * FPS
    write_pose_inputs(ClipSpec("red", "ball", "still", "blue"), circle(frames, SIZE), SIZE, FPS,
                      args.out / "ball.png", args.out / "path_mask.mp4")
    print(f"wrote {args.out / 'ball.png'} and {args.out / 'path_mask.mp4'} ({frames} frames at {FPS} fps)")


if __name__ == "__main__":
    main()
