"""Pose input for pose-driven animation (issue 19, parts 1 and 2): a pose sequence as skeleton frames.

A pose sequence is either a video of skeleton frames (as OpenPose or DWPose tools draw them), read at the
job's fps and size like any input video, or a JSON file of per-frame keypoints in the OpenPose format,
which is drawn here into skeleton frames at the output size with the standard colours (those of the
OpenPose ControlNet annotator, so a ControlNet trained on OpenPose images sees what it was trained on):

    {"fps": 30, "width": 1080, "height": 1920,          # the keypoints' canvas (or coordinates in 0..1)
     "frames": [{"people": [{"pose_keypoints_2d": [x, y, c, ...],        # BODY_25 (25 points) or COCO-18
                             "hand_left_keypoints_2d": [...],            # optional, 21 points
                             "hand_right_keypoints_2d": [...],           # optional, 21 points
                             "face_keypoints_2d": [...]}]},              # optional, 70 points
                ...]}

(a plain list of frames is taken too, with `canvas_width` / `canvas_height` on a frame, as OpenPose
writes them). BODY_25 is drawn as COCO-18 (its mid-hip and feet dropped), as the annotator does. A point
whose confidence is 0 is missing and not drawn; a frame with nobody in it repeats the previous frame's
pose (a detector's dropout), but the first frame must have someone. The canvas is fitted to the output
like images and videos (scaled to cover, centre-cropped). Frames are resampled to the job's fps (each
output frame takes the pose at or before its time); a sequence shorter than the clip is an error unless
`loop` (then it repeats).

Retargeting (`retarget`): the driving skeleton is scaled and moved so that its first frame's body height
and position match a reference pose (the figure in the reference photo): every point p of every frame
becomes (p - anchor_drive) * s + anchor_ref, with s = height_ref / height_drive. Height: from the neck to
the lower ankle (else the confident points' vertical extent); anchor: the mid-hip (else the centre of
the confident points).

Extraction (`--pose-from VIDEO`, the CLI): a pose estimator run once on the video's frames at the job's fps
writes the keypoints as such a JSON file (OUT.pose.json, then used as `pose`), and on the reference photo
(OUT.reference-pose.json, for retargeting). The estimator is an optional extra (`pip install
'longtake[pose]'`: rtmlib's RTMPose on onnxruntime, keypoints in COCO-18 order, below its 0.3 threshold
missing), or your own `module:factory`. rtmlib downloads its weights at first use; where it cannot, the
request fails naming `pose_from` and saying why.

Plain numpy and PIL: no torch, no Ray.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from longtake.core.frames import Indexed
from longtake.request import RequestError

# COCO-18 order: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip, r-knee,
# r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
STICK, POINT, HAND_LINE, HAND_POINT, FACE_POINT = 4, 4, 2, 4, 3  # pixels at the annotator's 512 px scale
LIMB_SHADE = 0.6  # limbs are drawn at 60 % of their colour, points at full
NECK, R_HIP, L_HIP, R_ANKLE, L_ANKLE = 1, 8, 11, 10, 13
PARTS = {"hand_left_keypoints_2d": 21, "hand_right_keypoints_2d": 21, "face_keypoints_2d": 70}


@dataclass(frozen=True)
class Person:
    """One figure: (18, 3) COCO-18 body points (x, y, confidence), optional (21, 3) hands, (70, 3) face,
    in pixels of the canvas they are drawn on."""

    body: np.ndarray
    hands: tuple[np.ndarray, ...] = ()
    face: np.ndarray | None = None

    def points(self) -> list[np.ndarray]:
        return [self.body, *self.hands] + ([self.face] if self.face is not None else [])

    def mapped(self, f) -> "Person":
        """The same person with f applied to every (n, 2) array of coordinates."""
        def move(a):
            out = a.copy()
            out[:, :2] = f(a[:, :2])
            return out
        return Person(move(self.body), tuple(move(h) for h in self.hands),
                      None if self.face is None else move(self.face))


@dataclass(frozen=True)
class PoseSequence:
    frames: list[list[Person]]  # people per source frame
    fps: float | None = None  # the source's frame rate (None: one pose per output frame)
    size: tuple[int, int] | None = None  # (width, height) of the keypoints' canvas; None: coordinates in 0..1
    path: str = ""
    extra: dict = field(default_factory=dict)


def _points(name: str, where: str, values, count: int | tuple[int, ...]) -> np.ndarray:
    """A flat [x, y, c, ...] list -> (n, 3) float array, checked."""
    counts = (count,) if isinstance(count, int) else count
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise RequestError(name, where, "a list of numbers [x, y, confidence, ...]")
    if len(values) % 3 or len(values) // 3 not in counts:
        raise RequestError(name, where, f"{' or '.join(f'{c * 3} numbers ({c} points)' for c in counts)}, got "
                                        f"{len(values)}")
    a = np.asarray(values, np.float64).reshape(-1, 3)
    if not np.isfinite(a).all():
        raise RequestError(name, where, "finite coordinates and confidences (no NaN or infinity)")
    return a


def _person(name: str, where: str, data) -> Person | None:
    if not isinstance(data, dict):
        raise RequestError(name, where, "an object with pose_keypoints_2d")
    body = _points(name, f"{where}.pose_keypoints_2d", data.get("pose_keypoints_2d"), (18, 25))
    if len(body) == 25:
        body = body[list(BODY25_TO_COCO18)]
    hands, face = [], None
    for key, count in PARTS.items():
        values = data.get(key)
        if values:  # absent or empty: not detected
            points = _points(name, f"{where}.{key}", values, count)
            if key == "face_keypoints_2d":
                face = points
            else:
                hands.append(points)
    if not (body[:, 2] > 0).any():
        return None  # nobody there
    return Person(body, tuple(hands), face)


def load_keypoints(name: str, path: str) -> PoseSequence:
    """Read an OpenPose-format keypoint JSON file (module docstring). RequestError names `name`."""
    p = Path(path)
    if not p.is_file():
        raise RequestError(name, path, "an existing pose video or keypoint JSON file")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(name, path, f"valid JSON ({str(e).splitlines()[0]})") from None
    meta = {}
    if isinstance(data, dict):
        meta, data = data, data.get("frames")
    if not isinstance(data, list) or not data:
        raise RequestError(name, path, "a non-empty list of frames ({\"frames\": [{\"people\": [...]}, ...]})")
    first = data[0] if isinstance(data[0], dict) else {}
    width = meta.get("width", first.get("canvas_width"))
    height = meta.get("height", first.get("canvas_height"))
    fps = meta.get("fps")
    for key, value in (("width", width), ("height", height), ("fps", fps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not
                                  math.isfinite(value) or value <= 0):
            raise RequestError(f"{name}.{key}", value, "a positive number")
    frames: list[list[Person]] = []
    for i, frame in enumerate(data):
        people = frame.get("people") if isinstance(frame, dict) else None
        if not isinstance(people, list):
            raise RequestError(name, f"{path}: frames[{i}]", "an object with a list 'people'")
        persons = [x for j, d in enumerate(people) if (x := _person(name, f"{path}: frames[{i}].people[{j}]", d))]
        if not persons:
            if not frames:
                raise RequestError(name, f"{path}: frames[{i}]", "someone in the first frame (a pose with a "
                                                                 "confident point)")
            persons = frames[-1]  # a dropout: hold the last pose
        frames.append(persons)
    size = (width, height) if width and height else None
    if size is None:
        top = max(float(np.abs(q[:, :2]).max()) for ps in frames for x in ps for q in x.points())
        if top > 1.0:
            raise RequestError(name, path, "the keypoints' canvas (\"width\" and \"height\"), or coordinates in 0..1")
    return PoseSequence(frames, fps, size, str(path))


def fit(sequence: PoseSequence, width: int, height: int) -> PoseSequence:
    """The sequence in pixels of a width x height output: normalised coordinates scaled; a canvas scaled
    to cover the output and centre-cropped (as images and videos are)."""
    if sequence.size is None:
        scale, dx, dy = np.array([width, height], np.float64), 0.0, 0.0
    else:
        sw, sh = sequence.size
        s = max(width / sw, height / sh)
        scale, dx, dy = s, (sw * s - width) / 2, (sh * s - height) / 2
    shift = np.array([dx, dy])
    frames = [[x.mapped(lambda xy: xy * scale - shift) for x in people] for people in sequence.frames]
    return replace(sequence, frames=frames, size=(width, height))


def _extent(person: Person) -> tuple[float, np.ndarray]:
    """(body height, anchor) of a person (module docstring)."""
    body = person.body
    ok = body[:, 2] > 0
    if not ok.any():
        raise RequestError("pose", "no confident point", "a pose with at least one confident body point")
    ankles = [body[i, 1] for i in (R_ANKLE, L_ANKLE) if ok[i]]
    if ok[NECK] and ankles:
        tall = max(ankles) - body[NECK, 1]
    else:
        tall = body[ok, 1].max() - body[ok, 1].min()
    if ok[R_HIP] and ok[L_HIP]:
        anchor = (body[R_HIP, :2] + body[L_HIP, :2]) / 2
    else:
        anchor = (body[ok, :2].min(0) + body[ok, :2].max(0)) / 2
    return float(tall), anchor


def retarget(sequence: PoseSequence, reference: Person) -> PoseSequence:
    """The sequence moved onto `reference` (same canvas): scaled by the ratio of body heights and moved so
    that its first frame's anchor lands on the reference's (module docstring)."""
    drive_tall, drive_anchor = _extent(sequence.frames[0][0])
    ref_tall, ref_anchor = _extent(reference)
    if drive_tall <= 0 or ref_tall <= 0:
        raise RequestError("retarget", "reference", "poses with a body height (a neck and an ankle, or points at "
                                                    "different heights) to scale by")
    s = ref_tall / drive_tall
    frames = [[x.mapped(lambda xy: (xy - drive_anchor) * s + ref_anchor) for x in people]
              for people in sequence.frames]
    return replace(sequence, frames=frames)


def _limb(draw: ImageDraw.ImageDraw, a: np.ndarray, b: np.ndarray, width: float, colour) -> None:
    """A limb as the annotator draws it: a filled ellipse from a to b, `width` half-thick."""
    centre, d = (a + b) / 2, b - a
    length, angle = float(np.hypot(*d)) / 2, math.atan2(d[1], d[0])
    t = np.linspace(0, 2 * math.pi, 36, endpoint=False)
    x, y = length * np.cos(t), width * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    polygon = [(float(centre[0] + c * u - s * v), float(centre[1] + s * u + c * v)) for u, v in zip(x, y)]
    draw.polygon(polygon, fill=colour)


def _dot(draw: ImageDraw.ImageDraw, p: np.ndarray, r: float, colour) -> None:
    draw.ellipse([float(p[0] - r), float(p[1] - r), float(p[0] + r), float(p[1] + r)], fill=colour)


def _hand_colour(e: int) -> tuple[int, int, int]:
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(e / len(HAND_EDGES), 1.0, 1.0))


# every colour `draw` uses, black (the background) first: skeleton frames index this palette exactly
PALETTE_COLOURS = tuple(dict.fromkeys(
    [(0, 0, 0)] + [tuple(int(c * LIMB_SHADE) for c in COLOURS[i]) for i in range(len(LIMBS))] + list(COLOURS)
    + [_hand_colour(e) for e in range(len(HAND_EDGES))] + [(0, 0, 255), (255, 255, 255)]))
PALETTE = np.array(PALETTE_COLOURS, np.uint8)
_INDEX = {c: i for i, c in enumerate(PALETTE_COLOURS)}


def draw(people: list[Person], width: int, height: int, indexed: bool = False) -> np.ndarray:
    """One skeleton frame, (height, width, 3) uint8, black background: limbs, then body points, then hands
    and face, in the annotator's colours; sizes scale with the frame (the annotator's at 512 px).
    `indexed`: the same frame as (height, width) indices into PALETTE (drawn as a palette image: PIL fills
    the same pixels whatever the mode, without anti-aliasing)."""
    image = Image.new("P" if indexed else "RGB", (width, height))
    pen = ImageDraw.Draw(image)
    fill = (lambda rgb: _INDEX[rgb]) if indexed else (lambda rgb: rgb)
    k = min(width, height) / 512
    for person in people:
        body = person.body
        for i, (a, b) in enumerate(LIMBS):
            if body[a, 2] > 0 and body[b, 2] > 0:
                _limb(pen, body[a, :2], body[b, :2], max(1.0, STICK * k),
                      fill(tuple(int(c * LIMB_SHADE) for c in COLOURS[i])))
        for i in range(18):
            if body[i, 2] > 0:
                _dot(pen, body[i, :2], max(1.0, POINT * k), fill(COLOURS[i]))
        for hand in person.hands:
            for e, (a, b) in enumerate(HAND_EDGES):
                if hand[a, 2] > 0 and hand[b, 2] > 0:
                    pen.line([tuple(map(float, hand[a, :2])), tuple(map(float, hand[b, :2]))],
                             fill=fill(_hand_colour(e)), width=max(1, round(HAND_LINE * k)))
            for p in hand[hand[:, 2] > 0]:
                _dot(pen, p[:2], max(1.0, HAND_POINT * k), fill((0, 0, 255)))
        if person.face is not None:
            for p in person.face[person.face[:, 2] > 0]:
                _dot(pen, p[:2], max(1.0, FACE_POINT * k), fill((255, 255, 255)))
    return np.asarray(image, np.uint8)


def _schedule(name: str, source_frames: int, source_fps: float | None, frames: int, fps: float, loop: bool,
              where: str) -> list[int]:
    """Which source frame each of `frames` output frames takes (the one at or before its time)."""
    if source_fps is None:  # one pose per output frame
        index = list(range(frames))
        have = f"{source_frames} frames"
    else:
        index = [math.floor(i * source_fps / fps + 1e-9) for i in range(frames)]
        have = f"{source_frames / source_fps:g} s ({source_frames} frames at {source_fps:g} fps)"
    if index and index[-1] >= source_frames and not loop:
        raise RequestError(name, where, f"a pose sequence as long as the clip ({frames / fps:g} s at {fps:g} fps), "
                                        f"or pose_loop; it has {have}")
    return [i % source_frames for i in index]


def reference_person(name: str, path: str, width: int, height: int) -> Person:
    """The first figure of a keypoint JSON file's first frame, on a width x height output canvas."""
    return fit(load_keypoints(name, path), width, height).frames[0][0]


def pose_frames(name: str, path: str, frames: int, fps: float, width: int, height: int, loop: bool = False,
                reference: Person | None = None, pixels: bool = True) -> np.ndarray | Indexed | None:
    """A pose video or keypoint JSON file as `frames` skeleton frames at `fps`, (frames, height, width, 3)
    uint8: a video's as read, a keypoint file's drawn as `Indexed` frames (PALETTE indices, a third of the
    bytes, exactly the RGB drawing: core/frames.py). With `reference` (a person on the output canvas), a
    keypoint sequence is retargeted onto it (a pose video cannot be: its skeletons are pixels).
    `pixels=False`: the same checks, nothing drawn or decoded (a video's length from its packets), None."""
    if Path(path).suffix.lower() == ".json":
        sequence = fit(load_keypoints(name, path), width, height)
        if reference is not None:
            sequence = retarget(sequence, reference)
        index = _schedule(name, len(sequence.frames), sequence.fps, frames, fps, loop, path)
        if not pixels:
            return None
        drawn: dict[int, np.ndarray] = {}
        out = np.empty((frames, height, width), np.uint8)
        for i, j in enumerate(index):
            if j not in drawn:
                drawn[j] = draw(sequence.frames[j], width, height, indexed=True)
            out[i] = drawn[j]
        return Indexed(out, PALETTE)
    from longtake.media import head_frames

    if reference is not None:
        raise RequestError("retarget", "reference", "a keypoint JSON pose to retarget (a pose video's skeletons are "
                                                    "pixels): give --retarget none, or keypoints")
    if not pixels:
        from longtake.media import frames_at

        _schedule(name, frames_at(name, path, fps), None, frames, fps, loop, path)
        return None
    read = head_frames(name, path, fps, width, height, frames)
    index = _schedule(name, len(read), None, frames, fps, loop, path)
    return np.stack([read[j] for j in index])


# --- pose extraction (--pose-from): an optional estimator, run once before the render -------------------------
ESTIMATOR_EXTRA = "pip install 'longtake[pose]'"  # rtmlib and onnxruntime (pyproject.toml)
EXTRACT_SIDE = 640  # frames go to the estimator with their longer side at most this (aspect kept)
RTMLIB_THRESHOLD = 0.3  # rtmlib's own keypoint threshold when it draws skeletons


class EstimatorUnavailable(Exception):
    """The estimator cannot run here (not installed, or its weights cannot be had): the reason, for the user."""


def _rtmlib():
    """rtmlib's RTMPose body estimator (ONNX, CPU), its keypoints in OpenPose's COCO-18 order. rtmlib downloads
    its ONNX weights into ~/.cache at first use: offline, that fails, and so does this, saying so."""
    try:
        from rtmlib import Body
    except ImportError as e:
        raise EstimatorUnavailable(f"rtmlib is not installed ({e}); {ESTIMATOR_EXTRA}") from None
    try:
        body = Body(mode="balanced", to_openpose=True, backend="onnxruntime", device="cpu")
    except Exception as e:  # a download that cannot happen (no network), a missing runtime...
        raise EstimatorUnavailable(f"rtmlib's weights could not be loaded ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}); rtmlib downloads them at first use, "
                                   f"so run it once where the network is reachable (they stay in ~/.cache), or give "
                                   f"--pose keypoints.json") from None

    def estimate(frame: np.ndarray) -> list[np.ndarray]:
        keypoints, scores = body(np.ascontiguousarray(frame[..., ::-1]))  # rtmlib reads BGR (OpenCV)
        scores = np.where(scores >= RTMLIB_THRESHOLD, scores, 0.0)  # below it: missing, as rtmlib draws them
        return [np.concatenate([k, s[:, None]], axis=1) for k, s in zip(keypoints, scores)]

    return estimate


ESTIMATORS = {"rtmlib": _rtmlib}  # name -> factory() -> estimate(frame (H, W, 3) RGB uint8) -> [(18, 3) x, y, c]


def load_estimator(name: str, video: str):
    """The estimate function of a named estimator (ESTIMATORS), or of `module:factory` (your own: a factory
    returning frame -> list of (18, 3) COCO-18 arrays in pixels). RequestError naming pose_estimator (an
    unknown name) or pose_from (`video`: an estimator that cannot run here, and why)."""
    import importlib

    try:
        if name in ESTIMATORS:
            return ESTIMATORS[name]()
        module, sep, attr = name.partition(":")
        if not sep:
            raise RequestError("pose_estimator", name, f"one of {', '.join(ESTIMATORS)}, or module:factory")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise RequestError("pose_estimator", name, f"an importable module:factory ({e})") from None
        return factory()
    except EstimatorUnavailable as e:
        raise RequestError("pose_from", video, f"a pose estimator that can run here, but {name}: {e}") from None


def extract_poses(video: str, fps: float, estimator, out: str, frames: int | None = None) -> str:
    """Run `estimator` on every frame of `video` read at `fps` (the longer side at most EXTRACT_SIDE), and
    write the poses as an OpenPose keypoint JSON file at `out` (COCO-18, the people the estimator found; a
    frame with nobody is kept empty, and the reader holds the previous pose there). Stops after `frames`
    frames when given. Returns `out`. RequestError naming pose_from: unreadable video, a bad estimate, or
    nobody found in the first frame."""
    from longtake.media import probe_media, video_chunks

    info = probe_media("pose_from", video)
    if info["kind"] != "video":
        raise RequestError("pose_from", video, "a video of a person moving (not an image)")
    scale = min(1.0, EXTRACT_SIDE / max(info["width"], info["height"]))
    width, height = (max(2, round(info[k] * scale / 2) * 2) for k in ("width", "height"))
    out_frames = []
    for chunk in video_chunks("pose_from", video, fps, width, height):
        for frame in chunk:
            people = []
            for person in estimator(frame):
                a = np.asarray(person, np.float64)
                if a.shape != (18, 3) or not np.isfinite(a).all():
                    raise RequestError("pose_from", video, f"an estimator giving (18, 3) finite COCO-18 keypoints "
                                                           f"per person, got shape {a.shape}")
                people.append({"pose_keypoints_2d": [round(float(v), 3) for v in a.reshape(-1)]})
            out_frames.append({"people": people})
            if frames is not None and len(out_frames) >= frames:
                break
        if frames is not None and len(out_frames) >= frames:
            break
    if not out_frames or not out_frames[0]["people"]:
        raise RequestError("pose_from", video, "a video whose first frame shows a person (the estimator found "
                                               "nobody)")
    Path(out).write_text(json.dumps({"fps": fps, "width": width, "height": height, "frames": out_frames}))
    return out


def extract_reference_pose(image: str, estimator, out: str) -> str:
    """The estimator on a reference photo (as read, its own size): the first person found, written as a
    one-frame keypoint JSON file at `out` (for retargeting). RequestError naming reference when nobody is
    found (give --retarget none, or --reference-pose)."""
    from longtake.media import load_image, probe_media

    info = probe_media("reference", image)
    if info["kind"] != "image":
        raise RequestError("reference", image, "an image file (PNG, JPEG, WebP...), not a video")
    frame = load_image("reference", image, info["width"], info["height"])
    people = [np.asarray(p, np.float64) for p in estimator(frame)]
    people = [p for p in people if p.shape == (18, 3) and np.isfinite(p).all() and (p[:, 2] > 0).any()]
    if not people:
        raise RequestError("reference", image, "a photo in which the pose estimator finds a person (to retarget "
                                               "the pose onto), or --retarget none, or --reference-pose")
    Path(out).write_text(json.dumps({"width": info["width"], "height": info["height"], "frames": [
        {"people": [{"pose_keypoints_2d": [round(float(v), 3) for v in people[0].reshape(-1)]}]}]}))
    return out
