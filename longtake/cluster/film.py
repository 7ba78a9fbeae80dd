"""A story on the farm, and its film: every shot a farm job (story.py makes the requests), the film joined
from the shots' MP4s, and film.otio for an editor.

`submit` queues the shots that have no MP4 for their hash as jobs with dependencies (a `continue` shot waits
for the shot it continues; cuts and dissolves wait for nothing), each with the token `story-HASH`: the same
story submitted again is the same jobs, a failed or cancelled shot is retried, a done one reused.
`character_frames` renders the reference frame of a character given by prompt (one frame, in process, on
the machine running `longtake story`; cached by the hash of its request).

`assemble` joins the shots frame-exactly: each shot's frames decoded once, a dissolve's frames crossfaded
(the shot before's last d frames with this one's first d, weights (k + 1) / (d + 1)), and the film encoded
once through the delivery chain's links (delivery.py): one visible label on the film's opening seconds (the
story's label), one watermark naming the film, AIGC metadata whose `story_shots` lists every shot's
ProduceID (its farm job id). `timeline` writes film.otio: one clip per shot (its MP4, the frames the film
shows of it, the prompt in its metadata), SMPTE dissolves where the story has them (centred on the cut: the
shots' frames under the dissolve are the clips' handles), and film.edl through OTIO's CMX 3600 adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from longtake.cluster import farm
from longtake.cluster.delivery import FramesHash, Label, Watermark, Writer
from longtake.label import labelled_span, layout as layout_label
from longtake.media import video_chunks
from longtake.provenance import Provenance
from longtake.request import RenderRequest, RequestError
from longtake.story import Shot, Story, dissolve_frames, manifest, save_manifest
from longtake.video import VideoWriter

logger = logging.getLogger(__name__)

def character_frames(story: Story, store: Path) -> dict[str, str]:
    """Character name -> its picture: the given image, or for a prompt the first frame of a render of it
    with the story's defaults (STORE/characters/NAME-HASH.png, reused while the request is the same)."""
    from PIL import Image

    from longtake import render

    out = {}
    for name, character in story.characters.items():
        if character.image is not None:
            out[name] = character.image
            continue
        users = [s for s in story.shots if s.character == name]
        base = {k: v for k, v in (users[0].fields if users else {}).items()
                if k not in ("prompt", "timeline", "seconds")}
        fps = base.get("fps", RenderRequest.model_fields["fps"].default)
        request = {**base, "prompt": f"{character.prompt} {story.style}".strip(), "seconds": 1 / fps,
                   "label": "none"}
        digest = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = store / "characters" / f"{name}-{digest}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            frames = []
            try:
                render({**request, "out": str(path.with_suffix(".mp4"))}, in_process=True,
                       on_frames=lambda first, f: frames.extend(f))
            except RequestError as e:
                raise RequestError(f"characters.{name}.{e.field}", e.value, e.expected) from None
            Image.fromarray(frames[0]).save(path)
        out[name] = str(path)
    return out


# ---------------------------------------------------------------- the farm

def submit(farm_dir: Path, story: Story, shots: list[Shot], priority: int = 0) -> dict[str, farm.JobRecord]:
    """Queue the shots that need a render (module docstring). Returns {shot id: its job} (None for a shot
    kept from an earlier run with `only`)."""
    store = farm.open_store(farm_dir)
    for shot in shots:
        Path(shot.out).parent.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, farm.JobRecord | None] = {}
    name = Path(story.path).name
    for shot in shots:  # dependency order: a continued shot's job exists first
        if shot.reused:
            jobs[shot.id] = None
            continue
        depends = [jobs[shot.after].id] if shot.after is not None and jobs.get(shot.after) is not None else []
        meta = {"film": name, "shot": shot.id, "begin": shot.begin, "after": shot.after}
        for attempt in range(100):
            key = f"submit:story-{shot.hash}" + (f"-{attempt}" if attempt else "")
            record = store.get_by_key(key)
            if record is not None and record.state == "deleted":
                continue
            if record is None:
                record, _ = store.create(shot.request, priority=priority, idempotency_key=key, depends=depends,
                                         story=meta)
                d = farm.job_dir(farm_dir, record.id)
                d.mkdir(parents=True, exist_ok=True)
                (d / "request.json").write_text(json.dumps(shot.request, indent=2))
                farm.append_log(d, f"submitted: shot {shot.id} of {name}" + (f", after job {depends[0]}"
                                                                             if depends else ""))
            elif record.state == "done" and not Path(shot.out).is_file():  # its MP4 was removed: again
                continue
            elif record.state in ("failed", "cancelled"):
                record = farm.control(farm_dir, "retry", record.id)
            break
        jobs[shot.id] = record
    return jobs


def wait(farm_dir: Path, jobs: dict, alive=lambda: True, poll_s: float = 0.5) -> dict[str, farm.JobRecord]:
    """Wait until every job is done, failed, cancelled or deleted; RuntimeError when `alive()` (the runner
    rendering them here) turns false first."""
    store = farm.open_store(farm_dir)
    while True:
        now = {shot: store.get(r.id) for shot, r in jobs.items() if r is not None}
        if all(r.state in ("done", "failed", "cancelled", "deleted") for r in now.values()):
            return now
        if not alive():
            raise RuntimeError("the farm runner stopped before the story's shots were done")
        time.sleep(poll_s)


def record_shots(store: Path, shots: list[Shot], done: dict) -> None:
    """Remember every shot's newest MP4 (story.json: what `only` reuses)."""
    kept = manifest(store)
    for shot in shots:
        record = done.get(shot.id)
        if record is not None and record.state == "done":
            kept[shot.id] = {"hash": shot.hash, "out": shot.out, "job": record.id}
    save_manifest(store, kept)


# ---------------------------------------------------------------- the film

def _frames(shot: Shot, width: int, height: int, fps: float):
    for chunk in video_chunks(shot.id, shot.out, fps, width, height):
        yield from chunk


def assemble(story: Story, out: str, geometry: dict, produce_ids: dict[str, str], provenance: Provenance) -> dict:
    """Write the film of the story's planned shots (module docstring). Returns {"frames", "cuts" (film frame of
    every shot's first frame shown), "dissolves" ([first, last) film frames), "frames_sha256", "produce_id"}."""
    width, height, fps = geometry["width"], geometry["height"], geometry["fps"]
    ordered = story.shots  # film order
    total = sum(s.frames for s in ordered) - sum(dissolve_frames(s, fps) for s in ordered)
    film = story.film
    request = {"story": Path(story.path).name, "shots": [[s.id, s.hash] for s in ordered], **film,
               "model": ",".join(sorted({str(s.request.get("model", "default")) for s in ordered})),
               "seed": ",".join(str(s.request.get("seed", 0)) for s in ordered)}
    produce_id = provenance.produce_id_for(request)
    provenance = Provenance(key=provenance.key, producer=provenance.producer, produce_id=produce_id,
                            extra={"story_shots": json.dumps({s.id: produce_ids.get(s.id, "") for s in ordered},
                                                             separators=(",", ":"))},
                            c2pa=provenance.c2pa)
    lay = layout_label(film["label_text"], film["label_position"], width, height) if film["label"] != "none" else None
    span = labelled_span(film["label"], fps, 0, total, total) if lay is not None else (0, 0)
    hashes = FramesHash()
    label = {"mode": film["label"], "text": film["label_text"], "position": film["label_position"], "frames": span}
    tags = lambda stream: provenance.tags(request=request, frames_sha256=hashes.sha256.hexdigest(),  # noqa: E731
                                          delivered_sha256=video.sha256, stream_sha256=stream, label=label)
    sign = (lambda src, dst: provenance.sign(src, dst, Path(out).name)) if provenance.c2pa else None
    video = VideoWriter(out, width, height, fps, tags=tags, sign=sign)
    links = [hashes, *([Label(lay, span)] if lay is not None else []), Watermark(produce_id, width, height),
             Writer(video)]
    cuts, dissolves = [], []

    def write(frames: list[np.ndarray]) -> None:
        if frames:
            chunk, first = np.stack(frames), video.frames_written
            for link in links:
                chunk = link(first, chunk, True)

    with video:
        held: list[np.ndarray] = []  # the shot before's last frames, under the next shot's dissolve
        for n, shot in enumerate(ordered):
            d_next = dissolve_frames(ordered[n + 1], fps) if n + 1 < len(ordered) else 0
            d = dissolve_frames(shot, fps)
            start = video.frames_written
            cuts.append(start)
            if d:
                dissolves.append((start, start + d))
            pending: list[np.ndarray] = []
            count = 0
            for k, frame in enumerate(_frames(shot, width, height, fps)):
                count += 1
                if k < d:  # under the dissolve: crossfaded with the shot before's tail
                    a = (k + 1) / (d + 1)
                    frame = np.round(held[k].astype(np.float32) * (1 - a) + frame.astype(np.float32) * a
                                     ).astype(np.uint8)
                pending.append(frame)
                if len(pending) > d_next + 8:  # write all but what the next dissolve needs
                    write(pending[:len(pending) - d_next])
                    pending = pending[len(pending) - d_next:]
            if count != shot.frames:
                raise RuntimeError(f"shot {shot.id}: {shot.out} has {count} frames, expected {shot.frames}")
            held = pending[len(pending) - d_next:] if d_next else []
            write(pending[:len(pending) - d_next] if d_next else pending)
    return {"frames": video.frames_written, "cuts": cuts, "dissolves": dissolves,
            "frames_sha256": hashes.sha256.hexdigest(), "produce_id": produce_id}


def timeline(story: Story, path: str, fps: float, produce_ids: dict[str, str],
             url=lambda shot: Path(shot.out).resolve().as_uri()) -> list[str]:
    """film.otio (and film.edl where OTIO's CMX 3600 adapter is installed and takes the rate): module
    docstring. `url(shot)`: its media reference (default: its MP4's file:// URL). Returns the files written."""
    import opentimelineio as otio

    ordered = story.shots  # film order
    rt = lambda frames: otio.opentime.RationalTime(frames, fps)  # noqa: E731
    tl = otio.schema.Timeline(name=Path(path).stem)
    tl.global_start_time = rt(0)
    track = otio.schema.Track(name="V1", kind=otio.schema.TrackKind.Video)
    tl.tracks.append(track)
    for n, shot in enumerate(ordered):
        d_in = dissolve_frames(shot, fps)
        d_out = dissolve_frames(ordered[n + 1], fps) if n + 1 < len(ordered) else 0
        # the dissolve into this shot spans [cut - in, cut + out) with in = d // 2: this clip's source starts
        # `in` frames into its MP4 (the frames before are its handle), the one before ends `out` frames before
        # its MP4 does (the frames after are the handle)
        if d_in:
            track.append(otio.schema.Transition(
                name=f"dissolve into {shot.id}", transition_type=otio.schema.TransitionTypes.SMPTE_Dissolve,
                in_offset=rt(d_in // 2), out_offset=rt(d_in - d_in // 2)))
        start, tail = d_in // 2, d_out - d_out // 2
        media = otio.schema.ExternalReference(target_url=url(shot),
                                              available_range=otio.opentime.TimeRange(rt(0), rt(shot.frames)))
        clip = otio.schema.Clip(name=shot.id, media_reference=media,
                                source_range=otio.opentime.TimeRange(rt(start), rt(shot.frames - start - tail)))
        clip.metadata["longtake"] = {"prompt": shot.request.get("prompt"), "timeline": shot.request.get("timeline"),
                                     "begin": shot.begin, "after": shot.after, "hash": shot.hash,
                                     "produce_id": produce_ids.get(shot.id, ""), "seed": shot.request.get("seed", 0),
                                     "model": shot.request.get("model", "default")}
        track.append(clip)
    otio.adapters.write_to_file(tl, path)
    written = [path]
    edl = str(Path(path).with_suffix(".edl"))
    try:
        otio.adapters.write_to_file(tl, edl, adapter_name="cmx_3600")
        written.append(edl)
    except Exception as e:  # noqa: BLE001 - the adapter missing or refusing the rate: the OTIO is the deliverable
        logger.info("no EDL written (%s: %s); film.otio has the edit", type(e).__name__, e)
    return written
