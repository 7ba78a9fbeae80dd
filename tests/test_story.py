"""Stories (#35): a story file -> farm jobs with dependencies -> one film and film.otio, on the bundled model.

One story of four shots (a cut with a character, a continue, a cut, a dissolve with the character again) is
rendered once per module on a 2-worker runner; the tests read its film, its shots, its farm and its OTIO."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from longtake.cli import main
from longtake.media import load_image, video_chunks
from longtake.quality import frame_change, identity, junction_ratio

pytestmark = pytest.mark.slow

from longtake.models.shapes import BACKGROUNDS

FPS, SIZE = 8, 64
BLUE = BACKGROUNDS["blue"]
BALL = Path(__file__).resolve().parents[1] / "examples" / "ball.png"  # a red ball on blue, as the model draws it
STORY = {
    "style": "on a blue background",
    "label": "none",  # the cut test measures frame changes: no label appearing or going
    "characters": {"hero": {"image": "hero.png"}},
    "shots": [
        {"id": "s1", "prompt": "a red ball moving right", "seconds": 2, "characters": ["hero"]},
        {"id": "s2", "prompt": "a red ball moving down", "seconds": 2, "begin": "continue"},
        {"id": "s3", "prompt": "a yellow square bouncing", "seconds": 2},
        {"id": "s4", "prompt": "a red ball moving left", "seconds": 2, "characters": ["hero"],
         "begin": {"dissolve": 0.5}},
    ],
}


def _hero(path: Path) -> None:
    shutil.copyfile(BALL, path)


def _frames(path) -> np.ndarray:
    return np.concatenate(list(video_chunks("f", str(path), FPS, SIZE, SIZE)))


def _story(directory: Path, story: dict, *args: str, capsys=None) -> tuple[int, dict | None, str]:
    (directory / "film.yaml").write_text(yaml.safe_dump(story))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["story", str(directory / "film.yaml"), "--out", str(directory / "film.mp4"), "--workers", "2",
                     "--json", *args])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 and out.strip() else None), err


@pytest.fixture(scope="module")
def film(tmp_path_factory, ray_session):
    directory = tmp_path_factory.mktemp("story")
    _hero(directory / "hero.png")
    buffer = io.StringIO()  # (module scope: no capsys)
    with contextlib.redirect_stdout(buffer):
        code, _, _ = _story(directory, STORY)
    assert code == 0, buffer.getvalue()
    return directory, json.loads(buffer.getvalue().strip().splitlines()[-1])


def test_the_film_has_its_shots_frames_cuts_where_they_are_and_continues_that_join(film):
    directory, summary = film
    frames = _frames(directory / "film.mp4")
    per_shot = [s["frames"] for s in summary["shots"]]
    assert per_shot == [16, 16, 16, 16]
    assert len(frames) == summary["frames"] == sum(per_shot) - 4  # the dissolve: 0.5 s at 8 fps overlaps
    assert summary["cuts"] == [0, 16, 32, 44] and summary["dissolves"] == [[44, 48]]
    change = frame_change(frames)  # change[i]: frame i -> i + 1
    cut = 32  # s3 cuts in: the largest change of the film's frames around it
    assert change[cut - 1] == change[cut - 9:cut + 8].max() and change[cut - 1] > 2 * np.median(change)
    shot2 = _frames(summary["shots"][1]["out"])
    assert junction_ratio(frames[16], frames[15], shot2) <= 1.3  # the continue joins as extend does (issue 15)
    # the dissolve: each frame under it lies between the two shots' frames it blends
    s3, s4 = _frames(summary["shots"][2]["out"]), _frames(summary["shots"][3]["out"])
    for k in range(4):
        a = (k + 1) / 5
        blend = s3[12 + k].astype(float) * (1 - a) + s4[k].astype(float) * a
        assert np.abs(frames[44 + k].astype(float) - blend).mean() < 3  # (one encode of the film)


def test_otio_has_one_clip_per_shot_and_the_dissolve(film):
    import opentimelineio as otio

    directory, summary = film
    timeline = otio.adapters.read_from_file(str(directory / "film.otio"))
    items = list(timeline.tracks[0])
    clips = [i for i in items if isinstance(i, otio.schema.Clip)]
    assert [c.name for c in clips] == ["s1", "s2", "s3", "s4"]
    assert [type(i).__name__ for i in items] == ["Clip", "Clip", "Clip", "Transition", "Clip"]
    dissolve = items[3]
    assert dissolve.transition_type == otio.schema.TransitionTypes.SMPTE_Dissolve
    assert dissolve.in_offset.value + dissolve.out_offset.value == 4
    assert [c.source_range.duration.value for c in clips] == [16, 16, 14, 14]
    assert timeline.duration().value == summary["frames"]
    for clip, shot in zip(clips, summary["shots"]):
        assert Path(clip.media_reference.target_url.removeprefix("file://")) == Path(shot["out"])
        assert clip.media_reference.available_range.duration.value == shot["frames"]
        assert clip.metadata["longtake"]["prompt"].endswith("on a blue background")


def test_cut_shots_render_at_once_and_a_continue_waits(film):
    from longtake.cluster import farm

    directory, summary = film
    store = farm.open_store(summary["farm_dir"])
    span = {}
    for shot in summary["shots"]:
        record = store.get(shot["job"])
        assert record.state == "done" and record.story["shot"] == shot["id"]
        span[shot["id"]] = (record.updated - record.result["wall_s"], record.updated)
    assert span["s1"][0] < span["s3"][1] and span["s3"][0] < span["s1"][1]  # both running at once
    assert span["s2"][0] >= span["s1"][1] - 0.01  # the continue started after s1 was done
    assert store.get(summary["shots"][1]["job"]).depends == [summary["shots"][0]["job"]]


def test_a_character_keeps_its_colour_in_every_shot_that_shows_it(film):
    directory, summary = film
    # the reference as the shots show it: pinned at s1's first frame, through the same H.264 encode (at 64 px
    # the codec alone moves the picture's small red ball ~35 RGB levels from the PNG's)
    reference = _frames(summary["shots"][0]["out"])[0]
    assert identity(reference[None], load_image("hero", str(directory / "hero.png"), SIZE, SIZE), BLUE)[
        "colour_distance"] < 40
    for shot in summary["shots"]:
        look = identity(_frames(shot["out"]), reference, BLUE)
        if shot["id"] in ("s1", "s2", "s4"):  # the hero's shots (s2 through the frames it continues)
            assert look["present"] >= 0.9 and look["colour_distance"] < 20, (shot["id"], look)
        else:  # the yellow square's shot: the measure tells them apart
            assert look["colour_distance"] > 100, (shot["id"], look)


def test_the_film_carries_one_label_one_mark_and_every_shots_produce_id(film):
    from longtake.provenance import load_key, read_tags, verify
    from longtake.watermark import payload_of

    directory, summary = film
    tags = read_tags(directory / "film.mp4")
    assert json.loads(tags["story_shots"]) == {s["id"]: s["job"] for s in summary["shots"]}
    assert json.loads(tags["AIGC"])["ProduceID"] == summary["produce_id"]
    report = verify(directory / "film.mp4", key=load_key(summary["farm_dir"], create=False))
    assert report["integrity"] == "intact", report
    assert report["watermark"]["found"] and report["watermark"]["payload"] == f"{payload_of(summary['produce_id']):08x}", report


def test_an_edit_renders_the_shot_and_what_depends_on_it_only(film, capsys):
    directory, first = film
    before = {s["id"]: Path(s["out"]).read_bytes() for s in first["shots"]}
    story = json.loads(json.dumps(STORY))
    story["shots"][0]["prompt"] = "a red ball moving up"  # s1 changes: s2 continues it, s3 and s4 do not
    code, second, err = _story(directory, story, capsys=capsys)
    assert code == 0, err
    rendered = {s["id"] for s in second["shots"] if s["rendered"]}
    assert rendered == {"s1", "s2"}
    for shot in second["shots"]:
        if shot["id"] in ("s3", "s4"):
            assert Path(shot["out"]).read_bytes() == before[shot["id"]]
    story["shots"][2]["prompt"] = "a green square bouncing"
    story["shots"][3]["prompt"] = "a red ball moving up"
    code, third, err = _story(directory, story, "--only", "s4", capsys=capsys)
    assert code == 0, err
    assert {s["id"] for s in third["shots"] if s["rendered"]} == {"s4"}
    assert third["shots"][2]["out"] == second["shots"][2]["out"]  # s3 kept as it was


@pytest.mark.parametrize("change, where", [
    (lambda s: s["shots"][1].update(characters=["villain"]), "shots[1] (s2).characters[0]"),
    (lambda s: s["shots"][0].update(begin="continue"), "shots[0] (s1).begin"),
    (lambda s: (s["shots"][0].update(begin={"continue": "s2"}), s["shots"][1].update(begin={"continue": "s1"})),
     "(s1).begin"),
    (lambda s: s["shots"][2].update(id="s1"), "shots[2] (s1).id"),
    (lambda s: s["characters"].update(hero={"image": "missing.png"}), "characters.hero.image"),
    (lambda s: s["shots"][1].update(seconds=-1), "shots[1] (s2).seconds"),
    (lambda s: s["shots"][3].update(begin={"dissolve": 5}), "shots[3] (s4).begin"),
    (lambda s: s["shots"][2].update(width=128), "shots[2] (s3).width"),
], ids=["unknown-character", "continue-first", "cycle", "duplicate-id", "unreadable-reference", "bad-seconds",
        "dissolve-too-long", "another-size"])
def test_bad_stories_exit_2_naming_the_shot_and_field_and_submit_nothing(tmp_path, capsys, change, where):
    _hero(tmp_path / "hero.png")
    story = json.loads(json.dumps(STORY))
    change(story)
    code, _, err = _story(tmp_path, story, capsys=capsys)
    assert code == 2 and where in err and "nothing was submitted" in err, err
    assert not (tmp_path / "film.story" / "farm.db").exists()


def test_a_model_without_a_reference_mechanism_refuses_characters(tmp_path, capsys, tiny_wan_model):
    _hero(tmp_path / "hero.png")
    story = json.loads(json.dumps(STORY))
    story["model"] = tiny_wan_model
    code, _, err = _story(tmp_path, story, capsys=capsys)
    assert code == 2 and "shots[0] (s1).characters" in err and "reference mechanism" in err, err


def test_a_character_given_by_prompt_is_rendered_first_and_pinned(tmp_path, capsys, ray_session):
    from longtake.quality import classify_color, object_track

    story = {"style": "on a blue background", "label": "none",
             "characters": {"rival": {"prompt": "a green ball still"}},
             "shots": [{"id": "a", "prompt": "a green ball moving right", "seconds": 1, "characters": ["rival"]}]}
    code, summary, err = _story(tmp_path, story, capsys=capsys)
    assert code == 0, err
    picture, = (tmp_path / "film.story" / "characters").glob("rival-*.png")
    reference = load_image("rival", str(picture), SIZE, SIZE)
    assert classify_color(object_track(reference[None], BLUE)) == "green"
    shot = _frames(summary["shots"][0]["out"])
    assert identity(shot[:1], reference, BLUE)["colour_distance"] < 40  # pinned at the shot's first frame
    code, again, err = _story(tmp_path, story, capsys=capsys)  # the picture and the shot are reused
    assert code == 0 and not again["shots"][0]["rendered"] and len(list(picture.parent.glob("*.png"))) == 1
