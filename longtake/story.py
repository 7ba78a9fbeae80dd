"""Stories: a film of shots, each a farm job, joined into one MP4 and handed to an editor as OpenTimelineIO.

    style: "on a blue background"              # appended to every shot's prompt (and timeline key)
    characters:
      hero: {image: hero.png}                  # or {prompt: "..."}: a reference frame rendered first
    model: default                             # any render field here is every shot's default
    shots:
      - {id: s1, prompt: "a red ball moving right", seconds: 4, characters: [hero]}
      - {id: s2, prompt: "a red ball moving up", seconds: 3, begin: continue}       # extends s1
      - {id: s3, prompt: "a yellow square bouncing", seconds: 4}                    # begin: cut (the default)
      - {id: s4, prompt: "a red ball moving left", seconds: 3, begin: {dissolve: 1}}

How a shot begins:
- `cut`: an independent render; cut-separated shots have no dependencies and render at once.
- `continue` (or `{continue: ID}`: another shot than the one before): carries on from that shot's last frames
  (extend, `include_inputs` false: the shot's MP4 holds its own frames only); its job waits for that shot's.
- `{dissolve: SECONDS}`: the film crossfades the last SECONDS of the shot before into this shot's first
  SECONDS (an editor's dissolve: film.otio records it as an SMPTE dissolve on the cut). The two shots'
  media are independent, so a dissolve shot renders at once, like a cut: it waits for nothing.

Characters go through the model's reference mechanism (`reference`): the bundled model pins the picture at
the shot's first frame (its look: colour and shape; its motion plan starts from the object shown), an
AnimateDiff model with an IP-Adapter takes it as the image prompt, Wan-Animate animates it. A model with none
refuses a story with characters, naming the shot. A `continue` shot takes its look from the frames it
continues. One character per shot (every mechanism takes one picture).

A shot is content-addressed: the hash of its request (story defaults, style, begin), its character's picture
and the hash of the shot it continues. Its MP4 is STORE/shots/ID-HASH.mp4 (STORE: `film.story/` beside the
film); a shot whose MP4 exists for its hash is reused, so an edited story renders what changed and everything
downstream of it. `only`: render those shots (and any shot they need that has no MP4) and reuse the others'
newest MP4s as they are (STORE/story.json remembers them).

No torch, no Ray here: `load` reads and checks a story file, `plan` turns it into shot requests and hashes,
`check` runs every render check, `submit` queues the shots on a farm (jobs with dependencies: farm.py).
film.py joins the shots.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from longtake.media import file_sha256
from longtake.request import (LABEL_MODES, LABEL_POSITION, LABEL_POSITIONS, LABEL_TEXT, RenderRequest, RequestError,
                              parse_request)

STORY_KEYS = ("style", "characters", "shots", "label", "label_text", "label_position")  # besides render defaults
SHOT_KEYS = ("id", "characters", "begin")  # besides render fields
BEGINS = ("cut", "continue", "dissolve")
FILM_FIELDS = ("label", "label_text", "label_position")  # the film's visible label: a story's, not a shot's
SHOT_OWN = ("out", "preview", "extend", "lead_into", "include_inputs", "reference", "image", "keyframes", "video",
            "workers", "cp")  # render fields a story sets itself (or, for workers/cp, the runner)
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION = 1  # of the shot hash: a change in how shots are made re-renders them


@dataclass(frozen=True)
class Character:
    name: str
    image: str | None = None  # a picture (absolute path)
    prompt: str | None = None  # or a prompt whose first frame is rendered as the picture (film.character_frame)


@dataclass
class Shot:
    index: int
    id: str
    begin: str  # cut | continue | dissolve
    fields: dict  # the shot's render fields, story defaults and style applied (no outputs, no media)
    after: str | None = None  # the shot it continues
    dissolve: float = 0.0  # seconds crossfaded with the shot before
    character: str | None = None
    # set by plan():
    hash: str = ""
    out: str = ""
    request: dict = field(default_factory=dict)
    frames: int = 0  # the shot's own frames
    reused: bool = False  # an older MP4 kept as it is (`only`)

    @property
    def where(self) -> str:
        return f"shots[{self.index}] ({self.id})"


@dataclass
class Story:
    path: str
    style: str
    characters: dict[str, Character]
    shots: list[Shot]
    film: dict  # label, label_text, label_position

    def shot(self, shot_id: str) -> Shot:
        return next(s for s in self.shots if s.id == shot_id)


# ---------------------------------------------------------------- the file

def read(path: str) -> dict:
    """A story file (JSON if it ends in .json, else YAML) -> its mapping. RequestError naming `story`."""
    p = Path(path)
    if not p.is_file():
        raise RequestError("story", path, "an existing YAML or JSON story file")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError("story", path, f"a readable file ({e})") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RequestError("story", path, f"valid YAML or JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RequestError("story", path, "a mapping with `shots:` (and optional style, characters, defaults)")
    return data


def load(path: str) -> Story:
    """Read and check a story file: its keys, characters, shots, ids, beginnings and dependencies (no model
    is opened: `check` does the render checks). Media paths are relative to the file. RequestError naming the
    shot and the field."""
    base = Path(path).resolve().parent

    def picture(where: str, value) -> str:
        if not isinstance(value, str):
            raise RequestError(where, value, "a path to a picture")
        image = str((base / value).resolve())
        _check_picture(where, image)
        return image

    return parse(read(path), str(path), picture)


def parse(data: dict, name: str, picture, prompts: bool = True) -> Story:
    """A story from its mapping (`load`; serve's POST /v1/stories). `picture(field, value)`: a character
    image's local path (checked). `prompts`: whether a character may be given by prompt."""
    if not isinstance(data, dict):
        raise RequestError("story", data, "a mapping with `shots:` (and optional style, characters, defaults)")
    render_fields = set(RenderRequest.model_fields)
    for key in data:
        if key not in STORY_KEYS and key not in render_fields:
            raise RequestError(str(key), data[key], f"a story key ({', '.join(STORY_KEYS)}) or a render field "
                                                    "that every shot takes as its default")
        if key in SHOT_OWN or key in ("prompt", "timeline", "seconds"):
            raise RequestError(str(key), data[key], "no value at the story's level (a shot's own field)"
                               if key in ("prompt", "timeline", "seconds") else "no value (a story sets it itself)")
    style = data.get("style", "")
    if not isinstance(style, str):
        raise RequestError("style", style, "a string appended to every shot's prompt")
    film = {"label": data.get("label", "start"), "label_text": data.get("label_text", LABEL_TEXT),
            "label_position": data.get("label_position", LABEL_POSITION)}
    if film["label"] not in LABEL_MODES:
        raise RequestError("label", film["label"], f"one of {', '.join(LABEL_MODES)} (the film's visible label)")
    if film["label_position"] not in LABEL_POSITIONS:
        raise RequestError("label_position", film["label_position"], f"one of {', '.join(LABEL_POSITIONS)}")
    parse_request({"prompt": "-", **film})  # the label's text: one line that a label can show
    characters = _characters(data.get("characters") or {}, picture, prompts)
    defaults = {k: v for k, v in data.items() if k in render_fields and k not in FILM_FIELDS}
    shots = data.get("shots")
    if not isinstance(shots, list) or not shots:
        raise RequestError("shots", shots, "a non-empty list of shots ({id, prompt, seconds, ...})")
    parsed: list[Shot] = []
    for n, raw in enumerate(shots):
        parsed.append(_shot(n, raw, defaults, style, characters, parsed))
    for shot in parsed:  # `{continue: ID}` may name a later shot: checked once all are read
        if shot.after is not None and shot.after not in {s.id for s in parsed}:
            raise RequestError(f"{shot.where}.begin", {"continue": shot.after}, "the id of another shot of the "
                                                                                "story")
    _check_acyclic(parsed)
    return Story(name, style, characters, parsed, film)


def _characters(raw, picture, prompts: bool) -> dict[str, Character]:
    if not isinstance(raw, dict):
        raise RequestError("characters", raw, "a mapping of name -> {image: PATH} or {prompt: TEXT}")
    out = {}
    for name, spec in raw.items():
        where = f"characters.{name}"
        if not isinstance(name, str) or not ID_PATTERN.match(name):
            raise RequestError("characters", name, "names of letters, digits, '_', '.' or '-' (at most 64)")
        if not isinstance(spec, dict) or len(spec) != 1 or not set(spec) <= {"image", "prompt"}:
            raise RequestError(where, spec, "{image: PATH} (a picture of the character) or {prompt: TEXT} (a "
                                            "reference frame rendered first)")
        if "image" in spec:
            out[name] = Character(name, image=picture(f"{where}.image", spec["image"]))
        elif not prompts:
            raise RequestError(where, spec, "{image: FILE_ID}: a picture you uploaded (POST /v1/files; a character "
                                            "by prompt is rendered by `longtake story`)")
        else:
            if not isinstance(spec["prompt"], str) or not spec["prompt"].strip():
                raise RequestError(f"{where}.prompt", spec["prompt"], "a non-empty prompt")
            out[name] = Character(name, prompt=spec["prompt"])
    return out


def _check_picture(field_name: str, path: str) -> None:
    from longtake.media import load_image, probe_media

    info = probe_media(field_name, path)  # RequestError: missing, unreadable, too large
    if info["kind"] != "image":
        raise RequestError(field_name, path, "a picture (PNG, JPEG, WebP...), not a video")
    load_image(field_name, path, 8, 8)


def _shot(n: int, raw, defaults: dict, style: str, characters: dict, before: list[Shot]) -> Shot:
    where = f"shots[{n}]"
    if not isinstance(raw, dict):
        raise RequestError(where, raw, "a mapping {id, prompt or timeline, seconds, ...}")
    shot_id = raw.get("id")
    if not isinstance(shot_id, str) or not ID_PATTERN.match(shot_id):
        raise RequestError(f"{where}.id", shot_id, "an id of letters, digits, '_', '.' or '-' (at most 64)")
    where = f"{where} ({shot_id})"
    if any(s.id == shot_id for s in before):
        raise RequestError(f"{where}.id", shot_id, "an id no other shot has")
    fields = {**defaults}
    for key, value in raw.items():
        if key in SHOT_KEYS:
            continue
        if key in FILM_FIELDS:
            raise RequestError(f"{where}.{key}", value, "no value on a shot (the film has one label: give it at "
                                                        "the story's level)")
        if key in SHOT_OWN:
            raise RequestError(f"{where}.{key}", value, "no value (the story sets it: characters for a reference, "
                                                        "begin: continue to extend)")
        if key not in RenderRequest.model_fields:
            raise RequestError(f"{where}.{key}", value, f"a render field or one of {', '.join(SHOT_KEYS)}")
        fields[key] = value
    if "seconds" not in raw:
        raise RequestError(f"{where}.seconds", None, "the shot's length in seconds")
    if style:
        if isinstance(fields.get("prompt"), str):
            fields["prompt"] = f"{fields['prompt']} {style}"
        if isinstance(fields.get("timeline"), list):
            fields["timeline"] = [{**k, "prompt": f"{k['prompt']} {style}"} if isinstance(k, dict)
                                  and isinstance(k.get("prompt"), str) else k for k in fields["timeline"]]
    begin, after, dissolve = _begin(where, raw.get("begin", "cut"), n, before)
    names = raw.get("characters") or []
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise RequestError(f"{where}.characters", names, "a list of character names")
    for i, name in enumerate(names):
        if name not in characters:
            known = ", ".join(characters) or "none are defined"
            raise RequestError(f"{where}.characters[{i}]", name, f"one of the story's characters ({known})")
    if len(names) > 1:
        raise RequestError(f"{where}.characters", names, "at most one character per shot (a model's reference "
                                                         "mechanism takes one picture)")
    return Shot(n, shot_id, begin, fields, after, dissolve, names[0] if names else None)


def _begin(where: str, value, n: int, before: list[Shot]) -> tuple[str, str | None, float]:
    expected = "cut, continue, {continue: SHOT_ID} or {dissolve: SECONDS}"
    if isinstance(value, str):
        kind, arg = value, None
    elif isinstance(value, dict) and len(value) == 1:
        (kind, arg), = value.items()
    else:
        raise RequestError(f"{where}.begin", value, expected)
    if kind not in BEGINS or (kind == "cut" and arg is not None):
        raise RequestError(f"{where}.begin", value, expected)
    if kind == "cut":
        return "cut", None, 0.0
    if kind == "continue":
        if arg is None:
            if n == 0:
                raise RequestError(f"{where}.begin", value, "cut for the first shot (there is no shot before it "
                                                            "to continue; or {continue: SHOT_ID})")
            return "continue", before[-1].id, 0.0
        if not isinstance(arg, str):
            raise RequestError(f"{where}.begin", value, "{continue: SHOT_ID}: the id of the shot it continues")
        return "continue", arg, 0.0
    if n == 0:
        raise RequestError(f"{where}.begin", value, "cut for the first shot (there is no shot before it to "
                                                    "dissolve from)")
    if isinstance(arg, bool) or not isinstance(arg, (int, float)) or not arg > 0:
        raise RequestError(f"{where}.begin", value, "{dissolve: SECONDS} with SECONDS > 0")
    return "dissolve", None, float(arg)


def _check_acyclic(shots: list[Shot]) -> None:
    after = {s.id: s.after for s in shots}
    for shot in shots:
        seen, at = [shot.id], shot.after
        while at is not None:
            if at in seen:
                raise RequestError(f"{shot.where}.begin", {"continue": shot.after},
                                   f"a shot that does not depend on itself ({' -> '.join([*seen, at])})")
            seen.append(at)
            at = after.get(at)


# ---------------------------------------------------------------- shots as requests

def store_dir(out: str | Path) -> Path:
    """Where a film's shots and state live: `film.story/` beside `film.mp4`."""
    out = Path(out).resolve()
    return out.with_name(out.stem + ".story")


def order(story: Story) -> list[Shot]:
    """The shots, every one after the shot it continues."""
    done, out = set(), []
    pending = list(story.shots)
    while pending:
        for shot in pending:
            if shot.after is None or shot.after in done:
                out.append(shot)
                done.add(shot.id)
                pending.remove(shot)
                break
    return out


def manifest(store: Path) -> dict:
    """STORE/story.json: {shot id: {"hash", "out", "job"}} of the newest render of every shot."""
    path = store / "story.json"
    try:
        return json.loads(path.read_text()).get("shots", {})
    except (OSError, ValueError):
        return {}


def save_manifest(store: Path, shots: dict) -> None:
    path = store / "story.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps({"shots": shots}, indent=2))
    tmp.replace(path)


def plan(story: Story, store: Path, references: dict[str, str], only: list[str] | None = None) -> list[Shot]:
    """Each shot's request, hash and MP4 path (set on the story's shots), in dependency order. `references`: character name -> its
    picture (a rendered one for a prompt; None before it is: the shot is planned without it, for `check`).
    With `only`, a shot not named that has an MP4 from an earlier run
    (story.json) keeps it (`reused`), whatever its hash is now."""
    if only:
        for i, name in enumerate(only):
            if name not in {s.id for s in story.shots}:
                raise RequestError(f"only[{i}]", name, f"a shot id of the story ({', '.join(s.id for s in story.shots)})")
    kept = manifest(store)
    shots = order(story)
    for shot in shots:
        request = dict(shot.fields)
        request["label"] = "none"  # the film carries the visible label (film.py); each shot its metadata and mark
        ref_hash = None
        if shot.after is not None:
            prev = story.shot(shot.after)
            request.update(extend=prev.out, include_inputs=False)
        elif shot.character is not None and references.get(shot.character):
            request["reference"] = references[shot.character]
            ref_hash = file_sha256(references[shot.character])
        key = {k: v for k, v in request.items() if k not in ("extend", "reference")}
        digest = json.dumps({"v": VERSION, "request": key, "after": story.shot(shot.after).hash if shot.after else None,
                             "reference": ref_hash}, sort_keys=True, default=str)
        shot.hash = hashlib.sha256(digest.encode()).hexdigest()[:16]
        old = kept.get(shot.id)
        if only and shot.id not in only and old and Path(old["out"]).is_file():
            shot.hash, shot.out, shot.reused = old["hash"], old["out"], True
        else:
            shot.out = str(store / "shots" / f"{shot.id}-{shot.hash}.mp4")
        request.update(out=shot.out, preview=str(Path(shot.out).with_suffix(".png")))
        shot.request = request
    return shots


def check(story: Story, store: Path, prepare=None) -> dict:
    """Every render check of every planned shot (`plan`) before anything is queued (a continued shot's input is not made yet:
    it is checked without it), that shots share one frame size and rate, that the model has a reference
    mechanism where a shot shows a character, and that dissolves fit their shots. Returns {"width", "height",
    "fps"}. RequestError naming the shot. `prepare(request)`: the checks of a request -> its engine.Job
    (default: engine.prepare without decoding media; serve's adds its limits)."""
    if prepare is None:
        from longtake.cluster.engine import prepare as engine_prepare

        prepare = lambda request: engine_prepare(request, pixels=False)  # noqa: E731
    geometry = None
    for shot in story.shots:
        request = {k: v for k, v in shot.request.items() if k not in ("extend", "include_inputs", "preview")}
        request["out"] = str(store / "check.mp4")
        try:
            job = prepare(request)
        except RequestError as e:
            raise RequestError(f"{shot.where}.{e.field}", e.value, e.expected) from None
        if shot.character is not None and not _takes_reference(job.model):
            raise RequestError(f"{shot.where}.characters", [shot.character],
                               f"a model with a reference mechanism ({job.model.path} has none: the bundled model, "
                               "an AnimateDiff model with an IP-Adapter or Wan-Animate do)")
        mine = {"width": job.width, "height": job.height, "fps": job.request.fps}
        if geometry is None:
            geometry = mine
        for key in ("width", "height", "fps"):
            if mine[key] != geometry[key]:
                raise RequestError(f"{shot.where}.{key}", mine[key], f"{geometry[key]} as the first shot (a film has "
                                                                     "one frame size and rate)")
        shot.frames = job.new_frames
    for n, shot in enumerate(story.shots):
        if shot.begin == "dissolve":
            d = dissolve_frames(shot, geometry["fps"])
            most = min(story.shots[n - 1].frames, shot.frames)
            if not 1 <= d <= most:
                raise RequestError(f"{shot.where}.begin", {"dissolve": shot.dissolve},
                                   f"a dissolve of 1 to {most} frames ({most / geometry['fps']:g} s: the shorter of "
                                   f"the two shots) at {geometry['fps']:g} fps")
    return geometry


def dissolve_frames(shot: Shot, fps: float) -> int:
    return round(shot.dissolve * fps) if shot.begin == "dissolve" else 0


def _takes_reference(model) -> bool:
    return bool(model.options.get("planner") or model.options.get("ip_adapter")
                or model.options.get("reference") == "condition")
