"""The HTTP API's typed contract: the request body as this server accepts it, and every response shape.

The body of `POST /v1/videos` is read by the ingress itself (so that its size is bounded while it streams),
so FastAPI cannot infer its schema: `request_schema()` builds it from RenderRequest's JSON schema, the
single-field rules of request.FIELD_BOUNDS, this server's limits (serve.limits.Limits) and the served
model's rules (size multiple, longest window). What JSON Schema cannot say (rules between fields, the cost
of a request, whether a file id exists) is listed in `x-rules`, each with the fields its 422 may name.

Every error answers `Error`: {"detail": {"field": the request field, header or parameter at fault, or
null, "error": a message naming the value and what was expected}}.

Plain pydantic: no Ray, no torch.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, Field

from longtake.cluster.jobs import PROGRESS_KEYS, STATES
from longtake.request import FIELD_BOUNDS, LABEL_MODES, MAX_FPS, MAX_SECONDS, STEPS_RANGE, RenderRequest

# fields a client may not set over HTTP, and why: a request naming one is refused (422)
SERVER_FIELDS = {"out": "the server chooses output paths", "preview": "the server chooses output paths",
                 "device": "the server chooses where its workers run", "workers": "the server's replicas do the work",
                 "cp": "the server's replicas are its groups (longtake serve --cp)",
                 "cp_mode": "the server's groups attend as its model allows (longtake serve --cp)",
                 "reference_pose": "keypoint files are read on the CLI and the farm; over HTTP give a pose video"}
FILE_ID = r"^file-[0-9a-f]{24}$"


class ErrorDetail(BaseModel):
    field: str | None = Field(None, description="The request field, header or parameter at fault, if one is.")
    error: str = Field(description="What was wrong: the value and what was expected.")


class Error(BaseModel):
    """The one shape of every error response."""

    detail: ErrorDetail


class Progress(BaseModel):
    phase: str | None = None
    step: int | None = Field(None, description="Steps completed by every window.")
    steps: int | None = None
    window_steps_done: int | None = None
    window_steps_total: int | None = None
    frames_done: int | None = None
    frames: int | None = None
    eta_s: float | None = None
    windows: list[int] | None = Field(None, description="Each window's steps predicted: the window x step grid.")
    running: list[int] | None = Field(None, description="The windows predicting now.")
    workers: list[dict[str, Any]] | None = Field(
        None, description="The job's workers (those its pool knows): node, state, the window and step each "
                          "computes now, busy seconds, utilisation over the last 5 minutes, window-steps, bytes, "
                          "failed tasks, restarts.")


assert tuple(Progress.model_fields) == PROGRESS_KEYS  # one list of progress keys (cluster/jobs.py)


class Job(BaseModel):
    """A job's status (the shape of `longtake status --json` too)."""

    id: str
    status: Literal[STATES]
    priority: int
    created: str = Field(description="ISO 8601, UTC.")
    updated: str = Field(description="ISO 8601, UTC.")
    request: dict[str, Any] = Field(description="The request as submitted (files named by id).")
    progress: Progress
    error: str | None = None
    result: dict[str, Any] | None = Field(None, description="The render summary, once done.")
    client: str | None = Field(None, description="The API client (key name) that submitted it.")
    depends: list[str] = Field([], description="The jobs it waits for (a story's shot: the shot it continues).")
    story: dict[str, Any] | None = Field(None, description="A story's shot: {film (the story id), shot, begin, "
                                                           "after}.")


class StoryShot(BaseModel):
    id: str
    job: str = Field(description="The shot's job (GET /v1/videos/{job}).")
    begin: str
    after: str | None = None
    status: str
    progress: Progress | None = None


class Story(BaseModel):
    """A story's status: its shots' jobs, and once they are done the film (GET /v1/stories/{id}/content)."""

    id: str
    status: Literal["queued", "running", "done", "failed"]
    created: str = Field(description="ISO 8601, UTC.")
    error: str | None = None
    frames: int | None = Field(None, description="The film's frames, once done.")
    shots: list[StoryShot]


class JobList(BaseModel):
    data: list[Job]
    limit: int
    offset: int
    total: int


class Accepted(BaseModel):
    id: str
    status: Literal[STATES]


class Changed(BaseModel):
    """A job cancelled or deleted: its new status and the one it had."""

    id: str
    status: Literal[STATES]
    was: Literal[STATES]


class FileMeta(BaseModel):
    id: str
    object: Literal["file"]
    kind: Literal["image", "video"]
    bytes: int
    sha256: str
    created_at: int
    filename: str
    width: int | None = None
    height: int | None = None
    seconds: float | None = None


class FileDeleted(BaseModel):
    id: str
    deleted: bool


class Links(BaseModel):
    """Signed, short-lived URLs of a done job's files: they work without the Authorization header (for
    `<video src>` and `<img src>`), for this job and file only, until `expires`."""

    content: str
    preview: str
    expires: str


class Me(BaseModel):
    name: str
    admin: bool
    max_jobs: int = Field(description="Jobs this key may have queued, running or paused at once.")


class Workers(BaseModel):
    workers: list[dict[str, Any]] = Field(
        description="The denoiser replicas (shared by every job), as they report themselves: replica id, node, "
                    "state (starting, idle, busy, stopped, lost), the task each computes now (its window and "
                    "step: of whichever job it serves), busy seconds, utilisation over the last 5 minutes, "
                    "window-steps, bytes, failed tasks.")


def errors(*codes: int) -> dict:
    """OpenAPI `responses` for these error codes, each with the Error shape."""
    text = {400: "Malformed body", 401: "Missing key", 403: "Wrong key", 404: "No such job or file (of yours)",
            409: "Conflict with the job's state", 410: "Deleted (on request, or its retention expired)",
            413: "Body or file too large (or over this key's upload bytes)", 415: "Unsupported content type",
            422: "Invalid input", 429: "Too many: jobs (the server's queue, or this key's limit; retry after "
                                     "Retry-After seconds), this key's uploaded files or its open event streams"}
    return {code: {"model": Error, "description": text[code]} for code in codes}


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its definitions inlined (OpenAPI keeps them elsewhere)."""
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if set(node) == {"$ref"}:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


def _value(prop: dict) -> dict:
    """The non-null branch of an optional property (or the property itself)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


# rules between fields, cost and state: what a body valid against the schema may still be refused for
# (422), and the fields such a 422 names
RULES = [
    ("exactly one of prompt or timeline", ["prompt"]),
    ("negative is an alias of negative_prompt: not both", ["negative_prompt"]),
    ("timeline keys: at from 0 to below seconds, increasing; prompts not blank", ["timeline"]),
    ("seconds x fps gives 1 to 100000 frames (a loop: at least 2 latent frames)", ["seconds"]),
    ("overlap < window (default window // 4); window at most the model's limit", ["overlap", "window"]),
    ("strength only with video or with extend and lead_into together; context only with extend or lead_into; video not with extend or lead_into; "
     "loop not with extend or lead_into", ["strength", "context", "extend", "lead_into", "loop"]),
    ("keyframes: at from 0 to below seconds", ["keyframes"]),
    ("media fields name files this key uploaded (POST /v1/files) of the right kind (image or video)",
     ["image", "keyframes", "video", "extend", "lead_into"]),
    ("the label fits the frame, and the font has every character of label_text", ["label", "label_text"]),
    ("pose needs a model with a pose ControlNet, and no extend, lead_into, video or loop; pose_loop only with "
     "pose; control_scale only with pose or a motion plan (plan auto on the bundled model, with prompts that name "
     "a shape and a motion, or known frames that show the object); reference not with image; the pose as long as the clip unless "
     "pose_loop",
     ["pose", "pose_loop", "control_scale", "reference", "extend", "lead_into", "video", "loop"]),
    ("Wan-Animate models need pose and reference; face, background and mask only for them and with pose, "
     "background and mask exactly with animate_mode replace, each as long as the clip unless pose_loop",
     ["pose", "reference", "face", "background", "mask", "animate_mode", "control_scale"]),
    ("the request's cost: windows x steps and the latents held, within this server's limits",
     ["overlap", "fps", "seconds", "steps", "window", "height", "width"]),
]


def request_schema(limits=None, model=None, model_name: str | None = None) -> dict:
    """The JSON schema of the body of POST /v1/videos on this server: RenderRequest's, inlined, with every
    single-field bound, tightened by `limits` (serve.limits.Limits) and the served `model`
    (pipelines.ModelInfo), server-chosen fields removed, and `x-rules` for the rest."""
    schema = _inline(copy.deepcopy(RenderRequest.model_json_schema()))
    props = schema["properties"]
    for name in SERVER_FIELDS:
        props.pop(name, None)
    for name, bounds in FIELD_BOUNDS.items():
        if name in props:
            _value(props[name]).update(bounds)
    props["negative"] = {"type": "string", "deprecated": True,
                         "description": "Alias of negative_prompt (not both)."}
    for name in ("image", "extend", "lead_into", "video", "pose", "reference", "face", "background", "mask"):
        _value(props[name]).update(pattern=FILE_ID, description=props[name].get("description", "") +
                                   " A file id from POST /v1/files.")
    keyframe = _value(props["keyframes"])["items"]
    keyframe["properties"]["image"]["pattern"] = FILE_ID
    keyframe["properties"]["at"]["minimum"] = 0
    key = _value(props["timeline"])
    key["minItems"] = 1
    key["items"]["properties"]["at"]["minimum"] = 0
    key["items"]["properties"]["prompt"]["pattern"] = r"\S"
    schema["anyOf"] = [{"required": ["prompt"]}, {"required": ["timeline"]}]
    if limits is not None:
        _value(props["seconds"])["maximum"] = min(MAX_SECONDS, limits.max_seconds)
        props["fps"]["maximum"] = min(MAX_FPS, limits.max_fps)
        _value(props["steps"])["maximum"] = min(STEPS_RANGE[1], limits.max_steps)
        for side in ("height", "width"):
            _value(props[side])["maximum"] = min(_value(props[side])["maximum"], limits.max_side)
        key["maxItems"] = limits.max_timeline_keys
        if not limits.allow_unlabelled:
            props["label"]["enum"] = [m for m in LABEL_MODES if m != "none"]
    if model is not None:
        multiple = model.layout.pixel_multiple
        for side in ("height", "width"):
            value = _value(props[side])
            value["multipleOf"] = multiple
            value["minimum"] = -(-value["minimum"] // multiple) * multiple
        _value(props["window"])["maximum"] = model.max_window
        if model.experts < 2:
            props.pop("guidance_2")
    if model_name is not None:
        props["model"] = {"type": "string", "enum": [model_name], "default": model_name,
                          "description": "The model this server runs (the only value accepted)."}
    schema["x-rules"] = [{"rule": text, "fields": fields} for text, fields in RULES]
    schema["description"] = (schema.get("description", "") + " Besides the bounds of each field, a request is "
                              "refused (422) for the rules in x-rules.")
    return schema


STORY_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["shots"], "description": "A story (docs/stories.md): any render field at its "
    "top level is every shot's default.",
    "properties": {
        "style": {"type": "string", "description": "Appended to every shot's prompt."},
        "characters": {"type": "object", "description": "Name -> {image: FILE_ID} (a picture you uploaded).",
                       "additionalProperties": {"type": "object", "required": ["image"],
                                                "properties": {"image": {"type": "string"}}}},
        "label": {"type": "string", "description": "The film's visible label (start, always, none)."},
        "shots": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "seconds"],
            "description": "A shot: an id, a prompt or timeline, seconds, characters, begin, and render fields.",
            "properties": {"id": {"type": "string"}, "prompt": {"type": "string"}, "seconds": {"type": "number"},
                           "characters": {"type": "array", "items": {"type": "string"}},
                           "begin": {"description": "cut, continue, {continue: SHOT_ID} or {dissolve: SECONDS}"}}}},
    }}}}}


def finish_openapi(schema: dict, body: dict) -> dict:
    """FastAPI's OpenAPI document of the serve app, finished: the body of POST /v1/videos (`request_schema`,
    read by the ingress itself, so FastAPI cannot see it), bearer keys as a security scheme instead of an
    `authorization` header parameter, and the one Error shape for 422 (FastAPI's own is never sent; an
    operation with nothing to validate has no 422)."""
    schema["paths"]["/v1/videos"]["post"]["requestBody"] = {
        "required": True, "content": {"application/json": {"schema": body}}}
    schema.setdefault("components", {})["securitySchemes"] = {
        "key": {"type": "http", "scheme": "bearer", "description": "An API key (`longtake keys add`)."}}
    for operations in schema["paths"].values():
        for operation in operations.values():
            params = operation.get("parameters", [])
            if any(p["name"] == "authorization" for p in params):
                operation["parameters"] = [p for p in params if p["name"] != "authorization"]
                operation["security"] = [{"key": []}]
            if not operation.get("parameters") and "requestBody" not in operation:
                operation["responses"].pop("422", None)
            elif "422" in operation["responses"]:
                operation["responses"]["422"] = {"description": "Invalid input", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    return schema
