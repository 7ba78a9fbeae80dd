"""Small made-up inputs for checks that need a pose or media (the tests, `scripts/gpu_check.sh`): a walking
skeleton, and a Wan-Animate character photo with its face, background and mask clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def walking_pose(path, frames: int = 16, fps: float = 8, size: int = 64) -> str:
    """An OpenPose COCO-18 keypoint file: a figure walking right across a size x size canvas."""
    poses = []
    for i in range(frames):
        x = size * (0.25 + 0.5 * i / max(1, frames - 1))
        points = {0: (x, 10), 1: (x, 16), 2: (x - 6, 18), 5: (x + 6, 18), 3: (x - 8, 28), 6: (x + 8, 28),
                  8: (x - 4, 38), 11: (x + 4, 38), 9: (x - 4 - (i % 2) * 3, 48), 12: (x + 4 + (i % 2) * 3, 48),
                  10: (x - 4, 58), 13: (x + 4, 58)}
        flat = [0.0] * 54
        for k, (px, py) in points.items():
            flat[k * 3: k * 3 + 3] = [px, py * size / 64, 1.0]
        poses.append({"people": [{"pose_keypoints_2d": flat}]})
    with open(path, "w") as f:
        json.dump({"fps": fps, "width": size, "height": size, "frames": poses}, f)
    return str(path)


def write_animate_media(path) -> None:
    """pose.json (a walking skeleton), photo.png (the character, 64 x 64), face.mp4 (16 x 16), background.mp4
    and mask.mp4 (64 x 64), 2 s at 8 fps, into `path`."""
    from PIL import Image

    from longtake.video import VideoWriter

    path = Path(path)
    walking_pose(path / "pose.json")
    rng = np.random.default_rng(0)
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[8:60, 20:44] = (220, 40, 40)  # a red figure on black
    photo[12:20, 26:38] = (240, 200, 160)  # a face
    Image.fromarray(photo).save(path / "photo.png")
    clips = {"face": rng.integers(0, 255, (16, 16, 16, 3), np.uint8),
             "background": np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :, None], 16, 0).repeat(64, 1)
             .repeat(3, 3), "mask": np.zeros((16, 64, 64, 3), np.uint8)}
    clips["mask"][:, 8:56, 16:48] = 255  # the figure's place
    for name, frames in clips.items():
        with VideoWriter(path / f"{name}.mp4", frames.shape[2], frames.shape[1], 8) as writer:
            writer.write(np.ascontiguousarray(frames))
