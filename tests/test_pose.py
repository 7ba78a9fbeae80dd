"""Pose input (longtake/pose.py): keypoints drawn to skeleton frames (known keypoints -> known pixels), the
pose-video path, resampling and looping, retargeting arithmetic, and bad input naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longtake.pose import COLOURS, LIMB_SHADE, Person, draw, load_keypoints, pose_frames, retarget, fit
from longtake.request import RequestError


def coco(points: dict[int, tuple[float, float]], n: int = 18) -> list[float]:
    flat = [0.0] * (n * 3)
    for i, (x, y) in points.items():
        flat[i * 3: i * 3 + 3] = [x, y, 1.0]
    return flat


def write(tmp_path, frames, name="pose.json", **meta):
    path = tmp_path / name
    path.write_text(json.dumps({**meta, "frames": frames}))
    return str(path)


def one(points, **kw) -> dict:
    return {"people": [{"pose_keypoints_2d": coco(points, **kw)}]}


def test_known_keypoints_give_known_pixels(tmp_path):
    """Neck at (100, 100), right shoulder at (160, 100) on a 256 x 256 canvas drawn at 256 x 256: the
    limb between them in its colour at 60 %, each point a dot in its own colour, nothing elsewhere."""
    path = write(tmp_path, [one({1: (100, 100), 2: (160, 100)})], width=256, height=256, fps=8)
    frame = pose_frames("pose", path, 1, 8, 256, 256)[0]
    assert tuple(frame[100, 100]) == COLOURS[1]  # the neck's dot (points over limbs)
    assert tuple(frame[100, 160]) == COLOURS[2]
    assert tuple(frame[100, 130]) == tuple(int(c * LIMB_SHADE) for c in COLOURS[0])  # limb 0: neck - r-shoulder
    assert frame[100, 130].tolist() != frame[100, 100].tolist()
    assert not frame[:90].any() and not frame[111:].any()  # a 2 px thick limb, 2 px dots: nothing far away
    lit = np.argwhere(frame.any(-1))
    assert lit[:, 1].min() >= 97 and lit[:, 1].max() <= 163


def test_body25_is_drawn_as_coco18_and_hands_and_face_too(tmp_path):
    body25 = coco({1: (50, 50), 8: (50, 120), 14: (70, 200)}, n=25)  # neck, mid-hip (dropped), l-ankle (COCO 13)
    hand = coco({0: (20, 20), 1: (23, 20), 2: (26, 20), 3: (28, 20), 4: (30, 20)}, n=21)  # wrist to thumb tip
    face = coco({0: (200, 30)}, n=70)
    path = write(tmp_path, [{"people": [{"pose_keypoints_2d": body25, "hand_left_keypoints_2d": hand,
                                         "face_keypoints_2d": face}]}], width=256, height=256)
    frame = pose_frames("pose", path, 1, 8, 256, 256)[0]
    assert tuple(frame[200, 70]) == COLOURS[13] and tuple(frame[50, 50]) == COLOURS[1]
    assert not frame[120, 50].any()  # the mid-hip is not a COCO-18 point
    assert tuple(frame[20, 20]) == (0, 0, 255) and tuple(frame[30, 200]) == (255, 255, 255)
    assert frame[20, 25].any()  # the hand's edges between wrist and thumb tip


def test_the_canvas_is_fitted_like_images_and_normalised_coordinates_scale(tmp_path):
    wide = write(tmp_path, [one({1: (200, 50)})], "wide.json", width=400, height=100)  # 4:1 onto 64 x 64
    seq = fit(load_keypoints("pose", wide), 64, 64)
    assert seq.frames[0][0].body[1, :2] == pytest.approx([200 * 0.64 - (256 - 64) / 2, 50 * 0.64])
    norm = write(tmp_path, [one({1: (0.25, 0.5)})], "norm.json")
    assert fit(load_keypoints("pose", norm), 64, 32).frames[0][0].body[1, :2] == pytest.approx([16, 16])


def test_frames_are_resampled_to_fps_and_loop_only_when_asked(tmp_path):
    frames = [one({1: (10 + 20 * i, 30)}) for i in range(6)]  # 6 poses at 4 fps: 1.5 s
    path = write(tmp_path, frames, width=128, height=64, fps=4)
    out = pose_frames("pose", path, 12, 8, 128, 64)  # 1.5 s at 8 fps: each pose twice
    xs = [np.argwhere((f == COLOURS[1]).all(-1))[:, 1].mean() for f in out]
    assert xs == pytest.approx([10, 10, 30, 30, 50, 50, 70, 70, 90, 90, 110, 110], abs=0.5)
    with pytest.raises(RequestError, match="pose_loop; it has 1.5 s") as e:
        pose_frames("pose", path, 16, 8, 128, 64)
    assert e.value.field == "pose"
    looped = pose_frames("pose", path, 16, 8, 128, 64, loop=True)
    assert (looped[12] == looped[0]).all() and (looped[15] == looped[3]).all()


def test_a_dropout_holds_the_last_pose(tmp_path):
    path = write(tmp_path, [one({1: (20, 20)}), {"people": []}, one({1: (40, 20)})], width=64, height=64)
    out = pose_frames("pose", path, 3, 8, 64, 64)
    assert (out[1] == out[0]).all() and not (out[2] == out[0]).all()


def test_the_pose_video_path(tmp_path):
    from longtake.video import VideoWriter

    video = tmp_path / "pose.mp4"
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    for i in range(8):
        frames[i, :, 8 * i: 8 * i + 8] = 255  # a bar moving right, one 8 px column per frame
    with VideoWriter(video, 64, 64, 8) as w:
        w.write(frames)
    out = pose_frames("pose", str(video), 8, 8, 32, 32)  # read at the job's size
    assert out.shape == (8, 32, 32, 3)
    bright = [int(np.argmax(f.mean((0, 2)))) for f in out]
    assert bright == sorted(bright) and bright[0] < 4 and bright[-1] > 27
    with pytest.raises(RequestError, match="pose_loop"):
        pose_frames("pose", str(video), 12, 8, 32, 32)
    assert len(pose_frames("pose", str(video), 12, 8, 32, 32, loop=True)) == 12
    with pytest.raises(RequestError, match="keypoint JSON pose to retarget"):
        pose_frames("pose", str(video), 8, 8, 32, 32, reference=Person(np.zeros((18, 3))))


def test_retargeting_scales_and_moves_onto_the_reference():
    """A dancer 200 px tall (neck to ankle) with hips at (100, 200) onto a figure 100 px tall with hips at
    (300, 150): every point p becomes (p - (100, 200)) * 0.5 + (300, 150), in every frame."""
    def person(neck, hips_y, ankle_y, x):
        body = np.zeros((18, 3))
        for i, (px, py) in {1: (x, neck), 8: (x - 10, hips_y), 11: (x + 10, hips_y), 10: (x - 10, ankle_y),
                            13: (x + 10, ankle_y)}.items():
            body[i] = [px, py, 1]
        return Person(body)

    from longtake.pose import PoseSequence

    drive = PoseSequence([[person(100, 200, 300, 100)], [person(80, 180, 280, 140)]], fps=8, size=(512, 512))
    out = retarget(drive, person(100, 150, 200, 300))
    for before, after in zip(drive.frames, out.frames):
        ok = before[0].body[:, 2] > 0
        expected = (before[0].body[ok, :2] - [100, 200]) * 0.5 + [300, 150]
        assert after[0].body[ok, :2] == pytest.approx(expected)
    assert out.frames[0][0].body[1, :2] == pytest.approx([300, 100])  # the neck: 50 px above the hips


@pytest.mark.parametrize("content,match", [
    ("{not json", "valid JSON"),
    ({"frames": []}, "non-empty list of frames"),
    ({"frames": [{"people": [{"pose_keypoints_2d": [1.0] * 60}]}], "width": 64, "height": 64}, "got 60"),
    ({"frames": [{"people": [{"pose_keypoints_2d": [float("nan")] * 54}]}], "width": 64, "height": 64}, "finite"),
    ({"frames": [{"people": []}], "width": 64, "height": 64}, "someone in the first frame"),
    ({"frames": [{"people": [{"pose_keypoints_2d": coco({1: (300, 40)})}]}]}, "canvas"),
    ({"frames": [{"nobody": 1}]}, "a list 'people'"),
    ({"frames": [{"people": [{"pose_keypoints_2d": "x"}]}]}, "a list of numbers"),
])
def test_bad_keypoint_files_name_the_field(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content).replace("NaN", "NaN"))
    with pytest.raises(RequestError, match=match) as e:
        pose_frames("pose", str(path), 4, 8, 64, 64)
    assert e.value.field == "pose"


def test_missing_and_unreadable_files_name_the_field(tmp_path):
    with pytest.raises(RequestError, match="an existing pose video or keypoint JSON"):
        pose_frames("pose", str(tmp_path / "none.json"), 4, 8, 64, 64)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(RequestError) as e:
        pose_frames("pose", str(junk), 4, 8, 64, 64)
    assert e.value.field == "pose"


def test_draw_scales_with_the_frame():
    body = np.zeros((18, 3))
    body[1] = [256, 256, 1]
    small, big = draw([Person(body / [4, 4, 1])], 128, 128), draw([Person(body)], 512, 512)
    assert (small.any(-1).sum() * 16) == pytest.approx(big.any(-1).sum(), rel=0.35)  # the dot scales


def test_the_pose_drives_the_frames_deterministically(tmp_path, tiny_pose_model, tiny_model, render_in_process):
    """With a pose ControlNet, the pose changes the frames and the same pose gives the same frames; a
    retargeted pose is another pose; a model without a ControlNet refuses a pose, naming the field."""
    from conftest import walking_pose

    from longtake.cluster.engine import prepare

    req = {"prompt": "a dancer", "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2, "model": tiny_pose_model,
           "pose": f"{tiny_pose_model}/pose.json"}
    a = render_in_process({**req, "out": str(tmp_path / "a.mp4")})
    again = render_in_process({**req, "out": str(tmp_path / "b.mp4")})
    other = walking_pose(tmp_path / "slow.json", frames=32, fps=16)  # the same walk, half the speed
    slow = render_in_process({**req, "pose": other, "out": str(tmp_path / "c.mp4")})
    free = render_in_process({k: v for k, v in req.items() if k != "pose"} | {"out": str(tmp_path / "d.mp4")})
    assert a.frames_sha256 == again.frames_sha256
    assert len({a.frames_sha256, slow.frames_sha256, free.frames_sha256}) == 3
    small = write(tmp_path, [one({1: (32, 30), 8: (30, 40), 11: (34, 40), 10: (30, 51), 13: (34, 51)})], "small.json",
                  width=64, height=64)  # the photo's figure: 21 px from neck to ankle, the walker 42
    job = prepare({**req, "reference_pose": small, "out": str(tmp_path / "e.mp4")})
    plain = prepare({**req, "out": str(tmp_path / "e.mp4")})
    assert not np.array_equal(job.control, plain.control)  # retargeted: smaller
    assert job.control.any(-1).sum() < plain.control.any(-1).sum()
    assert np.array_equal(prepare({**req, "reference_pose": small, "retarget": "none",
                                   "out": str(tmp_path / "e.mp4")}).control, plain.control)
    with pytest.raises(RequestError, match="a model with a pose ControlNet") as e:
        prepare({**req, "model": tiny_model, "out": str(tmp_path / "f.mp4")})
    assert e.value.field == "pose"


@pytest.mark.parametrize("extra,field", [
    ({"pose_loop": True}, "pose_loop"), ({"control_scale": 2.0}, "control_scale"),
    ({"reference_pose": "r.json"}, "reference_pose"),
    ({"pose": "p.json", "loop": True}, "loop"), ({"pose": "p.json", "extend": "x.mp4"}, "extend"),
    ({"pose": "p.json", "video": "x.mp4"}, "video"), ({"reference": "a.png", "image": "b.png"}, "reference"),
    ({"pose": "p.json", "control_scale": 0}, "control_scale"), ({"pose": "p.json", "retarget": "some"}, "retarget"),
])
def test_pose_fields_that_do_not_go_together_name_the_field(tmp_path, extra, field):
    from longtake.request import parse_request

    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "a dancer", "out": str(tmp_path / "a.mp4"), **extra})
    assert e.value.field == field


def test_the_reference_photo_is_frame_zero(tmp_path, tiny_pose_model, render_in_process):
    """The reference photo is pinned at frame 0 exactly as `image` is: the same known frame, the same frames."""
    from PIL import Image

    from longtake.cluster.engine import prepare

    photo = np.zeros((64, 64, 3), np.uint8)
    photo[:, :32] = (220, 30, 30)
    Image.fromarray(photo).save(tmp_path / "me.png")
    req = {"prompt": "a dancer", "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2, "model": tiny_pose_model,
           "pose": f"{tiny_pose_model}/pose.json", "out": str(tmp_path / "a.mp4")}
    job = prepare({**req, "reference": str(tmp_path / "me.png")})
    (pinned,) = job.inputs.pinned
    assert (pinned.frame, pinned.source) == (0, "reference") and np.array_equal(pinned.pixels[0], photo)
    with_reference = render_in_process({**req, "reference": str(tmp_path / "me.png")})
    with_image = render_in_process({**req, "image": str(tmp_path / "me.png"), "out": str(tmp_path / "b.mp4")})
    without = render_in_process({**req, "out": str(tmp_path / "c.mp4")})
    assert with_reference.frames_sha256 == with_image.frames_sha256 != without.frames_sha256
