"""The Ray Serve application: a thin FastAPI ingress, a job manager, an autoscaled denoiser.

    Ingress (FastAPI: auth, limits, routes) -> Manager (job store, engine threads) -> Denoiser replicas
                                                                                     (one model each,
                                                                                      0..max replicas)
The manager's engine threads send every window of every running job to the denoiser deployment at
once, so Serve's queue (ongoing requests) is what the autoscaler scales on. Families with a large text
encoder (Wan's UMT5) encode in the manager, on a CPU worker kept there; their denoisers never load it.
A causal VAE's decode is one streamed call to one replica.

Every call to a denoiser has a timeout (a replica that cannot be scheduled fails the job with a clear
error, it never stays `running`), and a failed window is retried (max attempts) on whichever replica
Serve picks; a replica whose calls keep failing reports itself unhealthy and Serve replaces it (the
blocklist of the Ray pool). The ingress bounds what a client can send: body size (read chunk by chunk),
query integers, and, in the manager, the request's cost.
"""


import asyncio
import json
import logging
import os
import queue
import secrets
import threading
from collections import deque
from dataclasses import asdict, fields

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from longtake.actors.pool import WindowFailed
from longtake.actors.worker import Worker, WorkerSpec, encoder_spec
from longtake.cluster.jobs import SQLITE_INT_MAX, Conflict
from longtake.request import RenderRequest, RequestError
from longtake.serve.manager import Gone, JobManager, Limits, QueueFull, public_message

logger = logging.getLogger(__name__)


def _one_line(error: Exception) -> str:
    """A denoiser call's error in one line: its class and the last line of its message (Serve wraps the
    replica's traceback around it)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else 'failed'}"


class ServePool:
    """The engine's pool interface over the Denoiser deployment (used from the manager's threads).

    Families whose text encoder the denoisers do not hold (Wan's UMT5) encode here, in the manager, on
    a CPU worker built on first use and kept."""

    def __init__(self, handle: DeploymentHandle, num_workers: int, model_path: str, device: str = "cpu",
                 decode_in_flight: int = 4, timeout_s: float = 600.0, max_attempts: int = 3):
        self.handle, self.num_workers, self.decode_in_flight = handle, num_workers, decode_in_flight
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.retries = 0
        self.spec = denoiser_spec(model_path, device)
        self._encoder = None
        self._lock = threading.Lock()

    def encode(self, *args):
        if "encode" in self.spec.roles:
            return self.call("encode", *args)
        with self._lock:
            if self._encoder is None:
                self._encoder = Worker(encoder_spec(self.spec))
            return self._encoder.encode(*args)

    def stream(self, method: str, args: tuple):
        """Items of one streamed call, in order, each within the timeout. A failed stream restarts (max
        attempts) and skips the items already delivered (the method takes `skip` after `args`)."""
        delivered = 0
        for attempt in range(1, self.max_attempts + 1):
            response = getattr(self.handle, method).options(stream=True).remote(*args, delivered)
            items: queue.Queue = queue.Queue(maxsize=2)
            stop = threading.Event()

            def pump(response=response, items=items, stop=stop):
                def put(entry):
                    while not stop.is_set():
                        try:
                            return items.put(entry, timeout=0.5)
                        except queue.Full:
                            pass
                try:
                    for item in response:
                        put(("item", item))
                    put(("end", None))
                except Exception as e:  # the replica's error, a lost replica, or our own cancel
                    put(("error", e))

            threading.Thread(target=pump, daemon=True, name=f"serve-{method}").start()
            try:
                while True:
                    try:
                        kind, value = items.get(timeout=self.timeout_s)
                    except queue.Empty:
                        raise WindowFailed(f"{method}: no denoiser answered in {self.timeout_s:g} s (can a replica "
                                           "be scheduled? see `ray status`)") from None
                    if kind == "end":
                        return
                    if kind == "error":
                        break
                    delivered += 1
                    yield value
            finally:
                stop.set()
                response.cancel()
            reason = _one_line(value)
            if attempt == self.max_attempts:
                raise WindowFailed(f"{method} failed {attempt} times; last error: {reason}") from value
            logger.warning("restarting %s after %d items (attempt %d of %d) after: %s", method, delivered,
                           attempt + 1, self.max_attempts, reason)
            self.retries += 1

    def put(self, obj):
        return obj

    def call(self, method: str, *args):
        return next(self.imap(method, [args]))

    def _result(self, method: str, i: int, args: tuple, response, attempt: int):
        """A call's result within the timeout; a failure is retried (a new call: Serve may pick another
        replica) until max_attempts; then, or on a timeout, WindowFailed."""
        while True:
            try:
                return response.result(timeout_s=self.timeout_s)
            except TimeoutError:
                response.cancel()
                raise WindowFailed(f"{method} task {i}: no denoiser answered in {self.timeout_s:g} s (can a replica "
                                   "be scheduled? see `ray status`)") from None
            except Exception as e:  # the replica's own error, or a replica that died
                reason = _one_line(e)
                if attempt >= self.max_attempts:
                    raise WindowFailed(f"{method} task {i} failed {attempt} times; last error: {reason}") from e
                logger.warning("retrying %s task %d (attempt %d of %d) after: %s", method, i, attempt + 1,
                               self.max_attempts, reason)
                self.retries += 1
                attempt += 1
                response = getattr(self.handle, method).remote(*args)

    def imap(self, method: str, args_list):
        tasks = list(args_list)
        # all windows of a step are queued at once (the autoscaler sees the queue); decoded frames are big,
        # so only a few decode chunks are in flight
        limit = self.decode_in_flight if method == "decode" else len(tasks)
        pending: deque = deque()
        nxt = 0
        try:
            while nxt < len(tasks) or pending:
                while nxt < len(tasks) and len(pending) < limit:
                    pending.append((nxt, getattr(self.handle, method).remote(*tasks[nxt])))
                    nxt += 1
                i, response = pending.popleft()
                yield self._result(method, i, tasks[i], response, 1)
        finally:
            for _, response in pending:  # cancelled or failed: stop what is still queued
                response.cancel()

    def shutdown(self) -> None:
        pass


@serve.deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 2},
                  max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class Denoiser:
    """One loaded model; predicts windows and decodes for every job (and encodes, for small text encoders).

    After `blocklist_after` failed calls it reports itself unhealthy, and Serve replaces it."""

    def __init__(self, model_path: str, device: str = "cpu", blocklist_after: int = 3, worker_cls: type = Worker):
        self.worker = worker_cls(denoiser_spec(model_path, device))
        self.blocklist_after, self.failures = blocklist_after, 0

    def _do(self, method: str, *args):
        try:
            return getattr(self.worker, method)(*args)
        except Exception:
            self.failures += 1
            raise

    def info(self) -> dict:
        """This replica's process and its failed calls so far."""
        return {"pid": os.getpid(), "failures": self.failures}

    def check_health(self):
        if self.blocklist_after and self.failures >= self.blocklist_after:
            raise RuntimeError(f"{self.failures} failed calls: this replica is replaced")

    def encode(self, *args):
        return self._do("encode", *args)

    def predict(self, *args):
        return self._do("predict", *args)

    def decode(self, *args):
        return self._do("decode", *args)

    def encode_frames(self, *args):
        return self._do("encode_frames", *args)

    def decode_stream(self, *args):
        yield from self.worker.decode_stream(*args)

    def has_text_encoder(self) -> bool:
        return getattr(self.worker.backend, "text_encoder", None) is not None


def denoiser_spec(model_path: str, device: str) -> WorkerSpec:
    """A denoiser replica's worker: the family's dtype on GPUs, and no text encoder when it is large."""
    from longtake.pipelines import ROLES, inspect_model

    info = inspect_model(model_path)
    roles = ("predict", "decode") if info.separate_encoder else ROLES
    return WorkerSpec(model_path, device, info.cuda_dtype if device == "cuda" else "float32", roles=roles)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Manager:
    def __init__(self, denoiser: DeploymentHandle, data_dir: str, model: str, max_replicas: int, limits: dict,
                 device: str = "cpu", model_name: str | None = None):
        lim = Limits(**limits)
        pool = ServePool(denoiser, max_replicas, model, device, timeout_s=lim.task_timeout_s,
                         max_attempts=lim.max_attempts)
        self.manager = JobManager(data_dir, pool, model, lim, model_name)

    async def call(self, method: str, *args):
        """{"value": ...}, or {"gone": message} for a deleted job: errors travel as values across Ray."""
        # the manager's methods touch SQLite and join threads: keep them off the event loop
        try:
            return {"value": await asyncio.to_thread(getattr(self.manager, method), *args)}
        except Gone as e:
            return {"gone": str(e)}

    async def submit(self, body: dict, idempotency_key: str | None) -> dict:
        """Errors come back as values, not exceptions, across the Ray boundary."""
        try:
            job, created = await asyncio.to_thread(self.manager.submit, body, idempotency_key)
        except RequestError as e:
            return {"error": "invalid", "field": e.field, "message": public_message(str(e))}
        except QueueFull as e:
            return {"error": "full", "message": str(e)}
        except Conflict as e:
            return {"error": "conflict", "message": str(e)}
        return {"job": job, "created": created}

    def __del__(self):
        self.manager.close()


api = FastAPI(title="longtake", description="Long AI video rendering: submit, watch, download.")

# the body of POST /v1/videos, as the OpenAPI schema documents it (the server chooses output paths)
SERVER_FIELDS = ("out", "preview")


def _request_schema() -> dict:
    """RenderRequest's JSON schema, definitions inlined (OpenAPI keeps them elsewhere), output paths left out."""
    schema = RenderRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if set(node) == {"$ref"}:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    schema = inline(schema)
    for name in SERVER_FIELDS:
        schema["properties"].pop(name, None)
    return schema


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Thin ingress: authenticates, enforces limits, routes to the manager. Holds no job state."""

    def __init__(self, manager: DeploymentHandle, token: str, limits: dict):
        self.manager, self.token, self.limits = manager, token, Limits(**limits)

    def _check(self, authorization: str | None) -> None:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(authorization[7:].encode(), self.token.encode()):
            raise HTTPException(403, "wrong token")

    async def _call(self, method: str, *args):
        answer = await self.manager.call.remote(method, *args)
        if "gone" in answer:
            raise HTTPException(410, answer["gone"])
        return answer["value"]

    async def _job(self, job_id: str) -> dict:
        job = await self._call("get", job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @api.get("/healthz")
    async def healthz(self):
        return {"ok": True}

    @api.get("/metrics")
    async def metrics(self):
        return Response(await self._call("metrics"), media_type="text/plain; version=0.0.4")

    @api.post("/v1/videos", status_code=202, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": _request_schema()}}}})
    async def create(self, request: Request, authorization: str | None = Header(None),
                     idempotency_key: str | None = Header(None)):
        self._check(authorization)
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
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(400, f"body: expected a JSON object ({e})")
        if not isinstance(body, dict):
            return JSONResponse({"detail": {"field": "body", "error": f"body: got {type(body).__name__}, "
                                                                       "expected a JSON object"}}, status_code=422)
        answer = await self.manager.submit.remote(body, idempotency_key)
        if answer.get("error") == "invalid":
            return JSONResponse({"detail": {"field": answer["field"], "error": answer["message"]}}, status_code=422)
        if answer.get("error") == "full":
            return JSONResponse({"detail": f"queue full: {answer['message']}"}, status_code=429,
                                headers={"Retry-After": "10"})
        if answer.get("error") == "conflict":
            return JSONResponse({"detail": {"field": "Idempotency-Key", "error": answer["message"]}}, status_code=409)
        job = answer["job"]
        return JSONResponse({"id": job["id"], "status": job["status"]}, status_code=202 if answer["created"] else 200)

    @api.get("/v1/videos")
    async def list_jobs(self, limit: int = Query(20, ge=1, le=100), offset: int = Query(0, ge=0, le=SQLITE_INT_MAX),
                        authorization: str | None = Header(None)):
        self._check(authorization)
        return await self._call("list", limit, offset)

    @api.get("/v1/videos/{job_id}")
    async def get_job(self, job_id: str, authorization: str | None = Header(None)):
        self._check(authorization)
        return await self._job(job_id)

    @api.get("/v1/videos/{job_id}/events")
    async def events(self, job_id: str, authorization: str | None = Header(None)):
        self._check(authorization)
        await self._job(job_id)

        async def stream():
            last = None
            while True:
                try:
                    job = await self._call("get", job_id)
                except HTTPException:  # 410: deleted meanwhile
                    job = None
                if job is None:
                    yield _sse("deleted", {"id": job_id})
                    return
                state = {"status": job["status"], "progress": job["progress"], "error": job["error"]}
                if state != last:
                    yield _sse("progress", {"id": job_id, **state})
                    last = state
                if JobManager.is_final(job["status"]):
                    yield _sse("end", {"id": job_id, "status": job["status"]})
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def _file(self, job_id: str, name: str, media_type: str):
        job = await self._job(job_id)
        path = await self._call("file", job_id, name)
        if path is None:
            raise HTTPException(409, f"job {job_id} is {job['status']}: no {name} yet")
        return FileResponse(path, media_type=media_type)

    @api.get("/v1/videos/{job_id}/content")
    async def content(self, job_id: str, authorization: str | None = Header(None)):
        self._check(authorization)
        return await self._file(job_id, "video.mp4", "video/mp4")

    @api.get("/v1/videos/{job_id}/preview")
    async def preview(self, job_id: str, authorization: str | None = Header(None)):
        self._check(authorization)
        return await self._file(job_id, "preview.png", "image/png")

    @api.delete("/v1/videos/{job_id}")
    async def delete(self, job_id: str, authorization: str | None = Header(None)):
        """Cancel the job if it is queued or running, then delete it and its files: its status becomes
        `deleted`, later reads answer 410, and it leaves the job list."""
        self._check(authorization)
        was = await self._call("delete", job_id)
        if was is None:
            raise HTTPException(404, f"no job {job_id}")
        return {"id": job_id, "status": "deleted", "was": was}


def build_app(model_path: str, data_dir: str, token: str, device: str = "cpu", min_replicas: int = 0,
              max_replicas: int = 2, limits: Limits = Limits(), downscale_delay_s: float = 30,
              model_name: str | None = None, worker_cls: type = Worker):
    """The bound application, ready for serve.run(). `model_name` is what clients see (default: the
    model directory's name)."""
    denoiser = Denoiser.options(autoscaling_config={
        "min_replicas": min_replicas, "max_replicas": max_replicas, "initial_replicas": min_replicas,
        "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": downscale_delay_s},
        ray_actor_options={"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": 1},
        health_check_period_s=2,
    ).bind(model_path, device, limits.blocklist_after, worker_cls)
    manager = Manager.bind(denoiser, data_dir, model_path, max_replicas, asdict(limits), device, model_name)
    return Ingress.bind(manager, token, asdict(limits))


def app_builder(args: dict):
    """Application builder for `serve deploy` / KubeRay (see deploy/serve_config.yaml).

    args: model ('default' or a directory), data_dir, device ('cpu' | 'cuda'), min_replicas, max_replicas,
    and optional limits (the fields of serve.manager.Limits: max_seconds, max_fps, max_steps, max_side,
    max_timeline_keys, max_model_evaluations, max_latent_mb, max_queued, max_running, max_body_bytes, ...).
    The API token comes from $LONGTAKE_API_TOKEN (a Kubernetes secret), else DATA_DIR/api_token."""
    from longtake.pipelines import inspect_model
    from longtake.serve import load_or_create_token

    model = inspect_model(args.get("model", "default"))
    data_dir = args.get("data_dir", "/tmp/longtake")
    token, _ = load_or_create_token(data_dir)
    limit_keys = {f.name for f in fields(Limits)}
    limits = Limits(**{k: v for k, v in args.items() if k in limit_keys})
    return build_app(model.path, data_dir, token, args.get("device", "cpu"), int(args.get("min_replicas", 0)),
                     int(args.get("max_replicas", 2)), limits, float(args.get("downscale_delay_s", 30)),
                     model_name=args.get("model", "default"))
