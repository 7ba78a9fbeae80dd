"""Stories over HTTP (`POST /v1/stories`): a story (story.py's mapping, as JSON) whose shots become this
server's jobs with dependencies, and a film joined once they are done (cluster/film.py).

A character is an uploaded picture (`{"image": FILE_ID}`, the client's own upload); a character by prompt
is the CLI's. Shots take the served model; each is checked as `POST /v1/videos` checks a request (limits,
cost), named `shots[i] (ID).field`, before any job is made, and the client's job limit counts every shot.
A `continue` shot's job extends the video of the shot it continues (`extend: "job:ID"` in its stored
request, resolved to that job's video when it runs: no server path in what a client reads). Without
--allow-unlabelled every shot carries the label, as every video of this server does.

DATA_DIR/stories/ID/story.json holds what the film needs (shots, their jobs, dissolves, the film's label)
and its state; the manager's scheduler joins the film (film.mp4, film.otio whose media references are the
shots' API URLs) once every shot is done, or fails the story when one fails, is cancelled or deleted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path

from longtake.cluster.jobs import ClientFull, QueueFull, iso
from longtake.request import RequestError
from longtake.story import Shot, Story, check, parse, plan

logger = logging.getLogger(__name__)

JOB_REF = "job:"  # a stored shot request's `extend`: the video of that job of the same story
FINAL_SHOT = ("failed", "cancelled", "deleted")


class StoryBook:
    def __init__(self, manager):
        self.manager = manager
        self.root = Path(manager.data_dir) / "stories"
        self._assembling: set[str] = set()
        self._lock = threading.Lock()
        # the stories whose film is not joined yet (what `tick` looks at): read from disk once, then kept here
        self._pending = {d.name for d in (self.root.iterdir() if self.root.is_dir() else ())
                         if (state := self._load(d.name)) is not None and state["status"] not in ("done", "failed")}

    def dir(self, story_id: str) -> Path:
        return self.root / story_id

    # -- submit
    def submit(self, body: dict, client: str | None, max_jobs: int | None) -> dict:
        """Check a story and queue its shots; its status. RequestError (bad input, over a limit)."""
        from longtake.serve.files import owner_of

        m = self.manager
        owner = owner_of(client) if client is not None else None
        ids: dict[str, str] = {}  # a character's local path -> its file id

        def picture(where: str, value) -> str:
            if not isinstance(value, str):
                raise RequestError(where, value, "the id of a picture you uploaded (POST /v1/files)")
            try:
                path = m.files.path("image", value, owner)
            except RequestError as e:
                raise RequestError(where, value, e.expected) from None
            ids[path] = value
            return path

        story = parse(body, "story", picture, prompts=False)
        if "model" in body:
            m.check_model("model", body["model"])
        for shot in story.shots:
            if shot.fields.get("model") is not None:
                m.check_model(f"{shot.where}.model", shot.fields["model"])
            shot.fields["model"] = m.model
        if story.film["label"] == "none" and not m.limits.allow_unlabelled:
            raise RequestError("label", "none", "start or always: this server labels every video (started without "
                                                "--allow-unlabelled)")
        story_id = uuid.uuid4().hex[:16]
        shots = plan(story, self.dir(story_id), {n: c.image for n, c in story.characters.items()})
        if not m.limits.allow_unlabelled:  # every video of this server is labelled, a story's shots too
            for shot in shots:
                shot.request["label"] = "start"

        def prepare(request: dict):
            return m._check({k: v for k, v in request.items() if k not in ("out", "preview")})

        geometry = check(story, self.dir(story_id), prepare)
        active = m.store.count(("queued", "running", "paused"), client=client) if client is not None else 0
        if max_jobs is not None and active + len(shots) > max_jobs:
            raise ClientFull(f"a story of {len(shots)} shots and {active} jobs of yours queued, running or paused: "
                            f"at most {max_jobs}")
        if m.store.count(("queued", "running")) + len(shots) > m.limits.max_queued:
            raise QueueFull(f"a story of {len(shots)} shots: at most {m.limits.max_queued} jobs queued or running")
        jobs: dict[str, str] = {}
        for shot in shots:  # dependency order
            stored = {k: v for k, v in shot.request.items()
                      if k not in ("out", "preview", "extend", "include_inputs", "reference")}
            stored["model"] = m.model_name
            if shot.after is not None:
                stored.update(extend=JOB_REF + jobs[shot.after], include_inputs=False)
            elif "reference" in shot.request:
                stored["reference"] = ids[shot.request["reference"]]
            record, _ = m.store.create(stored, client=client, depends=[jobs[shot.after]] if shot.after else [],
                                       story={"film": story_id, "shot": shot.id, "begin": shot.begin,
                                              "after": shot.after})
            jobs[shot.id] = record.id
            m._log(record.id, f"queued by {client or '-'}: shot {shot.id} of story {story_id}")
        self.dir(story_id).mkdir(parents=True, exist_ok=True)
        state = {"id": story_id, "client": client, "created": time.time(), "status": "queued", "error": None,
                 "film": story.film, "geometry": geometry, "style": story.style,
                 "shots": [{"id": s.id, "job": jobs[s.id], "begin": s.begin, "after": s.after,
                            "dissolve": s.dissolve, "frames": s.frames, "hash": s.hash,
                            "request": {k: s.request.get(k) for k in ("prompt", "timeline", "seed")}}
                           for s in story.shots]}
        self._save(state)
        with self._lock:
            self._pending.add(story_id)
        m._wake.set()
        return self._status(state)

    # -- read
    def get(self, story_id: str, client: str | None) -> dict | None:
        state = self._load(story_id)
        if state is None or (client is not None and state["client"] != client):
            return None
        return self._status(state)

    def file(self, story_id: str, name: str, client: str | None) -> str | None:
        state = self._load(story_id)
        if state is None or (client is not None and state["client"] != client) or state["status"] != "done":
            return None
        path = self.dir(story_id) / name
        return str(path) if path.is_file() else None

    def _status(self, state: dict) -> dict:
        shots = []
        for shot in state["shots"]:
            record = self.manager.store.get(shot["job"])
            shots.append({"id": shot["id"], "job": shot["job"], "begin": shot["begin"], "after": shot["after"],
                          "status": record.state if record else "deleted",
                          "progress": (record.to_dict()["progress"] if record else None)})
        status = state["status"]
        if status not in ("done", "failed"):
            status = "running" if any(s["status"] in ("running", "done") for s in shots) else "queued"
        return {"id": state["id"], "status": status, "created": iso(state["created"]), "error": state["error"],
                "frames": state.get("frames"), "shots": shots}

    def _load(self, story_id: str) -> dict | None:
        if not (len(story_id) == 16 and all(c in "0123456789abcdef" for c in story_id)):
            return None
        try:
            return json.loads((self.dir(story_id) / "story.json").read_text())
        except (OSError, ValueError):
            return None

    def _save(self, state: dict) -> None:
        path = self.dir(state["id"]) / "story.json"
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    # -- the film (the manager's scheduler calls `tick`)
    def tick(self) -> None:
        """Join the film of every story whose shots are done (in a thread each); fail one whose shot failed."""
        with self._lock:
            waiting = self._pending - self._assembling
        for story_id in waiting:
            state = self._load(story_id)
            if state is None:
                continue
            records = [self.manager.store.get(s["job"]) for s in state["shots"]]
            bad = [(s, r) for s, r in zip(state["shots"], records) if r is None or r.state in FINAL_SHOT]
            if bad:
                shot, record = bad[0]
                state.update(status="failed", error=f"shot {shot['id']} (job {shot['job']}) is "
                                                    f"{record.state if record else 'deleted'}")
                self._save(state)
                with self._lock:
                    self._pending.discard(story_id)
            elif all(r.state == "done" for r in records):
                with self._lock:
                    self._assembling.add(story_id)
                threading.Thread(target=self._assemble, args=(state,), daemon=True, name=f"film-{story_id}").start()

    def _assemble(self, state: dict) -> None:
        from longtake.cluster import film
        from longtake.provenance import Provenance

        m, d = self.manager, self.dir(state["id"])
        try:
            story = self._story(state)
            produce_ids = {s["id"]: s["job"] for s in state["shots"]}
            summary = film.assemble(story, str(d / "film.mp4"), state["geometry"], produce_ids,
                                    Provenance.local(m.data_dir))
            film.timeline(story, str(d / "film.otio"), state["geometry"]["fps"], produce_ids,
                          url=lambda shot: f"/v1/videos/{produce_ids[shot.id]}/content")
            state.update(status="done", frames=summary["frames"])
        except Exception as e:  # noqa: BLE001 - the story fails, naming why; the server goes on
            logger.exception("story %s: the film failed", state["id"])
            state.update(status="failed", error=f"the film could not be joined: {type(e).__name__}")
        finally:
            self._save(state)
            with self._lock:
                self._assembling.discard(state["id"])
                self._pending.discard(state["id"])

    def _story(self, state: dict) -> Story:
        shots = []
        for n, s in enumerate(state["shots"]):
            shot = Shot(n, s["id"], s["begin"], {}, s["after"], s["dissolve"])
            shot.hash, shot.frames = s["hash"], s["frames"]
            shot.out = str(self.manager.job_dir(s["job"]) / "video.mp4")
            shot.request = {**s["request"], "model": self.manager.model_name}
            shots.append(shot)
        return Story(state["id"], state["style"], {}, shots, state["film"])


def resolve(body: dict, job_dir) -> tuple[dict, str | None]:
    """A stored shot request -> (the request without a job reference, the path its `extend` names)."""
    ref = body.get("extend")
    if isinstance(ref, str) and ref.startswith(JOB_REF):
        body = {k: v for k, v in body.items() if k != "extend"}
        return body, str(job_dir(ref[len(JOB_REF):]) / "video.mp4")
    return body, None

