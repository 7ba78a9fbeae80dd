"""Pose input (longtake/pose.py): keypoints drawn to skeleton frames (known keypoints -> known pixels), the
pose-video path, resampling and looping, retargeting arithmetic, and bad input naming the field."""

from __future__ import annotations

import json
from pathlib import Path

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
    frame = np.asarray(pose_frames("pose", path, 1, 8, 256, 256))[0]
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
    frame = np.asarray(pose_frames("pose", path, 1, 8, 256, 256))[0]
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
    out = np.asarray(pose_frames("pose", path, 12, 8, 128, 64))  # 1.5 s at 8 fps: each pose twice
    xs = [np.argwhere((f == COLOURS[1]).all(-1))[:, 1].mean() for f in out]
    assert xs == pytest.approx([10, 10, 30, 30, 50, 50, 70, 70, 90, 90, 110, 110], abs=0.5)
    with pytest.raises(RequestError, match="pose_loop; it has 1.5 s") as e:
        pose_frames("pose", path, 16, 8, 128, 64)
    assert e.value.field == "pose"
    looped = np.asarray(pose_frames("pose", path, 16, 8, 128, 64, loop=True))
    assert (looped[12] == looped[0]).all() and (looped[15] == looped[3]).all()


def test_a_dropout_holds_the_last_pose(tmp_path):
    path = write(tmp_path, [one({1: (20, 20)}), {"people": []}, one({1: (40, 20)})], width=64, height=64)
    out = np.asarray(pose_frames("pose", path, 3, 8, 64, 64))
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


@pytest.mark.slow
def test_the_pose_drives_the_frames_deterministically(tmp_path, tiny_pose_model, tiny_model, render_in_process):
    """With a pose ControlNet, the pose changes the frames and the same pose gives the same frames; a
    retargeted pose is another pose; a model without a ControlNet refuses a pose, naming the field."""
    from longtake.cluster.engine import prepare
    from longtake.tools.samples import walking_pose

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
    assert np.asarray(job.control).any(-1).sum() < np.asarray(plain.control).any(-1).sum()
    assert np.array_equal(prepare({**req, "reference_pose": small, "retarget": "none",
                                   "out": str(tmp_path / "e.mp4")}).control, plain.control)
    with pytest.raises(RequestError, match="a model with a pose ControlNet") as e:
        prepare({**req, "model": tiny_model, "out": str(tmp_path / "f.mp4")})
    assert e.value.field == "pose"


@pytest.mark.parametrize("extra,field", [
    ({"pose_loop": True}, "pose_loop"), ({"control_scale": 2.0, "plan": "none"}, "control_scale"),
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


@pytest.mark.slow
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


def test_path_measures_are_wrap_aware_and_name_the_distance():
    """quality.mask_centroids / path_error / identity on known frames: an object 3 px from its silhouette
    (across the wrap) is 3 px off; a missing object is infinitely far; identity compares with the reference."""
    from longtake.quality import identity, mask_centroids, path_error

    size, bg = 64, (30, 50, 160)
    masks = np.zeros((2, size, size), np.uint8)
    masks[0, 10:16, 0:3] = masks[0, 10:16, 61:] = 255  # a silhouette across the left/right edge: x = -0.5
    masks[1, 40:46, 40:46] = 255
    assert np.allclose(mask_centroids(masks), [[63.5, 12.5], [42.5, 42.5]])
    frames = np.tile(np.array(bg, np.uint8), (2, size, size, 1))
    frames[0, 10:16, 2:8] = (220, 30, 30)  # 3 px to the right of its silhouette (x = 4.5 vs -0.5 = 63.5)
    error = path_error(frames, masks, bg)
    assert np.isclose(error[0], 5.0) and np.isinf(error[1])
    look = identity(frames[:1], frames[0], bg)
    assert look["colour_distance"] == 0 and look["size_ratio"] == 1 and look["present"] == 1
    assert identity(frames[1:], frames[0], bg)["present"] == 0


def test_farm_spec_pose_paths_are_relative_to_the_spec(tmp_path):
    """Every media field of a farm spec (the pose ones included) names a path relative to the spec file."""
    from longtake.cluster import farm
    from longtake.request import MEDIA_FIELDS

    fields = [f for f in MEDIA_FIELDS if f != "keyframes"] + ["reference_pose"]
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "job.json").write_text(json.dumps({"prompt": "x", **{f: f"m/{f}.bin" for f in fields}}))
    job, = farm.read_specs(str(tmp_path / "specs" / "job.json"))
    assert {f: job[f] for f in fields} == {f: str((tmp_path / "specs" / "m" / f"{f}.bin").resolve()) for f in fields}
    assert {"pose", "reference", "reference_pose", "face", "background", "mask"} <= set(fields)


def _moving_square(path, frames=16, fps=8, size=64, start=0):
    from longtake.video import VideoWriter

    with VideoWriter(path, size, size, fps) as w:
        for i in range(frames):
            f = np.zeros((size, size, 3), np.uint8)
            if i >= start:
                f[20:30, 10 + 2 * i:20 + 2 * i] = 255
            w.write(f)
    return str(path)


def test_pose_from_runs_the_estimator_on_every_frame(tmp_path):
    """--pose-from's extraction with a small fake estimator (tests/fake_pose_estimator.py): one keypoint frame
    per output frame, following the person; drawn, the neck's dot sits where the person is."""
    from fake_pose_estimator import make

    from longtake.pose import extract_poses, extract_reference_pose

    video = _moving_square(tmp_path / "dance.mp4")
    out = extract_poses(video, 8, make(), str(tmp_path / "o.pose.json"))
    data = json.loads((tmp_path / "o.pose.json").read_text())
    assert (data["fps"], data["width"], data["height"], len(data["frames"])) == (8, 64, 64, 16)
    necks = [f["people"][0]["pose_keypoints_2d"][3:5] for f in data["frames"]]
    assert np.allclose(np.diff([x for x, _ in necks]), 2, atol=0.6) and abs(necks[0][0] - 14.5) < 1
    frames = np.asarray(pose_frames("pose", out, 16, 8, 64, 64))
    for i in (0, 15):
        x, y = (round(v) for v in necks[i])
        assert tuple(frames[i][y, x]) == COLOURS[1]
    photo = tmp_path / "photo.png"
    from PIL import Image

    still = np.zeros((48, 32, 3), np.uint8)
    still[10:20, 10:20] = 255
    Image.fromarray(still).save(photo)
    ref = json.loads(Path(extract_reference_pose(str(photo), make(), str(tmp_path / "r.json"))).read_text())
    assert (ref["width"], ref["height"]) == (32, 48) and ref["frames"][0]["people"][0]["pose_keypoints_2d"][3:5] == [14.5, 14.5]
    assert load_keypoints("reference_pose", str(tmp_path / "r.json")).frames[0][0].body[1, 0] == 14.5


@pytest.mark.slow
def test_pose_from_on_the_cli_and_its_bad_inputs(tmp_path, cli_cases, tiny_pose_model):
    """The CLI writes OUT.pose.json and renders with it; an estimator that cannot run (rtmlib absent, or its
    weights not downloadable here), a video with nobody in its first frame, --pose-from with --pose, an image:
    exit 2 naming pose_from (or pose_estimator), before any model loads."""
    import os
    import subprocess
    import sys

    video = _moving_square(tmp_path / "dance.mp4")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "longtake", "render", "a dancer", "--model", tiny_pose_model,
                          "--pose-from", video, "--pose-estimator", "fake_pose_estimator:make", "--seconds", "2",
                          "--in-process", "--json", "-q", "--out", str(tmp_path / "d.mp4")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["frames"] == 16 and (tmp_path / "d.pose.json").is_file()
    late = _moving_square(tmp_path / "late.mp4", start=3)
    o = ["--out", str(tmp_path / "x.mp4"), "--model", tiny_pose_model]
    cases = [["render", "x", "--pose-from", video, "--pose-estimator", "rtmlib", *o],
             ["render", "x", "--pose-from", late, "--pose-estimator", "tests.fake_pose_estimator:make", *o],
             ["render", "x", "--pose-from", video, "--pose", video, *o],
             ["render", "x", "--pose-from", video, "--pose-estimator", "nosuchmodule:make", *o]]
    results = cli_cases(cases, tmp_path, report_imports=True)
    for argv, res in zip(cases, results[:-1]):
        assert res["rc"] == 2, (argv, res)
    assert results[0]["err"].startswith(f"longtake render: error: pose_from: got '{video}'"), results[0]["err"]
    assert "pip install 'longtake[pose]'" in results[0]["err"] or "weights" in results[0]["err"]
    assert results[1]["err"].startswith("longtake render: error: pose_from: got ") and "first frame" in results[1]["err"]
    assert "no value with --pose" in results[2]["err"]
    assert results[3]["err"].startswith("longtake render: error: pose_estimator: got 'nosuchmodule:make'")
    assert not results[-1]["ray_imported"] and not results[-1]["diffusers_imported"], results[-1]


def test_keypoint_poses_are_drawn_as_palette_indices_exactly(tmp_path):
    """A keypoint file's skeletons are held and sent as one channel (PALETTE indices): the same pixels as the
    RGB drawing, hands and face included, at any size (PIL fills the same pixels in either mode)."""
    from longtake.core.frames import Indexed
    from longtake.pose import PALETTE

    rng = np.random.default_rng(1)
    for w, h in ((64, 64), (97, 211), (1280, 720)):
        points = lambda n, c=1: np.c_[rng.uniform(-5, w + 5, n), rng.uniform(-5, h + 5, n),  # noqa: E731
                                      rng.integers(0, 2, n) * c]
        person = Person(points(18), hands=[points(21), points(21)], face=points(70))
        assert np.array_equal(PALETTE[draw([person], w, h, indexed=True)], draw([person], w, h))
    path = write(tmp_path, [one({1: (30, 30), 2: (50, 30), 8: (30, 50)})], width=64, height=64, fps=8)
    frames = pose_frames("pose", path, 4, 8, 64, 64, loop=True)
    assert isinstance(frames, Indexed) and frames.index.shape == (4, 64, 64)
    assert np.array_equal(np.asarray(frames)[0], draw(fit(load_keypoints("pose", path), 64, 64).frames[0], 64, 64))
