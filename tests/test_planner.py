"""The bundled model's motion plan (models/planner.py): prompt words -> a silhouette path that moves as they say,
measured with the eval's own motion classifier; loops close; timelines turn; the engine asks for it only for
requests from text alone, and the checkpoint fingerprint tells planned and unplanned jobs apart."""

from __future__ import annotations

import numpy as np
import pytest

from longtake.models.planner import anchored, plan, plan_path, words
from longtake.models.shapes import MOTIONS, ClipSpec, render_path
from longtake.core.windows import PromptKey
from longtake.quality import Track, classify_motion, object_track, steps, wrap_delta
from longtake.request import RequestError


def _track(centres: np.ndarray, size: int = 64) -> Track:
    n = len(centres)
    return Track(centres, np.full(n, 100.0), np.zeros((n, 3)), size)


def test_words_are_the_first_shape_and_motion():
    assert words("A red ball moving left, on a blue background") == ("ball", "left")
    assert words("a square bouncing and still") == ("square", "bouncing")
    assert words("a red ball on a blue background") == ("ball", None) and words("moving up") == (None, "up")
    key = [PromptKey(0.0, "a red ball on a blue background")]
    assert plan(key, 16, 8, 64, 64, seed=0) is None  # from text alone: a shape and a motion, or no plan


@pytest.mark.parametrize("motion", MOTIONS)
def test_the_path_moves_as_the_word_says(motion):
    """The eval's classifier reads each motion back from the planned centres, over several seeds, at the
    training speed (0.85-1.05 of a 16th of the frame per frame at 8 fps; the same per second at 24 fps)."""
    for seed in range(4):
        for fps in (8.0, 24.0):
            frames = int(4 * fps)
            centres = plan_path([motion], [PromptKey(0.0, "x")], frames, fps, 64, 64, seed)
            assert centres.shape == (frames, 2) and ((0 <= centres) & (centres < 64)).all()
            if fps == 8.0:  # the classifier's thresholds are per frame at the eval's 8 fps
                assert classify_motion(_track(centres)) == motion, (seed, fps)
            speed = np.linalg.norm(steps(_track(centres)), axis=1)
            if motion in ("left", "right", "up", "down"):
                assert (np.abs(speed * fps / 8 - 4 * np.mean([0.85, 1.05])) <= 0.5).all()
            if motion == "still":
                assert (speed == 0).all()


def test_the_same_seed_plans_the_same_path():
    key = [PromptKey(0.0, "a ball moving right")]
    a = plan(key, 24, 8, 64, 64, seed=5)
    assert np.array_equal(a, plan(key, 24, 8, 64, 64, seed=5))
    assert not np.array_equal(a, plan(key, 24, 8, 64, 64, seed=6))


@pytest.mark.parametrize("motion", ["right", "up", "bouncing"])
def test_a_loops_path_closes(motion):
    """In a loop the last frame steps into the first like any other pair: whole crossings, whole hops."""
    for frames in (21, 40, 64):
        centres = plan_path([motion], [PromptKey(0.0, "x")], frames, 8, 64, 64, seed=frames, loop=True)
        closing = np.linalg.norm(wrap_delta(centres[-1], centres[0], 64))
        inner = np.linalg.norm(steps(_track(centres)), axis=1)
        assert inner.min() - 1e-6 <= closing <= inner.max() + 1e-6, (frames, closing, inner)
        if motion == "bouncing":  # a loop's hop starts at its top: the wrap mirrors the first step
            assert abs(closing - inner[0]) < 1e-6 and closing < np.median(inner)
        else:  # constant speed, a whole number of crossings
            crossed = (frames * closing) % 64  # the path's length in frame widths: a whole number
            assert np.allclose(inner, closing) and (crossed < 1e-6 or 64 - crossed < 1e-6), (frames, closing)


def test_a_timeline_turns_where_its_prompts_blend():
    keys = [PromptKey(0.0, "a ball moving right"), PromptKey(4.0, "a ball moving up")]
    centres = plan_path(["right", "up"], keys, 64, 8, 64, 64, seed=1)
    d = steps(_track(centres))
    # the prompts blend linearly from 0 s to 4 s (frame 32): right at first, turning, then up (y grows down)
    assert d[0, 1] == 0 and d[0, 0] > 0 and (d[32:, 1] < 0).all() and np.allclose(d[32:, 0], 0)
    assert (np.diff(d[:32, 0]) < 0).all() and (np.diff(d[:32, 1]) < 0).all()  # a smooth turn
    assert np.linalg.norm(d, axis=1).max() <= 1.01 * np.linalg.norm(d[0])  # no jump


def test_silhouettes_follow_the_path_at_any_size():
    """White shapes on black, (F, H, W, 3), wrapping at the edges: their centroid is the planned centre."""
    key = [PromptKey(0.0, "a green ball moving left on a gray background")]  # a ball: its centroid is its centre
    for width, height in ((64, 64), (96, 48)):
        frames = plan(key, 16, 8, width, height, seed=2)
        assert frames.shape == (16, height, width, 3) and frames.dtype == np.uint8
        assert set(np.unique(frames)) == {0, 255}
        centres = plan_path(["left"], key, 16, 8, width, height, seed=2)
        if width == height:  # quality's tracks are for square frames
            track = object_track(frames, (0, 0, 0))
            assert np.abs(wrap_delta(track.centroids, centres, width)).max() < 1.5
        area = (frames[..., 0] > 0).mean(axis=(1, 2))
        assert area.min() > 0.02 and area.max() / area.min() < 1.2  # one shape of one size, never lost


def test_the_engine_plans_text_alone(tmp_path):
    """The bundled model: a plan for text whose prompts name a shape and a motion, none for plan none, words
    it cannot read, or input frames; the plan is in the fingerprint; control_scale needs a pose or a plan."""
    from PIL import Image

    from longtake.cluster.engine import prepare
    from longtake.cluster.checkpoint import fingerprint

    base = dict(prompt="a red ball moving right on a blue background", seconds=2, out=str(tmp_path / "a.mp4"))
    planned = prepare(base)
    assert planned.control is not None and planned.control.shape == (16, 64, 64, 3)
    assert planned.control.nbytes < 16 * 64 * 64 * 2  # held as one channel (core/frames.py), not RGB
    plain = prepare({**base, "plan": "none"})
    assert plain.control is None
    assert fingerprint(planned, "float32", "cpu") != fingerprint(plain, "float32", "cpu")
    assert prepare({**base, "prompt": "a red ball on a blue background"}).control is None
    Image.new("RGB", (64, 64), (30, 50, 160)).save(tmp_path / "empty.png")  # no object to plan from
    assert prepare({**base, "image": str(tmp_path / "empty.png")}).control is None
    Image.fromarray(_moving_ball(1)[0]).save(tmp_path / "start.png")
    image = prepare({**base, "image": str(tmp_path / "start.png")})  # anchored on the image's ball
    assert image.control is not None and (np.asarray(image.control)[0, ..., 0] > 0).sum() > 50
    assert prepare({**base, "image": str(tmp_path / "start.png"), "prompt": "a red ball"}).control is None
    video = tmp_path / "in.mp4"
    from longtake.video import VideoWriter

    with VideoWriter(str(video), 64, 64, 8) as w:
        w.write(_moving_ball(16))
    assert prepare({**base, "video": str(video), "strength": 0.6}).control is None  # the video says where
    assert prepare({**base, "video": str(video), "strength": 1.0}).control is not None  # it sets the length alone
    timeline = prepare({**base, "prompt": None, "seconds": 4, "timeline": [
        {"at": 0, "prompt": "a red ball moving right"}, {"at": 2, "prompt": "a red square still"}]})
    assert timeline.control is not None and timeline.control.shape[0] == 32
    assert prepare({**base, "control_scale": 0.5}).control_scale == 0.5
    for request in ({**base, "prompt": "a red ball"}, {**base, "plan": "none"}):
        with pytest.raises(RequestError) as e:
            prepare({**request, "control_scale": 0.5})
        assert e.value.field == "control_scale" and "no value without pose or a motion plan" in str(e.value)
    with pytest.raises(RequestError) as e:
        prepare({**base, "plan": "always"})
    assert e.value.field == "plan"


@pytest.mark.slow
def test_a_planner_needs_a_known_name_and_a_controlnet(tmp_path, tiny_model, tiny_pose_model):
    import json
    import shutil

    from longtake.cluster.engine import prepare

    for source, planner, text in ((tiny_model, "shapes", "a ControlNet"), (tiny_pose_model, "maps", "planner of")):
        model = tmp_path / f"{planner}-model"
        shutil.copytree(source, model)
        options = json.loads((model / "longtake.json").read_text()) if (model / "longtake.json").is_file() else {}
        (model / "longtake.json").write_text(json.dumps({**options, "planner": planner}))
        with pytest.raises(RequestError) as e:  # before any work: the model's own check, or the planner's name
            prepare({"prompt": "a ball moving right", "model": str(model), "out": str(tmp_path / "o.mp4")})
        assert e.value.field == "model" and text in str(e.value)


def _moving_ball(frames: int, step: float = 4.0, start: float = 10.0) -> np.ndarray:
    """A red ball moving right on blue, `step` pixels a frame, (frames, 64, 64, 3) uint8."""
    path = np.stack([(start + step * np.arange(frames)) % 64, np.full(frames, 30.0)], axis=1)
    return render_path(ClipSpec("red", "ball", "right", "blue"), path, 12, 64, 64)[0]


def _centres(silhouettes: np.ndarray) -> np.ndarray:
    return object_track(np.asarray(silhouettes), (0, 0, 0)).centroids


def test_a_plan_around_known_frames_continues_and_lands():
    """Known frames keep their own object as silhouette; new frames leave the last known object at the prompt's
    motion (or, without a motion word, at the context's own velocity), and a bridge lands on the first known
    frame after it; a single image with no motion word, or a known frame without an object, gives no plan."""
    clip = _moving_ball(40)
    context = ((0, clip[:8]),)
    for prompt, step in (("a ball moving right", (4, 0)), ("a ball on blue", (4, 0)), ("a ball moving up", (0, -4))):
        out = anchored([PromptKey(0.0, prompt)], 24, 8, 64, 64, 1, context)
        assert np.array_equal(out[:8, ..., 0] > 0, np.linalg.norm(clip[:8] - np.median(clip[0].reshape(-1, 3), 0),
                                                                  axis=-1) > 80)
        d = wrap_delta(_centres(out)[:-1], _centres(out)[1:], 64)
        assert np.abs(d[10:] - step).max() < 1.01, (prompt, d[10:])  # the word's direction (speed 3.4-4.2 px)
        assert np.linalg.norm(d[7]) < 5.5  # the first new frame steps on from the last known one
    bridge = anchored([PromptKey(0.0, "a ball on blue")], 30, 8, 64, 64, 1, ((0, clip[:8]), (22, clip[30:38])))
    c = _centres(bridge)
    assert np.linalg.norm(wrap_delta(c[21], c[22], 64)) < 5 and np.linalg.norm(wrap_delta(c[7], c[8], 64)) < 5
    back = _moving_ball(8, step=-4.0, start=50.0)  # a bridge into a ball moving left: it turns round
    turn = anchored([PromptKey(0.0, "a ball on blue")], 48, 8, 64, 64, 1, ((0, clip[:8]), (40, back)))
    speed = np.linalg.norm(wrap_delta(_centres(turn)[:-1], _centres(turn)[1:], 64), axis=1)
    assert speed[7:40].min() > 2.5 and speed[7:40].max() < 5.5, speed  # never stops, never jumps
    assert anchored([PromptKey(0.0, "a ball on blue")], 16, 8, 64, 64, 1, ((0, clip[:1]),)) is None
    one = anchored([PromptKey(0.0, "a ball moving down")], 16, 8, 64, 64, 1, ((0, clip[:1]),))
    assert np.abs(wrap_delta(_centres(one)[0], _centres(one)[5], 64) - (0, 5 * 4)).max() < 5
    blank = np.full((1, 64, 64, 3), (30, 50, 160), np.uint8)
    assert anchored([PromptKey(0.0, "a ball moving down")], 16, 8, 64, 64, 1, ((0, blank),)) is None
    assert plan([PromptKey(0.0, "a ball moving down")], 16, 8, 64, 64, 1, loop=True, anchors=((0, clip[:1]),)) is None


def test_an_extended_timeline_turns_its_plan_where_its_text_turns(tmp_path):
    """An extend's timeline counts in the new frames: the text schedule is shifted by the context frames, and
    so is the plan (a turn from right to up over the first 2 s of the new frames, after 8 frames of context)."""
    from longtake.cluster.engine import prepare
    from longtake.video import VideoWriter

    with VideoWriter(str(tmp_path / "a.mp4"), 64, 64, 8) as w:
        w.write(_moving_ball(24))
    job = prepare(dict(timeline=[{"at": 0, "prompt": "a ball moving right"}, {"at": 2, "prompt": "a ball moving up"}],
                       seconds=4, extend=str(tmp_path / "a.mp4"), context=1, out=str(tmp_path / "o.mp4")))
    ctx, c = job.inputs.ctx_before, _centres(job.control)
    d = wrap_delta(c[:-1], c[1:], 64)  # d[f]: frame f -> f + 1
    turned = ctx + 16  # 2 s into the new frames
    assert ctx == 8 and len(c) == ctx + 32
    assert d[turned - 6:turned, 0].mean() > 0.4, d  # still turning (centres are whole pixels: a mean)
    assert np.abs(d[turned:, 0]).max() < 0.5 and (d[turned:, 1] < -2).all(), d  # up from there on


def test_a_planned_bridge_keeps_more_of_its_crossfade(tmp_path):
    """A bridge the plan draws starts from 0.7 of its crossfade redrawn (0.9 without a plan; an explicit
    strength wins), and the checkpoint fingerprint follows the strength used."""
    from longtake.cluster.engine import prepare
    from longtake.cluster.checkpoint import fingerprint
    from longtake.request import DEFAULT_BRIDGE_STRENGTH, PLANNED_BRIDGE_STRENGTH
    from longtake.video import VideoWriter

    for name, start in (("a", 10.0), ("b", 40.0)):
        with VideoWriter(str(tmp_path / f"{name}.mp4"), 64, 64, 8) as w:
            w.write(_moving_ball(16, start=start))
    base = dict(prompt="a ball on blue", seconds=2, extend=str(tmp_path / "a.mp4"), lead_into=str(tmp_path / "b.mp4"),
                out=str(tmp_path / "o.mp4"))
    planned, plain, explicit = prepare(base), prepare({**base, "plan": "none"}), prepare({**base, "strength": 0.9})
    assert planned.control is not None and plain.control is None and explicit.control is not None
    assert (planned.inputs.strength, plain.inputs.strength) == (PLANNED_BRIDGE_STRENGTH, DEFAULT_BRIDGE_STRENGTH)
    assert explicit.inputs.strength == 0.9
    assert fingerprint(planned, "float32", "cpu") != fingerprint(explicit, "float32", "cpu")
