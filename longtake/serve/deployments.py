"""The Ray Serve application: its deployments, composed by `build_app`, and how it is started.

    Ingress (routes.py: FastAPI, auth, limits, routes) -> Manager (job store, engine threads) -> Denoiser
                                                                          replicas (one model each,
                                                                                    0..max replicas)
The manager's engine threads send their jobs' windows to the denoiser deployment through the ServePool
(actors/serve_pool.py: the jobs' shares of the replicas, timeouts, retries, the text encoder of a family whose
denoisers do not hold it); a replica whose calls keep failing reports itself unhealthy and Serve replaces
it (the blocklist of the Ray pool).

Started by `longtake serve` (`start_server` / `stop_server`), or by `serve deploy` and KubeRay through
`app_builder` (deploy/serve_config.yaml, whose settings override the decorators here).
"""


import asyncio
import os
from dataclasses import asdict, fields
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

from longtake.actors.ray_pool import Group, bundle, fetch_held, node_label
from longtake.actors.serve_pool import Reporter, ServePool, denoiser_spec, start_board
from longtake.actors.worker import Worker
from longtake.cluster.jobs import Conflict, QueueFull
from longtake.request import RequestError
from longtake.serve.limits import Limits
from longtake.serve.manager import Gone, JobManager, NotCancellable, public_message
from longtake.serve.pages import served_hosts
from longtake.serve.routes import Ingress


REPLICA_RESOURCES = {"cpu": {"num_cpus": 1}, "cuda": {"num_gpus": 1, "num_cpus": 1}}  # a denoiser (group member)


@serve.deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 2},
                  max_ongoing_requests=4, ray_actor_options={"num_cpus": 1})
class Denoiser:
    """One loaded model; predicts windows and decodes for every job (and encodes, for small text encoders).

    After `blocklist_after` failed calls it reports itself unhealthy, and Serve replaces it. Its calls (with
    the pool's task, `task`: label and key) and its health checks are reported to the application's board
    (serve_pool.ReplicaBoard: the workers view)."""

    def __init__(self, model_path: str, device: str = "cpu", blocklist_after: int = 3, worker_cls: type = Worker,
                 cp: int = 1):
        spec = denoiser_spec(model_path, device, cp)
        self.group = None
        if cp > 1:  # the leader of a group in this replica's placement group (build_app's bundles)
            self.group = Group(worker_cls, spec, REPLICA_RESOURCES[device])
            self.worker = worker_cls(spec, self.group.leader)
            self.group.started()
        else:
            self.worker = worker_cls(spec)
        self.worker.fetch = fetch_held  # a job's conditioning from the object store, once per job (kept by hash)
        self.blocklist_after, self.failures = blocklist_after, 0
        context = serve.get_replica_context()
        self.board = Reporter(context.app_name, context.replica_tag, node_label())
        self.board.alive()

    def _do(self, method: str, *args, task=None):
        try:
            return self.board.call(method, args, task, lambda: getattr(self.worker, method)(*args))
        except Exception:
            self.failures += 1
            raise

    def info(self) -> dict:
        """This replica's process, its failed calls so far, and whether it holds a text encoder (a family
        with a large one, Wan's UMT5, encodes in the manager: its denoisers never load it)."""
        return {"pid": os.getpid(), "failures": self.failures,
                "text_encoder": getattr(self.worker.backend, "text_encoder", None) is not None}

    def check_health(self):
        if self.blocklist_after and self.failures >= self.blocklist_after:
            raise RuntimeError(f"{self.failures} failed calls: this replica is replaced")
        self.board.alive()

    def encode(self, *args, task=None):
        return self._do("encode", *args, task=task)

    def predict(self, *args, task=None):
        if self.group is not None:  # every member predicts its share; the leader's gathered output is sent
            try:
                return self.board.call("predict", args, task,
                                       lambda: self.group.predict(args, lambda: self.worker.predict(*args)))
            except Exception:
                self.failures += 1
                raise
        return self._do("predict", *args, task=task)

    def decode(self, *args, task=None):
        return self._do("decode", *args, task=task)

    def encode_frames(self, *args, task=None):
        return self._do("encode_frames", *args, task=task)

    def decode_stream(self, *args):
        yield from self.board.stream("decode_stream", args, self.worker.decode_stream(*args))

    def __del__(self):  # Serve stops this replica (scaled down or replaced)
        if hasattr(self, "board"):
            self.board.stopped()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Manager:
    def __init__(self, denoiser: DeploymentHandle, data_dir: str, model: str, max_replicas: int, limits: dict,
                 device: str = "cpu", model_name: str | None = None):
        from longtake.private import private_dir

        os.umask(0o077)  # this replica's process writes the job store, checkpoints and videos: the owner's only
        private_dir(data_dir, "data_dir")
        lim = Limits(**limits)
        board = start_board(serve.get_replica_context().app_name)  # the replicas report to it (workers view)
        pool = ServePool(denoiser, max_replicas, model, device, timeout_s=lim.task_timeout_s,
                         max_attempts=lim.max_attempts, board=board)
        self.manager = JobManager(data_dir, pool, model, lim, model_name)

    async def call(self, method: str, *args):
        """{"value": ...}, or {"gone": message} for a deleted job: errors travel as values across Ray."""
        # the manager's methods touch SQLite and join threads: keep them off the event loop
        try:
            return {"value": await asyncio.to_thread(getattr(self.manager, method), *args)}
        except Gone as e:
            return {"gone": str(e)}
        except NotCancellable as e:
            return {"conflict": str(e)}

    async def submit(self, body: dict, idempotency_key: str | None, client: str | None = None,
                     max_jobs: int | None = None) -> dict:
        """Errors come back as values, not exceptions, across the Ray boundary."""
        try:
            job, created = await asyncio.to_thread(self.manager.submit, body, idempotency_key, client, max_jobs)
        except RequestError as e:
            return {"error": "invalid", "field": e.field, "message": public_message(str(e))}
        except QueueFull as e:
            return {"error": "full", "message": str(e)}
        except Conflict as e:
            return {"error": "conflict", "message": str(e)}
        return {"job": job, "created": created}

    async def submit_story(self, body: dict, client: str | None = None, max_jobs: int | None = None) -> dict:
        """POST /v1/stories: errors come back as values, as `submit`'s."""
        try:
            return {"story": await asyncio.to_thread(self.manager.submit_story, body, client, max_jobs)}
        except RequestError as e:
            return {"error": "invalid", "field": e.field, "message": public_message(str(e))}
        except QueueFull as e:
            return {"error": "full", "message": str(e)}

    def __del__(self):
        self.manager.close()


def start_server(model_path: str, data_dir: str, token: str, host: str, port: int, min_replicas: int,
                 max_replicas: int, limits: Limits, model_name: str | None = None, allowed_hosts=(),
                 address: str | None = None, device: str | None = None) -> bool:
    """`longtake serve`: start (or join) Ray, then Serve's proxy on host:port with the app on `device` (None:
    the cluster's: cuda where it has a GPU). Returns whether Ray was started here (`stop_server` stops it
    then)."""
    from longtake.actors import ray_boot

    started = ray_boot.start_ray(address)
    device = device or ("cuda" if ray_boot.cluster_resources().get("GPU", 0) >= 1 else "cpu")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model_path, data_dir, token, device, min_replicas, max_replicas, limits,
                        model_name=model_name, allowed_hosts=allowed_hosts), name="longtake", route_prefix="/")
    return started


def stop_server(started_ray: bool) -> None:
    """Shut Serve down (if it is up), and Ray too when `start_server` started it."""
    import ray

    from longtake.actors import ray_boot

    if ray.is_initialized():
        serve.shutdown()
        if started_ray:
            ray_boot.stop_ray()


def denoiser_options(device: str, cp: int = 1) -> dict:
    """A denoiser replica's resources; a group's (cp > 1): the replica in the first bundle of a placement group,
    its members in the others, packed on one node (deploy/serve_config.yaml must say the same)."""
    resources = REPLICA_RESOURCES[device]
    if cp == 1:
        return {"ray_actor_options": resources}
    return {"ray_actor_options": resources, "placement_group_bundles": [bundle(resources)] * cp,
            "placement_group_strategy": "STRICT_PACK"}


def build_app(model_path: str, data_dir: str, token: str, device: str = "cpu", min_replicas: int = 0,
              max_replicas: int = 2, limits: Limits = Limits(), downscale_delay_s: float = 30,
              model_name: str | None = None, worker_cls: type = Worker, allowed_hosts: list[str] | None = None):
    """The bound application, ready for serve.run(). `model_name` is what clients see (default: the
    model directory's name); `allowed_hosts` the Host names the API answers to (pages.served_hosts;
    default: the loopback names only)."""
    denoiser = Denoiser.options(autoscaling_config={
        "min_replicas": min_replicas, "max_replicas": max_replicas, "initial_replicas": min_replicas,
        "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": downscale_delay_s},
        health_check_period_s=2, **denoiser_options(device, limits.cp),
    ).bind(model_path, device, limits.blocklist_after, worker_cls, limits.cp)
    manager = Manager.bind(denoiser, data_dir, model_path, max_replicas, asdict(limits), device, model_name)
    return Ingress.bind(manager, token, asdict(limits), data_dir, model_path, model_name or Path(model_path).name,
                        list(allowed_hosts) if allowed_hosts is not None else None)


def app_builder(args: dict):
    """Application builder for `serve deploy` / KubeRay (see deploy/serve_config.yaml).

    args: model ('default' or a directory), data_dir (default: private.default_data_dir(), a per-user
    directory; it must be private: longtake/private.py), device ('cpu' | 'cuda'), min_replicas, max_replicas,
    allowed_hosts (the Host names the API answers to besides the loopback ones: the service's names, or
    ['*']), and optional limits (the fields of serve.manager.Limits: max_seconds, max_fps, max_steps,
    max_side, max_timeline_keys, max_model_evaluations, max_latent_mb, max_queued, max_running,
    max_body_bytes, ...). The API token comes from $LONGTAKE_API_TOKEN (a Kubernetes secret), else
    DATA_DIR/api_token."""
    from longtake.private import private_dir
    from longtake.pipelines import inspect_model
    from longtake.pipelines.parallel import server_mode
    from longtake.private import default_data_dir
    from longtake.serve import load_or_create_token

    model = inspect_model(args.get("model", "default"))
    data_dir = str(private_dir(args.get("data_dir") or default_data_dir(), "data_dir"))
    token, _ = load_or_create_token(data_dir)
    limit_keys = {f.name for f in fields(Limits)}
    limits = Limits(**{k: v for k, v in args.items() if k in limit_keys})
    server_mode(model, limits.cp)  # a model that cannot shard its windows refuses cp
    hosts = args.get("allowed_hosts")
    return build_app(model.path, data_dir, token, args.get("device", "cpu"), int(args.get("min_replicas", 0)),
                     int(args.get("max_replicas", 2)), limits, float(args.get("downscale_delay_s", 30)),
                     model_name=args.get("model", "default"),
                     allowed_hosts=served_hosts(None, [hosts] if isinstance(hosts, str) else hosts))
