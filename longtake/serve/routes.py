"""The HTTP API: the FastAPI `api` and the Ingress deployment that serves it (`@serve.ingress(api)`), a thin
front of the Manager deployment (deployments.py).

The ingress bounds what a client can send: body size (read chunk by chunk), query integers, each key's
uploads (files and bytes held), each key's open event streams (one poll of the manager per watched job,
events.py), and, in the manager, the request's cost. It answers only to the Host names it serves (pages.py:
against DNS rebinding).

Uploads (`POST /v1/files`) stream from the ingress into DATA_DIR/uploads (uploads.py parses the body,
files.py keeps the file; the data directory is shared by every pod, and private: longtake/private.py), are
probed there, and are named by id in requests; the manager swaps ids for paths.

Stories (`POST /v1/stories`, `GET /v1/stories/{id}`, its film and OTIO): the manager's StoryBook
(stories.py) queues the shots as the client's jobs and joins the film.

Clients: every /v1 route takes an API key (keys.py); jobs and uploads belong to the key's client and are
404 to others (an admin key sees all). The contract: schema.py (the request body with this server's
limits and model, the response shapes, one error shape); pages.py adds the security headers, the error
handlers and the web monitor (web/: plain HTML, CSS, JavaScript), whose <video> and <img> load a done
job's files through signed, expiring links (POST .../links) so the key never goes in a URL.
"""


import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as FilePath
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from longtake.cluster.jobs import SQLITE_INT_MAX, iso
from longtake.request import RequestError
from longtake.serve.events import JobEvents, TooManyStreams
from longtake.serve.files import FileStore, owner_of
from longtake.serve.keys import Client, KeyStore
from longtake.serve.limits import Limits
from longtake.serve.manager import JobManager, public_message
from longtake.serve.pages import error, install, known_query, served_hosts
from longtake.serve.schema import (FILE_ID, STORY_BODY, Accepted, Changed, FileDeleted, FileMeta, Job, JobList,
                                   Links, Me, Story, Workers, errors, finish_openapi, request_schema)
from longtake.serve.uploads import UPLOAD_BODY, TooLarge, Upload

logger = logging.getLogger(__name__)


api = FastAPI(dependencies=[Depends(known_query)], title="longtake", description="Long AI video rendering: submit, watch, download. Every /v1 route "
              "needs 'Authorization: Bearer KEY' (`longtake keys add NAME`); a job belongs to the key that created it. "
              "The web monitor is at /.")
install(api, "index.html")
JOB_ID = FilePath(pattern=r"^[0-9a-f]{16}$", description="A job id.")
STORY_ID = FilePath(pattern=r"^[0-9a-f]{16}$", description="A story id.")
LINK = Query(None, pattern=r"^[0-9]{1,12}\.[0-9a-f]{32}$", description="A signed link (POST /v1/videos/{job_id}/links) "
             "instead of the Authorization header.")
LINK_TTL_S = 3600


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Thin ingress: authenticates (API keys, keys.py), enforces limits, routes to the manager, serves the
    web monitor. Holds no job state. A job of another client is 404 (an admin key sees all).

    It answers only to `hosts` (pages.served_hosts: loopback names by default), works in a private data
    dir (created 0700, files owner-only), sweeps what dead uploads left in uploads/.incoming when it starts,
    and polls the manager once per watched job for every event stream of that job (events.py)."""

    def __init__(self, manager: DeploymentHandle, token: str, limits: dict, data_dir: str, model_path: str | None = None,
                 model_name: str | None = None, hosts: list[str] | None = None):
        from longtake.private import private_dir
        from longtake.serve import load_or_create_secret

        os.umask(0o077)  # this replica's process writes uploads: the owner's only
        private_dir(data_dir, "data_dir")
        api.state.hosts = tuple(hosts) if hosts is not None else served_hosts()
        self.manager, self.limits = manager, Limits(**limits)
        self.keys, self.files = KeyStore(data_dir, legacy_token=token), FileStore(data_dir)
        self.link_key = load_or_create_secret(Path(data_dir) / "link_key")[0].encode()
        swept = self.files.sweep_incoming()
        if swept:
            logger.info("removed %d partial uploads left in %s", len(swept), self.files.root / ".incoming")
        self.watch = JobEvents(self._read_job, JobManager.is_final, self.limits.max_event_streams)
        model = None
        if model_path is not None:
            from longtake.pipelines import inspect_model

            model = inspect_model(model_path)
        body = request_schema(self.limits, model, model_name)
        api.openapi_schema = None
        original = api.openapi

        def openapi():  # FastAPI's document, finished with this server's request body (schema.py)
            if api.openapi_schema is None:
                api.openapi_schema = finish_openapi(original(), body)
            return api.openapi_schema

        api.openapi = openapi

    def _client(self, authorization: str | None) -> Client:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, {"field": "Authorization", "error": "missing key: send 'Authorization: Bearer "
                                      "KEY'"}, headers={"WWW-Authenticate": "Bearer"})
        client = self.keys.lookup(authorization[7:])
        if client is None:
            raise HTTPException(403, {"field": "Authorization", "error": "wrong key (unknown or revoked)"})
        return client

    @staticmethod
    def _scope(client: Client) -> str | None:
        """Whose jobs a client sees: its own (an admin: everyone's, None)."""
        return None if client.admin else client.name

    def _file_owner(self, client: Client) -> str | None:
        return None if client.admin else owner_of(client.name)

    async def _call(self, method: str, *args):
        answer = await self.manager.call.remote(method, *args)
        if "gone" in answer:
            raise HTTPException(410, answer["gone"])
        if "conflict" in answer:
            raise HTTPException(409, answer["conflict"])
        return answer["value"]

    async def _job(self, job_id: str, client: Client) -> dict:
        job = await self._call("get", job_id, self._scope(client))
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def _sign(self, job_id: str, name: str, expires: int) -> str:
        return hmac.new(self.link_key, f"{job_id}/{name}/{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def _link_ok(self, job_id: str, name: str, link: str | None) -> bool:
        if not link:
            return False
        expires, _, sig = link.partition(".")
        return expires.isdigit() and int(expires) >= time.time() and secrets.compare_digest(
            sig.encode(), self._sign(job_id, name, int(expires)).encode())

    @api.get("/healthz")
    async def healthz(self):
        return {"ok": True}

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self):
        return Response(await self._call("metrics"), media_type="text/plain; version=0.0.4")

    @api.get("/v1/me", response_model=Me, responses=errors(401, 403))
    async def me(self, authorization: str | None = Header(None)):
        """Who this key is: its client name, whether it is an admin key, its job limit."""
        client = self._client(authorization)
        return Me(name=client.name, admin=client.admin, max_jobs=client.max_jobs)

    @api.get("/v1/workers", response_model=Workers, responses=errors(401, 403))
    async def workers(self, authorization: str | None = Header(None)):
        """The denoiser replicas and what each computes now (the workers view)."""
        self._client(authorization)
        return Workers(workers=await self._call("workers"))

    @api.post("/v1/videos", status_code=202, response_model=Accepted,
              responses={200: {"model": Accepted, "description": "Already submitted with this Idempotency-Key"},
                         **errors(400, 401, 403, 409, 413, 422, 429)})
    async def create(self, request: Request, authorization: str | None = Header(None),
                     idempotency_key: str | None = Header(None, min_length=1, max_length=200)):
        """Queue a render. The body is a render request (its schema below, with this server's limits)."""
        client = self._client(authorization)
        body = await self._body(request)
        if not isinstance(body, dict):
            return error(422, f"body: got {type(body).__name__}, expected a JSON object", "body")
        answer = await self.manager.submit.remote(body, idempotency_key, client.name, client.max_jobs)
        if answer.get("error") == "invalid":
            return error(422, answer["message"], answer["field"])
        if answer.get("error") == "full":
            return error(429, f"queue full: {answer['message']}", None, headers={"Retry-After": "10"})
        if answer.get("error") == "conflict":
            return error(409, answer["message"], "Idempotency-Key")
        job = answer["job"]
        return JSONResponse({"id": job["id"], "status": job["status"]}, status_code=202 if answer["created"] else 200)

    async def _body(self, request: Request):
        """A JSON body, read chunk by chunk up to the limit (413 past it; 400 when it is not JSON)."""
        top = self.limits.max_body_bytes
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > top:
            raise HTTPException(413, f"body of {size} bytes, at most {top}")
        raw = bytearray()
        async for chunk in request.stream():  # a chunked body: stop reading at the limit
            raw += chunk
            if len(raw) > top:
                raise HTTPException(413, f"body of more than {top} bytes, at most {top}")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(400, {"field": "body", "error": f"body: expected a JSON object ({e})"})

    @api.post("/v1/stories", status_code=202, response_model=Story, openapi_extra={"requestBody": STORY_BODY},
              responses=errors(400, 401, 403, 413, 422, 429))
    async def create_story(self, request: Request, authorization: str | None = Header(None)):
        """Queue a story: its shots as jobs (a `continue` shot waits for the shot it continues), then one film.
        The body is a story (docs/stories.md) as JSON; a character is `{"image": FILE_ID}`, a picture you
        uploaded (POST /v1/files)."""
        client = self._client(authorization)
        body = await self._body(request)
        if not isinstance(body, dict):
            return error(422, f"body: got {type(body).__name__}, expected a JSON object", "body")
        answer = await self.manager.submit_story.remote(body, client.name, client.max_jobs)
        if answer.get("error") == "invalid":
            return error(422, answer["message"], answer["field"])
        if answer.get("error") == "full":
            return error(429, f"queue full: {answer['message']}", None, headers={"Retry-After": "10"})
        return JSONResponse(answer["story"], status_code=202)

    @api.get("/v1/stories/{story_id}", response_model=Story, responses=errors(401, 403, 404, 422))
    async def get_story(self, story_id: str = STORY_ID, authorization: str | None = Header(None)):
        """A story's status: each shot's job and state, the film's frames once it is joined."""
        story = await self._call("get_story", story_id, self._scope(self._client(authorization)))
        if story is None:
            raise HTTPException(404, f"no story {story_id}")
        return story

    async def _story_file(self, story_id: str, name: str, media_type: str, authorization: str | None):
        scope = self._scope(self._client(authorization))
        return await self._served("story", story_id, name, media_type, scope)

    async def _served(self, what: str, item_id: str, name: str, media_type: str, scope: str | None):
        """A done job's or story's file `name`: 404 when there is none of `scope`'s, 409 before it is done."""
        getter, filer = ("get", "file") if what == "job" else ("get_story", "story_file")
        item = await self._call(getter, item_id, scope)
        if item is None:
            raise HTTPException(404, f"no {what} {item_id}")
        path = await self._call(filer, item_id, name, scope)
        if path is None:
            raise HTTPException(409, f"{what} {item_id} is {item['status']}: no {name} yet")
        return FileResponse(path, media_type=media_type)

    @api.get("/v1/stories/{story_id}/content", responses={
        200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The film (byte ranges: 206)"}, **errors(401, 403, 404, 409, 422)})
    async def story_content(self, story_id: str = STORY_ID, authorization: str | None = Header(None)):
        """The film, once every shot is done and it is joined."""
        return await self._story_file(story_id, "film.mp4", "video/mp4", authorization)

    @api.get("/v1/stories/{story_id}/otio", responses={
        200: {"content": {"application/json": {"schema": {"type": "object"}}},
              "description": "The edit as OpenTimelineIO (its media references: the shots' /v1/videos/{id}/content)"},
        **errors(401, 403, 404, 409, 422)})
    async def story_otio(self, story_id: str = STORY_ID, authorization: str | None = Header(None)):
        """The film's edit as OpenTimelineIO: one clip per shot, the dissolves as transitions."""
        return await self._story_file(story_id, "film.otio", "application/json", authorization)

    @api.post("/v1/files", status_code=201, response_model=FileMeta, openapi_extra={"requestBody": UPLOAD_BODY},
              responses=errors(400, 401, 403, 413, 415, 422, 429))
    async def upload(self, request: Request, authorization: str | None = Header(None)):
        """Upload an image or a video (multipart/form-data, one part named `file`): its id, kind, size and
        SHA-256. Request fields `image`, `keyframes[].image`, `video`, `extend` and `lead_into` take the id."""
        from python_multipart.multipart import MultipartParseError, parse_options_header

        client = self._client(authorization)
        top, owner = self.limits.max_upload_bytes, owner_of(client.name)
        size = request.headers.get("content-length")
        size = int(size) if size and size.isdigit() else None
        if size is not None and size > top + 2**20:
            raise HTTPException(413, f"body of {size} bytes, a file of at most {top}")
        kind, params = parse_options_header(request.headers.get("content-type", ""))
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            raise HTTPException(415, {"field": "Content-Type", "error": "expected a multipart/form-data body with one "
                                      "part named 'file'"})
        # the key's quotas, before the body is read: its files, and the bytes it may still add (413 if the
        # Content-Length is over them, else the body is cut there); `add` checks them again as it keeps the file
        files, held = await asyncio.to_thread(self.files.usage, owner)
        self._admit(client, files + 1, held)
        room = self.limits.max_upload_bytes_per_key - held
        over = self._over_quota(client, held, room)
        if room <= 0 or (size is not None and size > room + 2**20):
            raise HTTPException(413, {"field": "file", "error": over})
        with self.files.receive() as incoming:
            upload = Upload(incoming.path, params[b"boundary"], top, quota=(room, over))
            try:
                async for chunk in request.stream():
                    upload.write(chunk)
                upload.close()
            except TooLarge as e:
                upload.abort()
                raise HTTPException(413, {"field": "file", "error": str(e)})
            except (MultipartParseError, ValueError) as e:
                upload.abort()
                raise HTTPException(400, {"field": "body", "error": f"body: not a well-formed multipart/form-data body "
                                                                    f"({e})"})
            except BaseException:  # the client went away, or the server stops
                upload.abort()
                raise
            if upload.parts != 1:
                upload.abort()
                return error(422, f"file: got {upload.parts} parts named 'file', expected one", "file")
            try:
                meta = await asyncio.to_thread(self.files.add, incoming.path, owner, upload.filename,
                                               lambda n, total: self._admit(client, n, total))
            except RequestError as e:
                return error(422, public_message(str(e)), "file")
        return JSONResponse(meta, status_code=201)

    def _admit(self, client: Client, files: int, total: int) -> None:
        """The upload quotas of a key: HTTPException 429 if it would hold more than max_uploads_per_key files,
        413 if more than max_upload_bytes_per_key bytes."""
        most = self.limits.max_uploads_per_key
        if files > most:
            raise HTTPException(429, {"field": "file", "error": f"file: {client.name} holds {files - 1} uploaded "
                                      f"files, at most {most} (max_uploads_per_key): delete one first (DELETE "
                                      "/v1/files/ID)"})
        if total > self.limits.max_upload_bytes_per_key:
            raise HTTPException(413, {"field": "file", "error": self._over_quota(client, None, None)})

    def _over_quota(self, client: Client, held: int | None, room: int | None) -> str:
        most = self.limits.max_upload_bytes_per_key
        now = f" ({held} held, room for {max(room, 0)} more)" if held is not None else ""
        return (f"file: more than {client.name}'s uploads may take, at most {most} bytes (max_upload_bytes_per_key)"
                f"{now}: delete some first (DELETE /v1/files/ID)")

    @api.get("/v1/files/{file_id}", response_model=FileMeta, response_model_exclude_none=True,
             responses=errors(401, 403, 404, 422))
    async def get_file(self, file_id: str = FilePath(pattern=FILE_ID), authorization: str | None = Header(None)):
        client = self._client(authorization)
        meta = await asyncio.to_thread(self.files.get, file_id, self._file_owner(client))
        if meta is None:
            raise HTTPException(404, f"no file {file_id}")
        return meta

    @api.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=errors(401, 403, 404, 409, 422))
    async def delete_file(self, file_id: str = FilePath(pattern=FILE_ID), authorization: str | None = Header(None)):
        """Delete an uploaded file; 409 while a job that is not finished uses it."""
        client = self._client(authorization)
        answer = await self._call("delete_file", file_id, self._file_owner(client))
        if "in_use" in answer:
            raise HTTPException(409, f"file {file_id} is used by job(s) {', '.join(answer['in_use'])}: delete or "
                                     "wait for them first")
        if not answer["deleted"]:
            raise HTTPException(404, f"no file {file_id}")
        return {"id": file_id, "deleted": True}

    @api.get("/v1/videos", response_model=JobList, responses=errors(401, 403, 422))
    async def list_jobs(self, limit: int = Query(20, ge=1, le=100), offset: int = Query(0, ge=0, le=SQLITE_INT_MAX),
                        authorization: str | None = Header(None)):
        """Your jobs, newest first (an admin key: every client's)."""
        client = self._client(authorization)
        return await self._call("list", limit, offset, self._scope(client))

    @api.get("/v1/videos/{job_id}", response_model=Job, responses=errors(401, 403, 404, 410, 422))
    async def get_job(self, job_id: str = JOB_ID, authorization: str | None = Header(None)):
        return await self._job(job_id, self._client(authorization))

    @api.get("/v1/videos/{job_id}/events", responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "Server-sent events: `progress` {id, status, progress, error} on every change, then "
                             "`end` {id, status} (or `deleted` {id}). At most `max_event_streams` open per key "
                             "(429 past it)."}, **errors(401, 403, 404, 410, 422, 429)})
    async def events(self, job_id: str = JOB_ID, authorization: str | None = Header(None)):
        client = self._client(authorization)
        await self._job(job_id, client)  # 404 / 410 before any stream: then its poll may read it unscoped
        try:
            stream = self.watch.stream(client.name, job_id)
        except TooManyStreams as e:
            return error(429, str(e), None, headers={"Retry-After": "10"})
        return StreamingResponse(stream, media_type="text/event-stream")

    async def _read_job(self, job_id: str) -> dict | None:
        """A watched job as the manager has it (None once deleted): the events' one poll per job."""
        try:
            return await self._call("get", job_id, None)
        except HTTPException:  # 410: deleted meanwhile
            return None

    async def _file(self, job_id: str, name: str, media_type: str, authorization: str | None, link: str | None):
        if self._link_ok(job_id, name, link):  # a signed link: no key needed (the page's <video> and <img>)
            scope = None
        else:
            scope = self._scope(self._client(authorization))
        return await self._served("job", job_id, name, media_type, scope)

    @api.get("/v1/videos/{job_id}/content", responses={
        200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The MP4 (byte ranges: 206)"}, **errors(401, 403, 404, 409, 410, 422)})
    async def content(self, job_id: str = JOB_ID, link: str | None = LINK, authorization: str | None = Header(None)):
        """The video: with the Authorization header, or a signed `link` from POST .../links."""
        return await self._file(job_id, "video.mp4", "video/mp4", authorization, link)

    @api.get("/v1/videos/{job_id}/preview", responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The contact sheet"}, **errors(401, 403, 404, 409, 410, 422)})
    async def preview(self, job_id: str = JOB_ID, link: str | None = LINK, authorization: str | None = Header(None)):
        """The contact sheet (PNG): with the Authorization header, or a signed `link` from POST .../links."""
        return await self._file(job_id, "preview.png", "image/png", authorization, link)

    @api.post("/v1/videos/{job_id}/links", response_model=Links, responses=errors(401, 403, 404, 409, 410, 422))
    async def links(self, job_id: str = JOB_ID, authorization: str | None = Header(None)):
        """Signed URLs of a done job's video and contact sheet, valid for an hour, usable without the key."""
        client = self._client(authorization)
        job = await self._job(job_id, client)
        if job["status"] != "done":
            raise HTTPException(409, f"job {job_id} is {job['status']}: no files yet")
        expires = int(time.time()) + LINK_TTL_S
        url = {name: f"/v1/videos/{job_id}/{route}?link={expires}.{self._sign(job_id, name, expires)}"
               for name, route in (("video.mp4", "content"), ("preview.png", "preview"))}
        return {"content": url["video.mp4"], "preview": url["preview.png"], "expires": iso(expires)}

    @api.get("/v1/videos/{job_id}/log", responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "One line per event"},
        **errors(401, 403, 404, 410, 422)})
    async def log(self, job_id: str = JOB_ID, authorization: str | None = Header(None)):
        """What happened to the job: queued, started, each step, done or failed."""
        text = await self._call("log", job_id, self._scope(self._client(authorization)))
        if text is None:
            raise HTTPException(404, f"no job {job_id}")
        return PlainTextResponse(text)

    @api.post("/v1/videos/{job_id}/cancel", response_model=Changed, responses=errors(401, 403, 404, 409, 410, 422))
    async def cancel(self, job_id: str = JOB_ID, authorization: str | None = Header(None)):
        """Stop a queued, paused or running job (its workers are freed at once); 409 if it has finished."""
        was = await self._call("cancel", job_id, self._scope(self._client(authorization)))
        if was is None:
            raise HTTPException(404, f"no job {job_id}")
        return {"id": job_id, "status": "cancelled", "was": was}

    @api.delete("/v1/videos/{job_id}", response_model=Changed, responses=errors(401, 403, 404, 410, 422))
    async def delete(self, job_id: str = JOB_ID, authorization: str | None = Header(None)):
        """Cancel the job if it is queued or running, then delete it and its files: its status becomes
        `deleted`, later reads answer 410, and it leaves the job list."""
        was = await self._call("delete", job_id, self._scope(self._client(authorization)))
        if was is None:
            raise HTTPException(404, f"no job {job_id}")
        return {"id": job_id, "status": "deleted", "was": was}
