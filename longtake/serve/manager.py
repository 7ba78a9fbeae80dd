"""The job manager behind the HTTP API: a queue in the job store, a few jobs running at once in
threads, each rendered by the engine on a shared pool (the autoscaled denoiser deployment).

Jobs are leased like farm jobs (cluster/jobs.py) and checkpointed every few steps: a restarted server
(or a second one on the same data directory) resumes a job whose manager is gone from its newest
checkpoint, with the same frames, and never takes a job another live manager is rendering.

What a client sees carries no server path: the request names the served model by its name, and a
failed job's error is the error class and a message with paths cut out (the full one is in the log).

Every job belongs to the API client (serve.keys) that submitted it: the API methods take `client` (a
name; None for an admin key) and a job of another client is answered as missing (the ingress says 404,
so ids do not leak). Each job keeps a short log of what happened to it (JOB_DIR/log.txt).

Plain Python (no Ray Serve imports), so it is testable with any pool.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from longtake.cluster.engine import Job, prepare
from longtake.cluster.job_runner import JobLog, Stops, run_leased
from longtake.cluster.jobs import FINAL, STATES, ClientFull, Conflict, JobStore, QueueFull, new_runner_id, scoped_key
from longtake.cluster.retention import Audit, Retention, delete_job, files_under, save_policy, sweep
from longtake.provenance import Provenance
from longtake.core.windows import plan_loop, plan_windows
from longtake.request import DEFAULT_SECONDS, RenderRequest, RequestError, parse_request
from longtake.serve.files import FileStore, file_ids, owner_of
from longtake.serve.limits import Limits
from longtake.serve.schema import SERVER_FIELDS

logger = logging.getLogger(__name__)

__all__ = ["JobManager", "Limits", "QueueFull", "ClientFull", "Gone", "NotCancellable", "public_message"]

_PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?(?:/[^\s'\"(),:;]+)+/?")
# what the app serves (serve/routes.py, pages.py): a route in a message is kept, e.g. "(POST /v1/files)"
_ROUTE = re.compile(r"/(?:v1|api|static)(?:/[\w{}.?=&%-]*)*|/(?:healthz|metrics|openapi\.json|docs|redoc)\.?")


def public_message(text: str) -> str:
    """A message for clients: every file system path replaced by <path>; the API's own routes (/v1/...,
    /static/..., /healthz, /metrics, /openapi.json) are kept."""
    return _PATH.sub(lambda m: m[0] if _ROUTE.fullmatch(m[0]) and ".." not in m[0] else "<path>", text)


class FailedJobs:
    """The jobs of a data dir that failed since this object was made, each once (`new()`): what `longtake
    serve` prints on its stderr, since a job's thread runs in the manager replica, whose log is Ray's."""

    def __init__(self, data_dir: str | Path, since: float | None = None):
        self.path, self.since, self.seen = Path(data_dir) / "jobs.db", time.time() if since is None else since, set()

    def new(self, limit: int = 100) -> list:
        if not self.path.is_file():
            return []
        found = [job for job in JobStore(self.path, create=False).list(limit=limit, state="failed")
                 if job.updated >= self.since and job.id not in self.seen]
        self.seen.update(job.id for job in found)
        return found[::-1]  # oldest first


class Gone(Exception):
    """The job was deleted (HTTP 410)."""


class NotCancellable(Exception):
    """The job has finished already (HTTP 409)."""


def gone_message(job) -> str:
    """What a read of a deleted job answers: deleted, and why (on request, or its output expired)."""
    return f"job {job.id} was deleted" + (f": {job.error}" if job.error else "")


def job_dir(data_dir: Path, job_id: str) -> Path:
    return Path(data_dir) / "jobs" / job_id


def gc(data_dir: str | Path, policy: Retention, now: float | None = None, dry_run: bool = False) -> list[dict]:
    """The retention sweep of a serve data dir (`longtake gc --data-dir`, and every server's): outputs of
    jobs finished longer ago than the policy keeps them, what deleted jobs left, uploads no unfinished job
    names, and partial uploads no live upload holds (uploads/.incoming, on the wall clock)."""
    store = JobStore(Path(data_dir) / "jobs.db", create=False)
    files = FileStore(data_dir)

    def live_file_ids() -> set:
        return {i for state in ("queued", "running", "paused")
                for j in store.list(limit=100_000, state=state) for i in file_ids(j.request)}

    done = sweep(store, data_dir, lambda r: [job_dir(data_dir, r.id)], policy, files, live_file_ids, now=now,
                 dry_run=dry_run)
    if not dry_run:
        files.sweep_incoming()
    return done


def request_cost(job: Job, **change) -> tuple[int, float]:
    """(model evaluations, MB the driver holds for it: its latents during a step and its per-frame media) of
    a prepared job (pixels or not), or of the same job with some of COST_FIELDS changed (`change`: field ->
    value, None for the default), by arithmetic: the window plan of the frames it would have (contexts and a
    video's length scale with fps); the media are its control frames (a pose or a motion plan: RGB at the
    output size), a Wan-Animate model's face (its face size), background (RGB) and mask (gray) frames,
    one of each a frame, and the reference photo."""
    req, model, layout = job.request, job.model, job.model.layout
    fps = change.get("fps", req.fps) or DEFAULT_FPS
    new_s = job.new_frames / req.fps  # a video's own length when no seconds are asked for
    if "seconds" in change:
        new_s = change["seconds"] or (job.inputs.source.frames / req.fps if job.inputs.source else DEFAULT_SECONDS)
    contexts = (job.inputs.ctx_before + job.inputs.ctx_after) * fps / req.fps
    frames = max(1, round(new_s * fps) + round(contexts))
    window = change.get("window", job.window) or model.native_window
    overlap = change.get("overlap", None if "window" in change else job.overlap)
    overlap = overlap if overlap is not None else window // 4
    steps = change.get("steps", job.steps) or model.default_steps
    height, width = change.get("height", job.height) or model.default_height, \
        change.get("width", job.width) or model.default_width
    latent_frames = layout.latent_frames(frames)
    windows = (plan_loop if job.loop else plan_windows)(latent_frames, window, overlap)
    c, h, w = layout.latent_shape(height, width)
    held = 3 * latent_frames + sum(e - s for s, e in windows)  # z, model input, fused; predictions
    face = model.options.get("face_size", 0)
    per_frame = (3 * height * width * (job.controlled + (req.background is not None)) + height * width
                 * (req.mask is not None) + 3 * face * face * (req.face is not None))
    media = frames * per_frame + 3 * height * width * (req.reference is not None)
    return steps * len(windows), (held * c * h * w * 4 + media) / 2**20


LIVE = tuple(s for s in STATES if s != "deleted")  # the states a client can still read
DEFAULT_FPS = RenderRequest.model_fields["fps"].default

# the fields that drive the cost, most suspect first: the one named in a 422 is the first whose default
# brings the request within the limits
COST_FIELDS = ("overlap", "fps", "seconds", "steps", "window", "height", "width")


class JobManager:
    def __init__(self, data_dir: str | Path, pool, model: str, limits: Limits = Limits(), model_name: str | None = None):
        self.data_dir = Path(data_dir)
        self.store = JobStore(self.data_dir / "jobs.db")
        self.files = FileStore(self.data_dir)
        self.pool, self.model, self.limits = pool, model, limits
        self.retention = Retention(limits.retain_uploads, limits.retain_outputs)
        save_policy(self.data_dir, self.retention)
        self._swept = -math.inf
        self.model_name = Path(model_name or model).name  # what clients see; `model` is where it lives here
        self.id = new_runner_id("serve-")
        self._cancel: set[str] = set()  # running jobs to stop
        self._deleting: set[str] = set()  # running jobs deleted: their own thread deletes their files as it ends
        self._running: dict[str, threading.Thread] = {}  # a job's thread removes itself when it ends
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.registry = CollectorRegistry()
        self.m_jobs = Gauge("longtake_jobs", "Jobs by state", ["state"], registry=self.registry)
        self.m_duration = Histogram("longtake_job_duration_seconds", "Wall time of finished jobs",
                                    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800), registry=self.registry)
        self.m_window = Histogram("longtake_window_step_seconds", "Time between window results in a step",
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=self.registry)
        self.m_queue_jobs = Gauge("longtake_queue_jobs", "Queued jobs", registry=self.registry)
        self.m_queue_windows = Gauge("longtake_queue_windows", "Window predictions left in running jobs",
                                     registry=self.registry)
        self.m_busy = Gauge("longtake_workers_busy", "Workers busy (estimate: running jobs' in-flight windows)",
                            registry=self.registry)
        self.m_idle = Gauge("longtake_workers_idle", "Workers idle (estimate)", registry=self.registry)
        self.m_frames = Counter("longtake_frames_rendered_total", "Frames written to finished videos",
                                registry=self.registry)
        self._left: dict[str, int] = {}
        self._recovered = 0.0
        from longtake.serve.stories import StoryBook

        self.stories = StoryBook(self)  # POST /v1/stories: shots as jobs with dependencies, then the film
        self._scheduler = threading.Thread(target=self._schedule, daemon=True, name="longtake-scheduler")
        self._scheduler.start()

    # -- API --------------------------------------------------------------------------------------
    def submit(self, body: dict, idempotency_key: str | None = None, client: str | None = None,
               max_jobs: int | None = None) -> tuple[dict, bool]:
        """Validate and queue a render request for `client` (None: no client, e.g. a test). Its media fields
        name files that client uploaded (by id, never a path; client None: any uploader's). Raises
        RequestError (bad input or over a limit), QueueFull (the server's queue, or ClientFull: the client
        has `max_jobs` queued, running or paused), or jobs.Conflict (an idempotency key reused with another
        request)."""
        for field, why in SERVER_FIELDS.items():
            if field in body:
                raise RequestError(field, body[field], f"no value: {why}")
        if "model" in body:
            self.check_model("model", body["model"])
        body = {**body, "model": self.model_name}
        local, ids = self.files.local_request(body, owner_of(client) if client is not None else None)
        try:
            job = self._check(local)
        except RequestError as e:  # name the file id the client sent, not where the file lives here
            named = ids.get(e.value, e.value) if isinstance(e.value, str) else e.value
            raise RequestError(e.field, named, e.expected) from None
        lim = self.limits
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
            raise RequestError("Idempotency-Key", idempotency_key, "1 to 200 characters")
        scoped = scoped_key(client, idempotency_key)
        try:
            record, created = self.store.create(body, idempotency_key=scoped, max_active=lim.max_queued, client=client,
                                                client_max_active=max_jobs)
        except Conflict as e:  # name the key as the client sent it
            raise Conflict(str(e).replace(repr(scoped), repr(idempotency_key))) from None
        if created:
            logger.info("job %s queued: %d windows x %d steps", record.id, len(job.windows), job.steps)
            self._log(record.id, f"queued by {client or '-'}: {len(job.windows)} windows x {job.steps} steps")
        self._wake.set()
        return record.to_dict(), created

    def _check(self, body: dict) -> Job:
        """Every check before a job is queued: the request, this server's limits, the model's rules. Media
        are probed, never decoded (`prepare(pixels=False)`); the cost is what will be rendered and written:
        a video's own length, and the clips extend and lead_into pass through."""
        # the server's groups render every window (`longtake serve --cp`): their size is checked against the request
        req = parse_request({**body, "model": self.model, "out": str(self.data_dir / "check.mp4"),
                             "cp": self.limits.cp})
        lim = self.limits
        for field, value, top in (("seconds", req.seconds, lim.max_seconds), ("fps", req.fps, lim.max_fps),
                                  ("steps", req.steps, lim.max_steps), ("height", req.height, lim.max_side),
                                  ("width", req.width, lim.max_side),
                                  ("timeline", len(req.timeline or ()), lim.max_timeline_keys)):
            if value is not None and value > top:
                shown = f"{value} keys" if field == "timeline" else value
                unit = (" key" + "s" * (top != 1)) if field == "timeline" else ""
                raise RequestError(field, shown, f"at most {top:g}{unit} on this server")
        if req.label == "none" and not lim.allow_unlabelled:
            raise RequestError("label", "none", "start or always: this server labels every video (started without "
                                                "--allow-unlabelled)")
        job = self._prepare(req, pixels=False)
        made, written = job.new_frames / req.fps, job.output_frames / req.fps
        if made > lim.max_seconds:  # a video redrawn for its whole length (no seconds asked for)
            raise RequestError("video", body.get("video"), f"a video of at most {lim.max_seconds:g} s on this server, "
                                                           f"or seconds (this one is {made:g} s)")
        if written > lim.max_seconds:  # the clips passed through are decoded and written too
            clips = {"extend": job.inputs.before, "lead_into": job.inputs.after}
            field = max((f for f, clip in clips.items() if clip is not None), key=lambda f: clips[f].frames)
            raise RequestError(field, body.get(field), f"an output of at most {lim.max_seconds:g} s on this server, "
                                                       f"the clips passed through included (this one is {written:g} s: "
                                                       f"{made:g} s new)")
        evaluations, mb = request_cost(job)
        if evaluations <= lim.max_model_evaluations and mb <= lim.max_latent_mb:
            return job
        field = self._costliest(body, job)
        raise RequestError(field, body.get(field), f"a request within this server's cost limits: at most "
                           f"{lim.max_model_evaluations} model evaluations (windows x steps) and {lim.max_latent_mb:g} "
                           f"MB of latents and media; this one needs {len(job.windows)} windows x {job.steps} steps = "
                           f"{evaluations} and {mb:.0f} MB (lower {field}, or seconds, fps or steps)")

    def _prepare(self, body: dict | RenderRequest, pixels: bool = True) -> Job:
        """prepare() against the served model (a body, or a request `_check` has parsed already)."""
        try:
            if isinstance(body, dict):
                body = {**body, "model": self.model, "out": str(self.data_dir / "check.mp4"), "cp": self.limits.cp}
            return prepare(body, pixels=pixels)
        except RequestError as e:  # model rules may quote the model's directory
            raise RequestError(e.field, e.value, public_message(e.expected)) from None

    def _costliest(self, body: dict, job: Job) -> str:
        """The field whose default brings the request within the limits (else the one that helps most), by
        arithmetic on the checked job (`request_cost`): nothing is opened or decoded again."""
        best, best_cost = COST_FIELDS[0], None
        for field in COST_FIELDS:
            if field not in body:
                continue
            try:
                evaluations, mb = request_cost(job, **{field: None})
            except ValueError:  # no window plan with that default (e.g. the overlap left over the window)
                continue
            if evaluations <= self.limits.max_model_evaluations and mb <= self.limits.max_latent_mb:
                return field
            cost = evaluations / self.limits.max_model_evaluations + mb / self.limits.max_latent_mb
            if best_cost is None or cost < best_cost:
                best, best_cost = field, cost
        return best

    def _record(self, job_id: str, client: str | None):
        """The job if `client` may see it (None: any client's), else None."""
        job = self.store.get(job_id)
        return job if job is not None and (client is None or job.client == client) else None

    def check_model(self, field: str, value) -> None:
        """A request's `model` (or a story shot's, named by `field`): the served model, by its name or path."""
        if value not in (self.model_name, self.model):
            raise RequestError(field, value, f"{self.model_name!r}, the model this server runs (or no value)")

    def submit_story(self, body: dict, client: str | None = None, max_jobs: int | None = None) -> dict:
        """Check a story and queue its shots as jobs with dependencies (serve/stories.py). Raises RequestError
        or QueueFull."""
        return self.stories.submit(body, client, max_jobs)

    def get_story(self, story_id: str, client: str | None = None) -> dict | None:
        return self.stories.get(story_id, client)

    def story_file(self, story_id: str, name: str, client: str | None = None) -> str | None:
        return self.stories.file(story_id, name, client)

    def get(self, job_id: str, client: str | None = None) -> dict | None:
        """The job's status; None if there is no such job of `client`'s. Raises Gone for a deleted one."""
        job = self._record(job_id, client)
        if job is not None and job.state == "deleted":
            raise Gone(gone_message(job))
        return job.to_dict() if job else None

    def list(self, limit: int = 20, offset: int = 0, client: str | None = None) -> dict:
        jobs = self.store.list(limit=limit, offset=offset, hide=("deleted",), client=client)
        total = self.store.count(LIVE, client=client)
        return {"data": [j.to_dict() for j in jobs], "limit": limit, "offset": offset, "total": total}

    def cancel(self, job_id: str, client: str | None = None) -> str | None:
        """Stop a queued, paused or running job (its workers are freed; its files stay until it is deleted):
        the state it had, or None if there is no such job of `client`'s. Raises Gone (deleted) or
        NotCancellable (finished)."""
        job = self._record(job_id, client)
        if job is None:
            return None
        if job.state == "deleted":
            raise Gone(gone_message(job))
        if not self.store.update(job_id, state="cancelled", only_from=("queued", "running", "paused")):
            raise NotCancellable(f"job {job_id} is {self.store.get(job_id).state}: nothing to cancel")
        with self._lock:
            if job_id in self._running:
                self._cancel.add(job_id)
        self._log(job_id, f"cancelled on request (it was {job.state})")
        return job.state

    def delete(self, job_id: str, client: str | None = None) -> str | None:
        """Cancel the job if it is queued or running, then delete its files; its state becomes `deleted`
        (reads answer 410). Returns the state it had, or None if there is no such job of `client`'s; raises
        Gone if it was deleted already."""
        job = self._record(job_id, client)
        if job is None:
            return None
        if job.state == "deleted":
            raise Gone(gone_message(job))
        self.store.update(job_id, state="deleted", progress={}, only_from=LIVE)
        with self._lock:
            running = job_id in self._running
            if running:  # its thread stops at the next window and deletes what the job wrote (`_run_job`)
                self._cancel.add(job_id)
                self._deleting.add(job_id)
        if not running:
            self._delete_files(job_id)
        logger.info("job %s deleted (it was %s)", job_id, job.state)
        return job.state

    def _delete_files(self, job_id: str) -> None:
        delete_job(self.store, self.data_dir, job_id, [self.job_dir(job_id)],
                   f"deleted on request (DELETE /v1/videos/{job_id})", Audit(self.data_dir))

    def gc(self, now: float | None = None, dry_run: bool = False) -> list[dict]:
        """The retention sweep (cluster/retention.py): expired outputs and uploads deleted, audited."""
        return gc(self.data_dir, self.retention, now, dry_run)

    def delete_file(self, file_id: str, owner: str | None) -> dict:
        """Delete an uploaded file of `owner`'s (files.owner_of(client); None: anyone's) unless a job that is
        not finished names it: {"deleted": bool} or {"in_use": [job ids]}."""
        users = [j.id for state in ("queued", "running", "paused")
                 for j in self.store.list(limit=100_000, state=state) if file_id in file_ids(j.request)]
        if users and self.files.get(file_id, owner) is not None:
            return {"in_use": users}
        names, size = files_under([self.files.root / file_id], self.data_dir)
        deleted = self.files.delete(file_id, owner)
        if deleted:
            Audit(self.data_dir).write("upload", file_id, f"deleted on request (DELETE /v1/files/{file_id})",
                                       names, size)
        return {"deleted": deleted}

    def job_dir(self, job_id: str) -> Path:
        return job_dir(self.data_dir, job_id)

    def file(self, job_id: str, name: str, client: str | None = None) -> str | None:
        job = self._record(job_id, client)
        path = self.job_dir(job_id) / name
        return str(path) if job is not None and job.state == "done" and path.is_file() else None

    def log(self, job_id: str, client: str | None = None) -> str | None:
        """The job's log (what happened to it, one line each); None if there is no such job of `client`'s.
        Raises Gone for a deleted one."""
        if self.get(job_id, client) is None:
            return None
        try:
            return (self.job_dir(job_id) / "log.txt").read_text()
        except FileNotFoundError:
            return ""

    def _log(self, job_id: str, message: str) -> None:
        JobLog(self.job_dir(job_id), public=public_message)(message)

    def metrics(self) -> bytes:
        for state in STATES:
            self.m_jobs.labels(state).set(self.store.count((state,)))
        self.m_queue_jobs.set(self.store.count(("queued",)))
        left = sum(self._left.values())
        workers = getattr(self.pool, "num_workers", 1)
        self.m_queue_windows.set(left)
        self.m_busy.set(min(left, workers))
        self.m_idle.set(max(0, workers - min(left, workers)))
        # the per-worker series, as the farm monitor's: here the pool's workers (serve's replicas, shared by
        # every job)
        from longtake.serve.farm_monitor import worker_metrics

        return generate_latest(self.registry) + worker_metrics(self.workers())

    def workers(self) -> list[dict]:
        """The pool's workers (serve's pool: the denoiser replicas, as they report themselves)."""
        workers = getattr(self.pool, "workers", None)
        return workers() if workers is not None else []

    def close(self) -> None:
        """Stop: running jobs are checkpointed at their step and go back to the queue."""
        self._stop.set()
        self._wake.set()
        for thread in list(self._running.values()):
            thread.join(timeout=30)
        self._scheduler.join(timeout=5)

    # -- running jobs -----------------------------------------------------------------------------
    def _schedule(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._cancel &= set(self._running)
                if time.monotonic() - self._recovered > min(10.0, self.limits.lease_s / 4):
                    self._recovered = time.monotonic()
                    for job_id, owner in self.store.recover(self.id, self.limits.lease_s, tuple(self._running)):
                        logger.warning("job %s: manager %s is gone; requeued (it resumes from its checkpoint)",
                                       job_id, owner or "?")
                for job_id, dep in self.store.fail_orphans():  # a story's shot whose shot before failed
                    self._log(job_id, f"failed: job {dep}, which it waits for, did not finish")
                while len(self._running) < self.limits.max_running and not self._stop.is_set():
                    job = self.store.claim_next(self.id)
                    if job is None:
                        break
                    thread = threading.Thread(target=self._run_job, args=(job,), daemon=True, name=f"job-{job.id}")
                    self._running[job.id] = thread
                    thread.start()
            try:
                self.stories.tick()  # join the films of stories whose shots are done
            except OSError as e:
                logger.warning("stories: %s", e)
            if time.monotonic() - self._swept >= self.limits.sweep_every_s:
                self._swept = time.monotonic()
                try:
                    self.gc()
                except (OSError, ValueError) as e:
                    logger.warning("retention sweep failed (retried in %g s): %s", self.limits.sweep_every_s, e)
            self._wake.wait(timeout=1.0)
            self._wake.clear()

    def _run_job(self, record) -> None:
        """A claimed job, in its own thread: job_runner.run_leased (lease, checkpoints, the stop policy), with
        this server's model and the client's uploads, its log lines scrubbed of server paths. A job deleted
        while it ran has its files deleted here, as its thread ends."""
        job_id, out_dir = record.id, self.job_dir(record.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        log = JobLog(out_dir, public=public_message)
        log(f"running on {self.id} (lease {record.lease})")

        def request() -> dict:
            from longtake.serve.stories import resolve

            body, extend = resolve(record.request, self.job_dir)  # a story's shot continues another job's video
            local, _ = self.files.local_request(body, None)
            return {**local, **({"extend": extend} if extend else {}), "model": self.model,
                    "out": str(out_dir / "video.mp4"), "preview": str(out_dir / "preview.png")}

        def pool_for(job):
            begin_job = getattr(self.pool, "begin_job", None)  # the ServePool shares its calls by work left
            if begin_job is not None:
                begin_job(len(job.windows) * job.steps)
            return self.pool

        t0 = time.perf_counter()
        try:
            state, result = run_leased(
                self.store, record, self.id, out_dir, request, pool_for, self.limits.checkpoint_every,
                self.limits.lease_s, Provenance.local(self.data_dir, produce_id=job_id),
                Stops(self._stop, cancel=lambda: job_id in self._cancel, poll_s=0.5), log,
                on_progress=_Progress(self, job_id, log), summarize=self._summary)
            if state == "done":
                self.m_duration.observe(time.perf_counter() - t0)
                self.m_frames.inc(result.frames)
        finally:
            self._left.pop(job_id, None)
            with self._lock:
                self._cancel.discard(job_id)
                self._running.pop(job_id, None)
                deleted = job_id in self._deleting
                self._deleting.discard(job_id)
            if deleted:  # DELETE came while it ran: nothing of it is written after this
                self._delete_files(job_id)
            self._wake.set()

    def _summary(self, result) -> dict:
        """What a client sees of a render: its summary without server paths, the model by its served name."""
        summary = {k: v for k, v in result.to_dict().items() if k not in ("out", "preview")}
        summary["model"] = self.model_name
        return summary

    @staticmethod
    def is_final(state: str) -> bool:
        return state in FINAL


class _Progress:
    """A serve job's progress: a log line per step and phase, the window-step histogram, and the window
    predictions left (the queue metrics)."""

    def __init__(self, manager: JobManager, job_id: str, log: JobLog):
        self.manager, self.job_id, self.log = manager, job_id, log
        self.logged, self.last = (None, None), time.perf_counter()

    def __call__(self, p: dict) -> None:
        if (p["phase"], p.get("step")) != self.logged and p["phase"] != "done":
            self.logged = (p["phase"], p.get("step"))
            if p["phase"] == "denoise" and p.get("step"):
                self.log(f"step {p['step']} of {p['steps']} done")
            elif p["phase"] != "denoise":
                self.log(f"{p['phase']}")
        now = time.perf_counter()
        if p["phase"] == "denoise":
            self.manager.m_window.observe(now - self.last)
        self.last = now
        self.manager._left[self.job_id] = p["window_steps_total"] - p["window_steps_done"]
