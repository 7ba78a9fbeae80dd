"""The quality metrics on synthetic clips whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from longtake.models.shapes import BACKGROUNDS, OBJECT_COLORS, ClipSpec, parse_caption, render_clip
from longtake.quality import (classify_color, classify_motion, drift, object_track, object_visible, seam_pairs,
                              seam_ratio, wrap_delta)


def _clip(color="red", shape="ball", motion="right", bg="black", frames=48, size=64, seed=0):
    spec = ClipSpec(color, shape, motion, bg)
    return render_clip(spec, frames, size, np.random.default_rng(seed)), spec


@pytest.mark.parametrize("motion", ["left", "right", "up", "down", "bouncing", "still"])
@pytest.mark.parametrize("bg", ["black", "white", "gray", "blue"])
def test_motion_and_colour_of_generated_clips(motion, bg):
    for seed, color in enumerate(["red", "green", "yellow"]):
        frames, spec = _clip(color=color, motion=motion, bg=bg, frames=64, seed=seed)
        track = object_track(frames, BACKGROUNDS[bg])
        assert classify_color(track) == color
        assert classify_motion(track) == motion, (motion, bg, seed)


def test_wrap_delta_crosses_the_edge():
    assert wrap_delta(np.array(62.0), np.array(1.0), 64) == pytest.approx(3.0)
    assert wrap_delta(np.array(1.0), np.array(62.0), 64) == pytest.approx(-3.0)


def test_seam_pairs():
    assert seam_pairs([(0, 16), (12, 28), (24, 40)], 40) == [11, 15, 23, 27]
    assert seam_pairs([(0, 16), (16, 32)], 32) == [15]
    assert seam_pairs([(0, 10)], 10) == []


def test_a_jump_at_a_seam_scores_worse_than_a_smooth_clip():
    frames, _ = _clip(motion="right", frames=64)
    windows = [(0, 16), (16, 32), (32, 48), (48, 64)]
    seams = seam_pairs(windows, 64)
    smooth = seam_ratio(object_track(frames, BACKGROUNDS["black"]), seams)
    assert 0.7 < smooth < 1.3
    # cut the clip at the seams and shift each window sideways: the object jumps at every seam
    jumpy = frames.copy()
    for k, (s, e) in enumerate(windows):
        jumpy[s:e] = np.roll(frames[s:e], shift=7 * k, axis=2)
    ratio = seam_ratio(object_track(jumpy, BACKGROUNDS["black"]), seams)
    assert ratio > 2.5 * smooth


def test_drift_sees_colour_and_size_change():
    frames, _ = _clip(motion="still", frames=160)
    track = object_track(frames, BACKGROUNDS["black"])
    same = drift(track, fps=8)
    assert same["color_delta"] < 1 and same["size_ratio"] == pytest.approx(1.0, abs=0.01)
    changed = frames.copy()
    obj = np.linalg.norm(changed[80:].astype(float) - BACKGROUNDS["black"], axis=-1) > 80
    changed[80:][obj] = OBJECT_COLORS["yellow"]  # the second half turns yellow
    d = drift(object_track(changed, BACKGROUNDS["black"]), fps=8)
    assert d["color_delta"] > 100
    bigger, _ = _clip(motion="still", frames=160)
    big = np.linalg.norm(bigger.astype(float) - BACKGROUNDS["black"], axis=-1) > 80
    grown = np.roll(big, 3, axis=1) | np.roll(big, -3, axis=1) | big
    bigger[80:][grown[80:]] = OBJECT_COLORS["red"]
    assert drift(object_track(bigger, BACKGROUNDS["black"]), fps=8)["size_ratio"] > 1.2


def test_no_object_gives_no_answer():
    blank = np.zeros((20, 64, 64, 3), dtype=np.uint8)
    track = object_track(blank, BACKGROUNDS["black"])
    assert classify_color(track) is None and classify_motion(track) is None


def test_caption_round_trip():
    for spec in [ClipSpec("red", "ball", "right", "blue"), ClipSpec("blue", "triangle", "bouncing", "white"),
                 ClipSpec("yellow", "square", "still", "gray")]:
        assert parse_caption(spec.caption) == spec
    assert parse_caption("a cat") is None


@pytest.mark.parametrize("shape", ["ball", "square", "triangle"])
@pytest.mark.parametrize("bg", ["black", "white", "gray", "blue"])
def test_object_visible_finds_the_prompted_object_only(shape, bg):
    frames, spec = _clip(color="red", shape=shape, motion="right", bg=bg, frames=12)
    background = np.asarray(BACKGROUNDS[bg], np.float32)
    assert object_visible(frames, BACKGROUNDS[bg], "red").all()
    assert not object_visible(frames, BACKGROUNDS[bg], "green").any()  # another colour is not the object
    empty = np.broadcast_to(background.astype(np.uint8), frames.shape)
    assert not object_visible(empty, BACKGROUNDS[bg], "red").any()
    faded = (0.25 * frames + 0.75 * background).astype(np.uint8)  # three quarters gone into the background
    assert not object_visible(faded, BACKGROUNDS[bg], "red").any()
    half = frames.copy()
    half[::2] = empty[::2]  # the object in every other frame
    assert object_visible(half, BACKGROUNDS[bg], "red").mean() == 0.5


def test_a_junction_ratio_is_the_jump_over_the_median_change_of_the_new_frames():
    from longtake.quality import frame_change, junction_ratio

    new = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 12, 14, 20)])  # changes 2, 2, 6: median 2
    assert frame_change(new).tolist() == [2.0, 2.0, 6.0]
    before = np.full((4, 4, 3), 4, np.uint8)  # unsigned frames: the jump 10 - 4 = 6 is not wrapped around
    assert junction_ratio(new[0], before, new) == 3.0 and junction_ratio(before, new[0], new) == 3.0
