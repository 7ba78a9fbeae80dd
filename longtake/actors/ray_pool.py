"""Ray actor pool: one `Worker` actor per GPU (num_gpus=1) or per CPU slot (num_cpus=threads).

Dispatch is dynamic: each idle actor takes the next task; results come back in task order, so the
engine fuses in window order whatever the timing. An actor that dies is replaced and its task
retried; a task that fails `max_attempts` times raises `WindowFailed`, never hangs.
Ray is imported here and in `cluster/`, nowhere else.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterable, Iterator

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from longtake.actors.pool import WindowFailed
from longtake.actors.worker import Worker, WorkerSpec

logger = logging.getLogger(__name__)


class RayPool:
    def __init__(self, spec: WorkerSpec, num_workers: int, max_attempts: int = 3, lookahead: int = 2,
                 worker_cls: type = Worker):
        self.spec = spec
        self.num_workers = num_workers
        self.max_attempts = max_attempts
        self.lookahead = lookahead  # tasks beyond the oldest unfinished one, per worker (bounds buffered results)
        if spec.device == "cuda":
            options = {"num_gpus": 1, "num_cpus": 1}
        else:
            options = {"num_cpus": spec.threads}
        self._actor_cls = ray.remote(worker_cls).options(max_restarts=0, max_task_retries=0, **options)
        self.actors = [self._actor_cls.remote(spec) for _ in range(num_workers)]
        self.retries = 0
        ray.get([a.ready.remote() for a in self.actors])

    def put(self, obj: Any) -> Any:
        return ray.put(obj)

    def call(self, method: str, *args) -> Any:
        return next(self.imap(method, [args]))

    def _replace(self, i: int) -> None:
        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._actor_cls.remote(self.spec)

    def imap(self, method: str, args_list: Iterable[tuple]) -> Iterator[Any]:
        tasks = list(args_list)
        todo = deque(range(len(tasks)))
        attempts = [0] * len(tasks)
        done: dict[int, Any] = {}
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (task, actor)
        idle = deque(range(self.num_workers))
        next_out = 0
        limit = self.lookahead * self.num_workers
        try:
            while next_out < len(tasks):
                while idle and todo and todo[0] < next_out + limit:
                    i, a = todo.popleft(), idle.popleft()
                    attempts[i] += 1
                    ref = getattr(self.actors[a], method).remote(*tasks[i])
                    inflight[ref] = (i, a)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                i, a = inflight.pop(ready[0])
                try:
                    done[i] = ray.get(ready[0])
                    idle.append(a)
                except (RayActorError, ActorDiedError, ActorUnavailableError, RayTaskError) as e:
                    self._retry_or_fail(method, i, a, attempts[i], e, todo, idle)
                while next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
        finally:
            for ref in inflight:
                ray.cancel(ref, force=False)

    def _retry_or_fail(self, method, i, a, attempt, error, todo, idle) -> None:
        actor_died = not isinstance(error, RayTaskError) or isinstance(error.cause, RayActorError)
        if actor_died:
            logger.warning("worker %d died during %s task %d; replacing it", a, method, i)
            self._replace(a)
        reason = _reason(error)
        if attempt >= self.max_attempts:
            raise WindowFailed(f"task {i} ({method}) failed {attempt} times; last error: {reason}") from error
        logger.warning("retrying %s task %d (attempt %d of %d) after: %s", method, i, attempt + 1, self.max_attempts,
                       reason)
        self.retries += 1
        todo.appendleft(i)
        idle.append(a)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def _reason(error: Exception) -> str:
    """One line: the worker's own exception for a task error, else the actor error's first line."""
    cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
    if cause is not None and not isinstance(cause, RayActorError):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'worker died'}"
