"""A small fake pose estimator for the --pose-from tests (`--pose-estimator fake_pose_estimator:make`, with
tests/ on the path): the person is the white pixels of the frame, their neck at the white pixels' centre
and the shoulders 5 px either side; nobody when there are no white pixels. The reference photo is a person
too (its white pixels)."""

import numpy as np


def make():
    def estimate(frame: np.ndarray) -> list[np.ndarray]:
        ys, xs = np.nonzero(frame.min(axis=-1) > 200)
        if not len(xs):
            return []
        person = np.zeros((18, 3))
        cx, cy = xs.mean(), ys.mean()
        person[1], person[2], person[5] = (cx, cy, 0.9), (cx - 5, cy, 0.9), (cx + 5, cy, 0.9)
        person[10], person[13] = (cx - 3, cy + 20, 0.8), (cx + 3, cy + 20, 0.8)  # ankles, for a body height
        person[8], person[11] = (cx - 3, cy + 10, 0.8), (cx + 3, cy + 10, 0.8)  # hips
        return [person]

    return estimate
