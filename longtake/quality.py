"""Quality metrics of rendered clips of one coloured object on a plain background (numpy only).

    track = object_track(frames, background_rgb)         # per-frame centroid, area, colour
    classify_color(track), classify_motion(track, size)  # vs the prompt's words
    seam_ratio(track, seams, size)                       # centroid jumps at window seams / median jump
    drift(track, fps)                                    # colour and size, last 10 s vs first 10 s
    object_visible(frames, background_rgb, color_name)    # per frame: is the prompted object there?
    junction_ratio(x, y, new)                             # a junction's change / median change of new frames

Positions are wrap-aware (circular means and differences), because objects wrap around the edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longtake.models.shapes import OBJECT_COLORS

MIN_AREA = 4  # pixels: fewer means "no object in this frame"
FAR = 80.0  # RGB distance from the background beyond which a pixel is the object's


@dataclass
class Track:
    centroids: np.ndarray  # (F, 2) x, y in pixels; nan where no object
    areas: np.ndarray  # (F,) object pixels
    colors: np.ndarray  # (F, 3) mean object RGB; nan where no object
    size: int  # frame width (= height)


def circular_centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of a (H, W) bool mask's pixels on a frame that wraps around its edges (circular means);
    the mask must have a pixel."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ang_x, ang_y = 2 * np.pi * (xs + 0.5) / w, 2 * np.pi * (ys + 0.5) / h
    cx = np.arctan2(np.sin(ang_x).mean(), np.cos(ang_x).mean()) % (2 * np.pi) * w / (2 * np.pi) - 0.5
    cy = np.arctan2(np.sin(ang_y).mean(), np.cos(ang_y).mean()) % (2 * np.pi) * h / (2 * np.pi) - 0.5
    return cx % w, cy % h


def object_track(frames: np.ndarray, background: tuple[int, int, int], threshold: float = FAR) -> Track:
    """frames (F, H, W, 3) uint8; the object is every pixel far from the background colour."""
    f, h, w, _ = frames.shape
    dist = np.linalg.norm(frames.astype(np.float64) - np.asarray(background, dtype=np.float64), axis=-1)
    mask = dist > threshold  # (F, H, W)
    areas = mask.sum(axis=(1, 2)).astype(np.float64)
    centroids = np.full((f, 2), np.nan)
    colors = np.full((f, 3), np.nan)
    for i in range(f):
        if areas[i] < MIN_AREA:
            continue
        centroids[i] = circular_centroid(mask[i])
        colors[i] = frames[i][mask[i]].mean(axis=0)
    return Track(centroids, areas, colors, w)


def wrap_delta(a: np.ndarray, b: np.ndarray, size) -> np.ndarray:
    """b - a on a circle of circumference `size`, in [-size/2, size/2) (size: a number, or one per axis,
    e.g. [width, height])."""
    return (b - a + size / 2) % size - size / 2


def steps(track: Track) -> np.ndarray:
    """(F-1, 2) per-frame displacement, nan where either frame has no object."""
    return wrap_delta(track.centroids[:-1], track.centroids[1:], track.size)


def classify_color(track: Track) -> str | None:
    valid = ~np.isnan(track.colors[:, 0])
    if not valid.any():
        return None
    mean = track.colors[valid].mean(axis=0)
    return min(OBJECT_COLORS, key=lambda c: np.linalg.norm(mean - np.asarray(OBJECT_COLORS[c])))


def classify_motion(track: Track) -> str | None:
    """left / right / up / down (mean wrap-aware velocity), bouncing (vertical back and forth), still."""
    d = steps(track)
    d = d[~np.isnan(d).any(axis=1)]
    if len(d) < 4:
        return None
    scale = track.size / 64  # thresholds are in pixels of a 64-pixel frame
    speed = np.linalg.norm(d, axis=1)
    if np.median(speed) < 0.4 * scale:
        return "still"
    mean = d.mean(axis=0)
    dy = d[:, 1][np.abs(d[:, 1]) > 0.3 * scale]
    reversals = int((np.sign(dy[1:]) != np.sign(dy[:-1])).sum()) if len(dy) > 1 else 0
    if reversals >= max(2, len(d) // 24) and np.linalg.norm(mean) < 0.35 * speed.mean():
        return "bouncing"
    if abs(mean[0]) >= abs(mean[1]):
        return "right" if mean[0] > 0 else "left"
    return "down" if mean[1] > 0 else "up"


def seam_pairs(windows: list[tuple[int, int]], frames: int) -> list[int]:
    """Indices f such that frames (f, f+1) straddle a window boundary (a window starts or ends)."""
    bounds = {s for s, _ in windows[1:]} | {e for _, e in windows[:-1]}
    return sorted(b - 1 for b in bounds if 0 < b < frames)


def seam_ratio(track: Track, seams: list[int]) -> float:
    """Mean centroid jump across seam pairs / median jump inside windows (1 = seamless)."""
    jumps = np.linalg.norm(steps(track), axis=1)  # (F-1,)
    at_seam = np.zeros(len(jumps), dtype=bool)
    at_seam[[s for s in seams if s < len(jumps)]] = True
    seam, inside = jumps[at_seam], jumps[~at_seam]
    seam, inside = seam[~np.isnan(seam)], inside[~np.isnan(inside)]
    if not len(seam) or not len(inside) or np.median(inside) == 0:
        return float("nan")
    return float(seam.mean() / np.median(inside))


def drift(track: Track, fps: float, seconds: float = 10.0) -> dict:
    """Object colour distance (RGB) and size ratio, last `seconds` against the first `seconds`."""
    n = int(round(seconds * fps))
    first, last = slice(0, n), slice(len(track.areas) - n, None)
    mean_color = lambda s: np.nanmean(track.colors[s], axis=0)
    return {
        "color_delta": float(np.linalg.norm(mean_color(last) - mean_color(first))),
        "size_ratio": float(track.areas[last].mean() / max(track.areas[first].mean(), 1e-9)),
    }


VISIBLE_MIN_SHARE = 0.005  # of the frame's pixels (20 at 64 x 64; the smallest object drawn covers about 370)


def object_visible(frames: np.ndarray, background: tuple[int, int, int], color: str, threshold: float = FAR) -> np.ndarray:
    """(F,) bool: the prompted object (colour name `color`) is in the frame. Its pixels are those far from the
    prompted background and nearer that colour than any other object colour; it is there when they cover at
    least VISIBLE_MIN_SHARE of the frame (a faded blur, or an object of another colour, does not count)."""
    x = frames.astype(np.float32)
    far = np.linalg.norm(x - np.asarray(background, np.float32), axis=-1) > threshold
    names = list(OBJECT_COLORS)
    palette = np.asarray([OBJECT_COLORS[n] for n in names], np.float32)  # (K, 3)
    nearest = np.linalg.norm(x[..., None, :] - palette, axis=-1).argmin(axis=-1)  # (F, H, W)
    area = (far & (nearest == names.index(color))).sum(axis=(1, 2))
    return area >= VISIBLE_MIN_SHARE * frames.shape[1] * frames.shape[2]


def mask_centroids(masks: np.ndarray) -> np.ndarray:
    """(F, H, W) or (F, H, W, 3) silhouette frames (white on black) -> (F, 2) wrap-aware centroids (x, y) of
    their white pixels (> 127); nan where a frame has none."""
    masks = masks if masks.ndim == 3 else masks.max(axis=-1)
    out = np.full((len(masks), 2), np.nan)
    for i, m in enumerate(masks > 127):
        if m.any():
            out[i] = circular_centroid(m)
    return out


def path_error(frames: np.ndarray, masks: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """(F,) distance in pixels (wrap-aware) from the object's centroid in each frame to its silhouette's
    (the pose path's) centroid; inf where the frame has no object. frames and masks at one size."""
    track = object_track(frames, background)
    want = mask_centroids(masks)
    d = np.hypot(*wrap_delta(track.centroids, want, track.size).T)
    return np.where(np.isnan(d), np.inf, d)


def identity(frames: np.ndarray, reference: np.ndarray, background: tuple[int, int, int]) -> dict:
    """How well a clip keeps the look of its reference image (one coloured object on `background`), frame
    by frame: the object's mean colour distance (RGB) and its area ratio against the reference's object.
    frames (F, H, W, 3), reference (H, W, 3) uint8 at the same size.
    Returns the medians and the worst decile of both over the clip, and the share of frames with an
    object at all."""
    ref = object_track(reference[None], background)
    track = object_track(frames, background)
    seen = ~np.isnan(track.centroids[:, 0])
    colour = np.linalg.norm(track.colors[seen] - ref.colors[0], axis=-1)
    size = track.areas[seen] / max(ref.areas[0], 1.0)
    if not seen.any():
        return {"present": 0.0, "colour_distance": float("inf"), "colour_distance_p90": float("inf"),
                "size_ratio": 0.0, "size_ratio_p10": 0.0, "size_ratio_p90": 0.0}
    return {"present": float(seen.mean()), "colour_distance": float(np.median(colour)),
            "colour_distance_p90": float(np.percentile(colour, 90)), "size_ratio": float(np.median(size)),
            "size_ratio_p10": float(np.percentile(size, 10)), "size_ratio_p90": float(np.percentile(size, 90))}


def frame_change(frames: np.ndarray) -> np.ndarray:
    """(F - 1,) mean absolute pixel change from each frame to the next."""
    return np.abs(np.diff(frames.astype(float), axis=0)).mean(axis=(1, 2, 3))


def junction_ratio(x: np.ndarray, y: np.ndarray, new: np.ndarray) -> float:
    """The change across a junction (frames x and y either side of it) over the median frame-to-frame change
    of `new`, the frames made there (issue 15's bound: at most 1.3)."""
    return float(np.abs(x.astype(float) - y.astype(float)).mean() / np.median(frame_change(new)))
