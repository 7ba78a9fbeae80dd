"""The bundled model's motion plan: a prompt's shape and motion words drawn as a silhouette path.

The bundled model alone takes colours, shapes and backgrounds from a prompt, but its 16x16 frames move the
object where the noise takes it more than where the words say (motion accuracy 0.38 on the eval, no better
than chance for some motions). Its control branch (controlnet/, trained for `--pose` silhouettes) makes the
object follow a silhouette closely. A plan joins the two, as layout-guided video models do (the prompt is
first turned into where the object is in every frame, then the video model draws it there): for a request
made from text alone whose every prompt names a shape (ball, square, triangle) and a motion (left, right,
up, down, bouncing, still), `plan` draws that shape, white on black, along a path that moves as the words
say, and the job runs with it as its control frames, exactly as with a pose (`control_scale` applies).

The path: a start drawn from the request's seed (a bounce's floor is at 0.78 of the height); per
frame a velocity, mixed between timeline keys with the engine's own prompt schedule (so a timeline from
"moving right" to "moving up" turns where the prompts blend), at the training clips' speed (0.85-1.05 of
the shorter side / 16 per frame at 8 fps, the same per second at other fps), wrapping around the edges as
the training clips do; a bounce is a vertical |sin| hop of 0.35-0.5 of the height every 10-16 frames (at
8 fps, starting at a random point of its hop; a loop at its top), weighted by the share of bouncing in the
frame's prompt. In a loop the path closes: each axis's
total displacement is scaled to a whole number of crossings (at least one where there is motion) and the
bounce period to a whole number of hops in the clip. Radius 0.17-0.21 of the shorter side (the training
clips' objects). The same request and seed give the same silhouettes.

Around known frames (an image, keyframes, the contexts of extend and lead_into: `anchored`) the plan starts
from what they show instead: each known frame's silhouette is its own object (the pixels far from the
frame's median colour), and the new frames move that silhouette from the last known object, at the
prompt's motion or, where the prompt names none, at the known frames' own velocity, landing on the next
known frame's object (a bridge, whose object turns from the first clip's heading to the second's at a
speed between theirs). So an extended clip goes on moving as it moved, and a bridge travels from one
clip's object to the other's.

The engine asks for a plan (`plan="auto"`, the default) only for a model whose longtake.json says
"planner": "shapes" (the bundled model), without a pose, and not for a video redrawn below strength 1 (its
frames say where things are; at strength 1 it sets the length alone). There is no plan (the model moves
the object itself) for text whose prompts lack a shape or a motion word, around known frames that show no
object or with nothing to say where it goes (one image, no motion word), or for a loop with known frames.
`plan="none"` renders without it.

numpy, the prompt schedule and quality's object measures; no Ray.
"""

from __future__ import annotations

import math

import numpy as np

from longtake.models.shapes import (BOUNCE_HEIGHT, BOUNCE_PERIOD, DIRECTIONS, FLOOR, MOTIONS, RADIUS, SHAPES,
                                    SPEED, coverage)
from longtake.core.windows import PromptKey, prompt_schedule
from longtake.quality import FAR, MIN_AREA, circular_centroid, wrap_delta
from longtake.request import RequestError

PLANNERS = ("shapes",)  # longtake.json "planner": the words this module reads
PLAN_FPS = 8.0  # the frame rate at which the planned speed equals the training clips' per-frame speed
# the training clips' numbers (shapes.py), taken on the shorter side (speed, radius) or the height (bounce)


def _pace(seed: int, fps: float, width: int, height: int) -> tuple[np.random.Generator, float, float, float]:
    """The seed's generator and, drawn from it in this order, a plan's speed (pixels per frame), bounce
    period (frames per hop) and hop height (pixels): the training clips' per second at any fps."""
    rng = np.random.default_rng(seed)
    speed = rng.uniform(*SPEED) * min(width, height) / 16 * PLAN_FPS / fps
    period = rng.uniform(*BOUNCE_PERIOD) * fps / PLAN_FPS
    hop = rng.uniform(*BOUNCE_HEIGHT) * height
    return rng, speed, period, hop


def words(prompt: str) -> tuple[str | None, str | None]:
    """The first shape word and the first motion word of a prompt (None where it has none)."""
    found = prompt.lower().replace(",", " ").replace(".", " ").split()
    return next((w for w in found if w in SHAPES), None), next((w for w in found if w in MOTIONS), None)


def plan_path(motions: list[str], keys: list[PromptKey], frames: int, fps: float, width: int, height: int,
              seed: int, loop: bool = False) -> np.ndarray:
    """(frames, 2) object centres (x, y) in pixels for prompt keys whose motions are `motions` (one per key)."""
    rng, speed, period, hop = _pace(seed, fps, width, height)
    # where in its hop a bounce starts: anywhere, as in the training clips; a loop at the top of a hop, so
    # that its wrap is where it moves least (a |sin| hop moves ~1.5x its median step at the floor)
    phase = 0.5 if loop else rng.uniform(0, 1)
    if motions[0] == "bouncing":
        start = np.array([rng.uniform(0.25, 0.75) * width, FLOOR * height])
    else:
        start = rng.uniform(0.2, 0.8, 2) * np.array([width, height])
    a, b, alpha = (t.numpy() for t in prompt_schedule(keys, frames, fps, loop))
    alpha = alpha[:, None]  # (F, 1)
    direction = np.array([DIRECTIONS.get(m, (0, 0)) for m in motions], dtype=np.float64)  # (K, 2)
    velocity = ((1 - alpha) * direction[a] + alpha * direction[b]) * speed  # (F, 2): frame f -> f + 1
    bouncing = np.array([m == "bouncing" for m in motions], dtype=np.float64)  # (K,)
    bounce = (1 - alpha[:, 0]) * bouncing[a] + alpha[:, 0] * bouncing[b]  # (F,)
    if loop:  # whole crossings per axis, whole hops per clip: the last frame leads into the first
        for axis, side in ((0, width), (1, height)):
            total = velocity[:, axis].sum()
            if abs(total) > 1e-9:
                velocity[:, axis] *= math.copysign(max(1, round(abs(total) / side)) * side, total) / total
        period = frames / max(1, round(frames / period))
    centres = start + np.concatenate([np.zeros((1, 2)), np.cumsum(velocity[:-1], axis=0)])
    centres[:, 1] -= bounce * hop * np.abs(np.sin(np.pi * (np.arange(frames) / period + phase)))
    return centres % np.array([width, height])


def check(name: str, model: str) -> None:
    """A model's longtake.json planner is one this module draws: RequestError naming `model` otherwise."""
    if name not in PLANNERS:
        raise RequestError("model", model, f"a longtake.json planner of {', '.join(PLANNERS)}; it says {name!r}")


def plannable(keys: list[PromptKey], loop: bool, anchored: bool) -> bool:
    """Whether `plan` can make a plan, from the words alone: every key names a shape and a motion; around
    known frames (not in a loop), maybe (`anchored` decides from their pixels)."""
    if anchored:
        return not loop
    return all(None not in words(k.prompt) for k in keys)


def plan(keys: list[PromptKey], frames: int, fps: float, width: int, height: int, seed: int,
         loop: bool = False, anchors: tuple[tuple[int, np.ndarray], ...] = ()) -> np.ndarray | None:
    """The control frames of a plan, (frames, height, width, 3) uint8 silhouettes (white on black), or None
    where there is none to make (the model then moves the object itself). From text alone (no `anchors`):
    every prompt key must name a shape and a motion. With anchors (known frames: (first frame, (n, H, W, 3)
    pixels) runs), see `anchored`."""
    if not plannable(keys, loop, bool(anchors)):
        return None
    if anchors:
        return anchored(keys, frames, fps, width, height, seed, anchors)
    shapes, motions = zip(*(words(k.prompt) for k in keys))
    centres = plan_path(list(motions), keys, frames, fps, width, height, seed, loop)
    radius = np.random.default_rng([seed, 1]).uniform(*RADIUS) * min(width, height)
    a, b, alpha = (t.numpy() for t in prompt_schedule(keys, frames, fps, loop))
    out = np.empty((frames, height, width, 3), np.uint8)
    for f, (x, y) in enumerate(centres):
        shape = shapes[b[f]] if alpha[f] >= 0.5 else shapes[a[f]]
        out[f] = np.where(coverage(shape, x, y, radius, width, ss=2, height=height) >= 0.5, 255, 0)[..., None]
    return out


def detect(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The object of a known frame (H, W, 3) uint8: its mask (every pixel far from the frame's median colour,
    the background's on these plain scenes) and its wrap-aware centre (x, y); None without one."""
    background = np.median(frame.reshape(-1, 3), axis=0)
    mask = np.linalg.norm(frame.astype(np.float64) - background, axis=-1) > FAR
    if mask.sum() < MIN_AREA:
        return None
    return mask, np.array(circular_centroid(mask))


CONTEXT_STEPS = 4  # a known run's velocity: the mean of its steps nearest the new frames (at most this many)


def _run_velocity(centres: dict[int, np.ndarray], frame: int, way: int, width: int, height: int
                  ) -> np.ndarray | None:
    """The mean velocity of the known frames next to `frame` (itself known), going back (way -1: the run
    that ends there) or forward (+1: the run that starts there); None with fewer than 2 consecutive frames."""
    run = [frame]
    while len(run) <= CONTEXT_STEPS and run[-1] + way in centres:
        run.append(run[-1] + way)
    if len(run) < 2:
        return None
    run.sort()
    pts = np.array([centres[f] for f in run])
    return wrap_delta(pts[:-1], pts[1:], np.array([width, height])).mean(axis=0)


def _turn(v0: np.ndarray, v1: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(n, 2) velocities going from v0 to v1 as u goes from 0 to 1: the speed changes linearly and the
    heading turns along the shorter arc (counter-clockwise for opposite ones), so an object that comes in
    moving right and must leave moving left turns round instead of stopping."""
    speed = (1 - u[:, 0]) * np.linalg.norm(v0) + u[:, 0] * np.linalg.norm(v1)
    a0 = math.atan2(v0[1], v0[0]) if np.linalg.norm(v0) > 1e-9 else math.atan2(v1[1], v1[0])
    a1 = math.atan2(v1[1], v1[0]) if np.linalg.norm(v1) > 1e-9 else a0
    arc = (a1 - a0 + math.pi) % (2 * math.pi) - math.pi  # in [-pi, pi): opposite headings turn by -pi
    heading = a0 + u[:, 0] * arc
    return np.stack([speed * np.cos(heading), speed * np.sin(heading)], axis=1)


def anchored(keys: list[PromptKey], frames: int, fps: float, width: int, height: int, seed: int,
             anchors: tuple[tuple[int, np.ndarray], ...]) -> np.ndarray | None:
    """A plan around known frames (an image, keyframes, the contexts of extend and lead_into). Each known
    frame's silhouette is its own object (`detect`); the new frames between them move that object's
    silhouette (the nearer known frame's, shifted) along a path that leaves the known frame before it and
    reaches the one after it: per frame the velocity of the prompt's motion word (at the plan's speed), or
    where the prompt names none the known frames' own velocity (their last steps before the new frames,
    their first after; blended across a bridge), plus a linear correction that lands the path on the next
    known frame's object. A bounce hops from where the object is. None (no plan) when a known frame shows
    no object, or when new frames have neither a motion word nor a moving context to follow (a single
    image with a prompt that names no motion)."""
    known: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for first, pixels in anchors:
        for i, frame in enumerate(pixels):
            found = detect(frame)
            if found is None:
                return None
            known[first + i] = found
    centres = {f: c for f, (_, c) in known.items()}
    _, speed, period, hop = _pace(seed, fps, width, height)
    motions = [words(k.prompt)[1] for k in keys]
    a, b, alpha = (t.numpy() for t in prompt_schedule(keys, frames, fps))
    out = np.zeros((frames, height, width, 3), np.uint8)
    for f, (mask, _) in known.items():
        out[f] = mask[..., None] * np.uint8(255)
    f = 0
    while f < frames:
        if f in known:
            f += 1
            continue
        s = f
        while f < frames and f not in known:
            f += 1
        e = f  # new frames s .. e - 1; known frame s - 1 before them (if s > 0) and e after them (if e < frames)
        left, right = (s - 1 if s > 0 else None), (e if e < frames else None)
        ends = [_run_velocity(centres, frame, way, width, height) for frame, way in ((left, -1), (right, 1))
                if frame is not None]
        ends = [v for v in ends if v is not None]  # the known runs' velocities next to the new frames
        steps = np.arange(max(s - 1, 0), e)  # velocity of frame g: g -> g + 1
        u = ((steps - steps[0]) / max(1, len(steps) - 1))[:, None]
        context = None if not ends else ends[0] if len(ends) == 1 else _turn(ends[0], ends[1], u)
        velocity = np.zeros((len(steps), 2))
        bounce = np.zeros(len(steps))
        for side, weight in ((a, 1 - alpha), (b, alpha)):
            for k, g in enumerate(steps):
                motion = motions[side[g]]
                if motion is None:
                    if context is None:
                        return None
                    velocity[k] += weight[g] * (context if context.ndim == 1 else context[k])
                else:
                    velocity[k] += weight[g] * np.array(DIRECTIONS.get(motion, (0, 0))) * speed
                    bounce[k] += weight[g] * (motion == "bouncing")
        if left is not None:  # forward from the known frame before; p(g) for g = s - 1 .. e
            path = centres[left] + np.concatenate([np.zeros((1, 2)), np.cumsum(velocity, axis=0)])
            frames_of = np.arange(s - 1, e + 1)
        else:  # backward from the known frame after; p(g) for g = 0 .. e
            path = centres[right] - np.concatenate([np.cumsum(velocity[::-1], axis=0)[::-1], np.zeros((1, 2))])
            frames_of = np.arange(0, e + 1)
        origin = frames_of[0] if left is not None else frames_of[-1]
        hops = np.concatenate([bounce, bounce[-1:]]) * hop * np.abs(np.sin(np.pi * (frames_of - origin) / period))
        path[:, 1] -= hops
        if left is not None and right is not None:  # land on the known frame after
            miss = wrap_delta(path[-1], centres[right], np.array([width, height]))
            path += miss * ((frames_of - frames_of[0]) / (frames_of[-1] - frames_of[0]))[:, None]
        for g, p in zip(frames_of, path):
            if not s <= g < e:
                continue
            source = left if left is not None and (right is None or g - left <= right - g) else right
            mask, centre = known[source]
            dx, dy = np.round(wrap_delta(centre, p, np.array([width, height]))).astype(int)
            out[g] = np.roll(mask, (dy, dx), axis=(0, 1))[..., None] * np.uint8(255)
    return out
