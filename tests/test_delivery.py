"""The output sink chain (cluster/delivery.py), link by link and assembled: what each link does to the frames
it is given, across chunk boundaries, and the order that makes frames_sha256 the frames as generated."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from longtake.cluster.delivery import Delivery, FramesHash, Label, Previews, Tap, Watermark, Writer
from longtake.label import layout
from longtake.video import VideoWriter, preview_indices, probe, read_frames
from longtake.watermark import payload_of, read

W, H = 64, 64


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (n, H, W, 3), dtype=np.uint8)


def chunks(clip: np.ndarray, size: int):
    """(first, chunk) in order, as the engine's decode hands them on."""
    return [(i, clip[i:i + size]) for i in range(0, len(clip), size)]


def test_frames_hash_is_the_hash_of_the_whole_clip_whatever_the_chunks_and_changes_nothing():
    clip = frames(10)
    link, parts = FramesHash(), chunks(clip, 3)
    out = [link(first, chunk, True) for first, chunk in parts]
    assert link.sha256.hexdigest() == hashlib.sha256(clip.tobytes()).hexdigest()
    assert all(o is c for o, (_, c) in zip(out, parts))


def test_tap_sees_each_chunk_with_its_first_index():
    seen = []
    link = Tap(lambda first, f: seen.append((first, len(f))))
    for first, chunk in chunks(frames(7), 3):
        assert link(first, chunk, True) is chunk
    assert seen == [(0, 3), (3, 3), (6, 1)]


def test_the_label_is_drawn_on_its_span_only_across_chunk_boundaries_and_never_on_the_callers_frames():
    clip = frames(10)
    before = clip.copy()
    lay = layout("AI", "top-left", W, H)
    link = Label(lay, (4, 8))
    out = np.concatenate([link(first, chunk, True) for first, chunk in chunks(clip, 3)])
    assert np.array_equal(clip, before)  # the chain's earlier links (the hash, a tap) keep what they saw
    x0, y0, x1, y1 = lay.box
    inside = [np.any(out[i] != before[i]) for i in range(10)]
    assert inside == [i in range(4, 8) for i in range(10)]
    box = out[4:8, y0:y1, x0:x1]
    assert set(np.unique(box)) == {0, 255} and np.array_equal(out[4:8, y1:], before[4:8, y1:])  # the box, only


def test_the_watermark_marks_new_frames_only():
    clip = frames(24, seed=1)
    link = Watermark("job-42", W, H)
    marked = link(0, clip, True)
    assert not np.array_equal(marked, clip)
    assert int(read(marked)["payload"], 16) == payload_of("job-42")
    assert link(0, clip, False) is clip  # an extended or lead-into clip keeps whatever it carries


def test_writer_writes_every_frame_and_previews_keep_the_sampled_ones(tmp_path):
    clip = frames(20)
    previews = Previews(20)
    with VideoWriter(tmp_path / "w.mp4", W, H, 8) as video:
        link = Writer(video)
        for first, chunk in chunks(clip, 6):
            assert previews(first, link(first, chunk, True), True) is chunk
        assert video.frames_written == 20
    assert probe(tmp_path / "w.mp4")["frames"] == 20
    assert [i for i, _ in previews.kept] == list(preview_indices(20))
    assert all(np.array_equal(f, clip[i]) for i, f in previews.kept)


@pytest.fixture
def job(tmp_path):
    from longtake.cluster.engine import prepare

    return prepare(dict(prompt="a red ball moving right on a blue background", seconds=2, fps=8, label="start",
                        out=str(tmp_path / "out.mp4"), preview=str(tmp_path / "sheet.png")))


def test_delivery_hashes_before_it_marks_and_writes_the_file_with_its_contact_sheet(tmp_path, job):
    from longtake.provenance import Provenance

    clip = frames(job.output_frames, seed=2)
    seen = []
    with Delivery(job, Provenance.local(tmp_path / "home"), on_frames=lambda first, f: seen.append(f.copy())) as d:
        for first, chunk in chunks(clip, 5):
            d.write(chunk)
    assert d.frames_written == job.output_frames == 16 and d.labelled == 16  # 2 s of "start" labels all 16
    assert d.frames_sha256 == hashlib.sha256(clip.tobytes()).hexdigest()  # as generated: no label, no mark
    assert np.array_equal(np.concatenate(seen), clip)
    # what is written: the label on its span, then the mark on the new frames, in that order
    delivered = Watermark(d.produce_id, job.width, job.height)(0, Label(job.label, d.span)(0, clip, True), True)
    assert d.delivered_sha256 == hashlib.sha256(delivered.tobytes()).hexdigest() != d.frames_sha256
    assert len(read_frames(tmp_path / "out.mp4")) == 16 and (tmp_path / "sheet.png").is_file()


def test_delivery_leaves_no_file_when_the_job_stops_midway(tmp_path, job):
    from longtake.provenance import Provenance

    with pytest.raises(RuntimeError):
        with Delivery(job, Provenance.local(tmp_path / "home")) as d:
            d.write(frames(5))
            raise RuntimeError("cancelled mid-decode")
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "sheet.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == []
