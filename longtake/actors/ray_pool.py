"""Ray actor pool: one `Worker` actor per GPU (num_gpus=1) or per CPU slot (num_cpus=threads).

Dispatch is dynamic: queued tasks (`submit` / `poll` tickets, see `pool.py`) go lowest key first to
the actors with the fewest tasks, up to `depth` per actor, so an actor starts its next task the moment
it finishes one instead of waiting for a round trip through the driver. Results come back as they
finish; the engine fuses in window order whatever the timing (`ordered` restores list order for
`imap`). An actor that dies (or whose node is lost) is replaced and its task retried; tasks queued
behind it go back first in line without using an attempt. The replacement joins when it has started,
so a lost node never blocks the job. A slot whose actor fails to start `max_attempts` times (its own
error: the model does not load) is excluded; one whose starting actor is killed or loses its node is
started again, and excluded only after `LOST_STARTS` x `max_attempts` such losses in a row (a node that
keeps dying under it). An actor whose tasks fail `blocklist_after` times is excluded
(killed, not replaced), like a blocklisted render node. A task that fails `max_attempts` times, or a pool
left with no worker, raise `WindowFailed`: never a hang.

A task has a time limit, counted from when its actor was free to start it: `task_timeout_s` when given,
else TIMEOUT_FACTOR x the slowest task of its method so far (a job's measured window time), at least
TIMEOUT_FLOOR_S, and FIRST_TIMEOUT_S before one of its method has returned (a first window warms up). An
actor alive but hung past it is killed and replaced, and its task retried like a dead worker's. No call
blocks for longer than `pool.WAIT_S`: `poll(timeout)` returns [] and `imap` / `stream` call `tick`, so the
engine checks cancel, pause and shutdown at least every second.

A consumer that stops early (a cancelled or paused job cancels its tickets, or closes `imap` /
`stream`) leaves the pool ready for the next call: its tasks are cancelled, and as `ray.cancel` does
not stop an actor task already running, an actor still finishing one is "stale": the next calls use
the other workers, it rejoins when that task is done, and one still busy after `stale_timeout_s` is
killed and replaced. Nothing queues behind stale work.
With spec.cp > 1 (context parallelism) a slot is a group of cp actors in its own placement group (one
node): its leader is the slot's actor, as above, and the other members are the leader's (`Group`); a broken
group is a dead actor to the pool, replaced and its window retried.
Ray is imported here and in `cluster/`, nowhere else.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import warnings
from dataclasses import replace
from typing import Any, Iterable, Iterator

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group

from longtake.actors.pool import WAIT_S, RetryPolicy, Task, Tickets, Traffic, WindowFailed, WorkerBook, hold, ordered
from longtake.actors.worker import Held, Worker, WorkerSpec, WindowConditioning, encoder_spec

logger = logging.getLogger(__name__)


STREAM_BACKLOG = 4  # decoded chunks a streaming worker may run ahead of the driver
LOST_STARTS = 5  # x max_attempts: starts lost in a row (killed, node gone) before a slot is excluded
# the default task time limit (module docstring): a hung worker is replaced after this, a slow one never
TIMEOUT_FACTOR = 10.0
TIMEOUT_FLOOR_S = 120.0
FIRST_TIMEOUT_S = 600.0


def _wire(value):
    """A CPU tensor crosses Ray as a numpy array (pickle 5, out of band: cheaper than a torch tensor's
    pickling on both ends, which is the driver's time per window); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype in _NUMPY_DTYPES:
        return _Wired(value.numpy())
    return value


def _unwire(value):
    """A tensor as `_wire` sent it. Mapped read-only from Ray's object store, it is used as it is, no copy:
    the engine only reads a prediction (fusion and the scheduler step make new tensors; no diffusers
    scheduler writes its model output), and the store keeps it until the tensor is dropped."""
    if not isinstance(value, _Wired):
        return value
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(value.array)


class _Wired:
    """A tensor sent as its numpy array (a marker, so a method's own numpy results stay numpy)."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return _Wired, (self.array,)


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)


def fetch_held(held: Held):
    """A job's conditioning a Ray pool put (`RayPool.put`, serve's pool): from the object store."""
    return ray.get(held.value[0])


def node_label() -> str:
    """This process's Ray node, as the monitors show it: its address and the start of its id."""
    context = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:6]}"


def _actor_class(worker_cls: type):
    """The worker class with its generator method declared as a Ray stream with backpressure, `predict`
    taking and returning tensors as `_wire` sends them, and a job's conditioning fetched from the store."""

    class Actor(worker_cls):
        def ready(self) -> dict:
            return {**super().ready(), "node": node_label()}

        def fetch(self, held):
            return fetch_held(held)

        @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_BACKLOG)
        def decode_stream(self, *args):
            yield from super().decode_stream(*args)

        def predict(self, *args):
            return _wire(super().predict(*(_unwire(a) for a in args)))

    Actor.__name__ = Actor.__qualname__ = worker_cls.__name__
    return Actor


def _free_port() -> int:
    """A TCP port free on this node now, for a group's rendezvous (rank 0 listens on it)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _member_class(worker_cls: type):
    """A group's member other than its leader: it predicts its share of each window the leader passes on
    (`follow`), and returns nothing (every member gets the whole gathered output; the leader's is sent)."""

    class Member(worker_cls):
        def ready(self) -> dict:
            return {**super().ready(), "node": node_label()}

        def fetch(self, held):
            return fetch_held(held)

        def follow(self, *args) -> None:
            super().predict(*(_unwire(a) for a in args))

    Member.__name__ = Member.__qualname__ = f"{worker_cls.__name__}Member"
    return Member


class Group:
    """A group leader's other members (context parallelism, pipelines/parallel.py): started in bundles 1..cp-1
    of the leader's placement group (which packs the group on one node), they meet the leader at a port of its
    node. The leader joins with `leader` (its own Worker's member), then `started`; `predict` sends a window to
    every member and runs the leader's own share. The members are owned by the leader: they die with it. A
    member that dies, or a collective that fails or times out, breaks the group: the leader's process exits,
    and what started it (the pool, Serve) starts a new one and retries the window, as for any dead worker."""

    def __init__(self, worker_cls: type, spec: WorkerSpec, resources: dict):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from longtake.pipelines.parallel import GROUP_TIMEOUT_S, Member

        self.size, self.timeout_s, self.lock = spec.cp, GROUP_TIMEOUT_S, threading.Lock()
        address = f"{ray.util.get_node_ip_address()}:{_free_port()}"
        placement = ray.util.get_current_placement_group()
        if placement is None:
            raise RuntimeError(f"a group of {spec.cp} starts in a placement group of {spec.cp} bundles (Serve: the "
                               f"Denoiser deployment's placement_group_bundles, docs/serving.md)")
        member_cls = ray.remote(_member_class(worker_cls))
        self.leader = Member(0, spec.cp, address)
        self.members = [member_cls.options(max_restarts=0, max_task_retries=0, **resources,
                                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                                               placement, placement_group_bundle_index=rank)).remote(
            replace(spec, roles=("predict",)), Member(rank, spec.cp, address)) for rank in range(1, spec.cp)]

    def started(self) -> None:
        """Every member is up (after the leader has joined: joining returns when all have)."""
        ray.get([m.ready.remote() for m in self.members], timeout=self.timeout_s)

    def predict(self, args: tuple, own):
        """The leader's `own()` result for a window every member predicts too (`args`, as the leader got them).
        One window at a time: a Serve replica takes several calls at once (threads), and every member must run
        the windows' collectives in the same order."""
        with self.lock:
            refs = [m.follow.remote(*args) for m in self.members]
            try:
                out = own()
                ray.get(refs, timeout=self.timeout_s)
            except Exception as e:  # a dead or hung member, or a failed collective: the group is broken
                logger.error("group of %d broken (%s: %s); its leader exits so that a new group starts", self.size,
                             type(e).__name__, e)
                os._exit(1)
            return out


def _group_class(worker_cls: type, resources: dict):
    """A pool slot of a group of spec.cp actors: this actor is the leader, in bundle 0 of the slot's
    placement group (`Group`)."""

    class Leader(_actor_class(worker_cls)):
        def __init__(self, spec: WorkerSpec):
            self.group = Group(worker_cls, spec, resources)
            super().__init__(spec, self.group.leader)  # returns when every member has joined
            self.group.started()

        def predict(self, *args):
            return self.group.predict(args, lambda: super(Leader, self).predict(*args))

    Leader.__name__ = Leader.__qualname__ = f"{worker_cls.__name__}Group"
    return Leader


class RayPool:
    def __init__(self, spec: WorkerSpec, num_workers: int, max_attempts: int = 3, lookahead: int = 2,
                 worker_cls: type = Worker, blocklist_after: int = 0, task_timeout_s: float | None = None,
                 start_timeout_s: float = 600.0, join_grace_s: float = 30.0, stale_timeout_s: float = 60.0,
                 depth: int = 2, timeout_floor_s: float = TIMEOUT_FLOOR_S, first_timeout_s: float = FIRST_TIMEOUT_S):
        self.spec = spec
        self.retry = RetryPolicy(max_attempts)
        self.max_attempts = max_attempts
        self.lookahead = lookahead  # tasks beyond the oldest unfinished one, per worker (bounds buffered results)
        self.blocklist_after = blocklist_after  # failed tasks before an actor is excluded (0: never)
        self.task_timeout_s = task_timeout_s  # None: measured (`timeout`)
        self.timeout_floor_s, self.first_timeout_s = timeout_floor_s, first_timeout_s
        self.slowest: dict[str, float] = {}  # method -> the longest a task of it took (from its actor being free)
        self.start_timeout_s = start_timeout_s  # how long to wait for a replacement when no worker is left
        self.stale_timeout_s = stale_timeout_s  # how long an actor may finish a cancelled task before it is replaced
        self._stale: dict[Any, tuple[int, float]] = {}  # ready() probe queued behind a cancelled task -> (slot, since)
        self.tickets = Tickets()
        self._inflight: dict[Any, tuple[int, int, float, Any]] = {}  # ref -> (ticket, slot, submitted at, actor)
        self.depth = depth  # tasks sent to an actor at once: the next waits on the actor, not on a round trip
        self._freed: dict[int, float] = {}  # slot -> when its last task returned (a queued task starts then)
        self.traffic = Traffic()  # bytes to and from the workers, by kind
        self._holds: dict[Any, set[str]] = {}  # actor -> the keys of the job conditionings it was sent
        self.book = WorkerBook(num_workers)  # what each slot does and did (the monitors, Prometheus)
        if spec.device == "cuda":
            options = {"num_gpus": 1, "num_cpus": 1}
        else:
            options = {"num_cpus": spec.threads}
        cls = _actor_class(worker_cls) if spec.cp == 1 else _group_class(worker_cls, options)
        self._actor_options = dict(max_restarts=0, max_task_retries=0, **options)
        self._actor_cls = ray.remote(cls)
        self._worker_cls = worker_cls
        self._encoder = None  # the encode-role actor, when the workers do not encode
        # a slot of a group (spec.cp > 1): its placement group of cp bundles on one node, kept while the slot
        # lives (a group started again lands in it; Ray moves it when its node is lost)
        self._placements = [placement_group([bundle(options)] * spec.cp, strategy="STRICT_PACK")
                            for _ in range(num_workers)] if spec.cp > 1 else []
        self.actors: list = [self._new_actor(a) for a in range(num_workers)]  # None: excluded slot
        self.failures = [0] * num_workers  # failed tasks of each slot's current actor
        self.starting: dict[Any, int] = {}  # ready() ref of a replacement -> slot
        self.start_failures = [0] * num_workers  # its own start errors (the model does not load)
        self.start_losses = [0] * num_workers  # starting actors killed or lost with their node, in a row
        self.retries = 0
        self.excluded = 0
        self.last_start_error = ""
        # wait until every actor has started, or, once one has, at most `join_grace_s` more: an actor that
        # cannot be placed (a node lost while the pool is made) joins later, when it starts. Actors whose
        # node dies while they start are replaced, like any other.
        self.starting = {a.ready.remote(): i for i, a in enumerate(self.actors)}
        t0, first = time.monotonic(), None
        while self.starting and (first is None or time.monotonic() - first < join_grace_s):
            if time.monotonic() - t0 > self.start_timeout_s:
                raise WindowFailed(f"no worker started in {self.start_timeout_s:g} s (not enough resources?)")
            ready, _ = ray.wait(list(self.starting), num_returns=1, timeout=1.0)
            if ready and self._started(ready[0]) is not None and first is None:
                first = time.monotonic()
        if self.num_workers == 0:
            raise WindowFailed(f"no worker could start: {self.last_start_error}")

    @property
    def num_workers(self) -> int:
        return sum(a is not None for a in self.actors)

    def put(self, obj: Any) -> Held:
        """A job's conditioning into the object store, once: each worker fetches it on its first window."""
        return hold(obj, [ray.put(obj)])

    def release(self, held: Held) -> None:
        """The job is over: its workers drop its conditioning (the store drops it with the last reference)."""
        for actor in self.actors:
            if actor is not None:
                actor.forget.remote(held.key)
        for keys in self._holds.values():
            keys.discard(held.key)

    def call(self, method: str, *args, tick=None) -> Any:
        return next(self.imap(method, [args], tick))

    def encode(self, *args, tick=None) -> Any:
        """The job's conditioning, once: on a worker, or on the pool's encoder actor (replaced when it dies
        or hangs past the time limit of `encode`)."""
        if "encode" in self.spec.roles:
            return self.call("encode", *args, tick=tick)
        for attempt in range(1, self.max_attempts + 1):
            if self._encoder is None:
                # no CPU reserved: it runs once per job, before any window, while the predictors wait on it
                # (they hold every CPU slot of a small cluster)
                self._encoder = ray.remote(self._worker_cls).options(
                    max_restarts=0, max_task_retries=0, num_cpus=0).remote(encoder_spec(self.spec))
            ref, since = self._encoder.encode.remote(*args), time.monotonic()
            try:
                while not ray.wait([ref], timeout=WAIT_S)[0]:
                    if time.monotonic() - since > self.timeout("encode"):
                        raise GetTimeoutError(f"encoding ran over {self.timeout('encode'):g} s (hung?)")
                    if tick is not None:
                        tick()
                result = ray.get(ref)
                self._measured("encode", time.monotonic() - since)
                self.traffic.received("encode", result)
                return result
            except RayError as e:
                ray.kill(self._encoder, no_restart=True)
                self._encoder = None
                if attempt == self.max_attempts:
                    raise WindowFailed(f"encoding failed {attempt} times; last error: {_reason(e)}") from e
                logger.warning("encoder failed (%s); retrying", _reason(e))

    def stream(self, method: str, args: tuple, tick=None) -> Iterator[Any]:
        """Items of one generator task in order. A lost worker is replaced and the stream restarted on a
        live one, skipping what was already yielded (the method takes `skip` after `args`); so is one that
        yields nothing for longer than the task time limit (hung). `tick()` runs at least every WAIT_S
        seconds while it waits."""
        delivered, attempt, waiting_since = 0, 0, None
        self._poll_stale()
        while True:
            busy = self._busy()
            live = [a for a, actor in enumerate(self.actors) if actor is not None and a not in busy]
            if not live:
                if not self.starting and not self._stale:
                    raise WindowFailed(f"no worker left for {method}: {self.excluded} excluded")
                waiting_since = waiting_since or time.monotonic()
                ready, _ = ray.wait(list(self.starting) + list(self._stale), num_returns=1, timeout=WAIT_S)
                if ready and ready[0] in self._stale:
                    self._reap(ready[0])
                elif ready:
                    self._started(ready[0])
                else:
                    self._expire_stale()
                    if time.monotonic() - waiting_since > self.start_timeout_s:
                        raise WindowFailed(f"no worker could be started in {self.start_timeout_s:g} s for {method}")
                    if tick is not None:
                        tick()
                continue
            waiting_since, a = None, live[0]
            attempt += 1
            stream, finished = getattr(self.actors[a], method).remote(*args, delivered), False
            self.book.sent(a, stream, Task(method, args, f"{method} from item {delivered}"),
                           self.traffic.sent(method, args, False))
            try:
                while True:
                    since = time.monotonic()
                    while not ray.wait([stream], timeout=WAIT_S)[0]:  # the next item (or the end)
                        if time.monotonic() - since > self.timeout(method):
                            raise GetTimeoutError(f"{method} gave no item for {self.timeout(method):g} s on "
                                                  f"worker {a}")
                        if tick is not None:
                            tick()
                    try:
                        ref = next(stream)
                    except StopIteration:
                        finished = True
                        return
                    item = ray.get(ref)
                    self._measured(method, time.monotonic() - since)
                    self.book.moved(a, self.traffic.received(method, item))
                    delivered += 1
                    yield item
            except RayError as e:
                self._stream_failed(method, a, attempt, e)
            finally:
                self.book.ended(a, stream, ok=True if finished else None)
                if not finished:  # failed, or the consumer stopped early (cancelled job, frames all written)
                    self._abandon({stream: a})

    def _stream_failed(self, method: str, a: int, attempt: int, error) -> None:
        if not isinstance(error, RayTaskError) or isinstance(error.cause, RayActorError):  # dead, or hung
            logger.warning("worker %d died during %s (%s); replacing it", a, method, _reason(error))
            self._replace(a)
        else:
            self.failures[a] += 1
            if self.blocklist_after and self.failures[a] >= self.blocklist_after:
                self._exclude(a, _reason(error))
        self.retry.after_failure(method, attempt, _reason(error), error)
        self.retries += 1

    def _busy(self) -> set[int]:
        """Slots whose actor cannot take a task now: starting, running a task, or still running a cancelled
        one."""
        return set(self.starting.values()) | {a for a, _ in self._stale.values()} | set(self._load())

    def _load(self) -> dict[int, int]:
        """Tasks sent to each slot's actor and not returned."""
        load: dict[int, int] = {}
        for _, a, _, _ in self._inflight.values():
            load[a] = load.get(a, 0) + 1
        return load

    def _abandon(self, refs: dict) -> None:
        """Cancel the tasks (ref -> slot) of a call that stopped early. A task already running goes on (Ray
        only cancels actor tasks not yet started): its actor is stale until a ready() probe queued behind
        it returns."""
        busy, now = self._busy(), time.monotonic()
        for ref, a in refs.items():
            try:
                ray.cancel(ref, force=False)
            except RayError:
                pass  # its worker is already gone
            if a < len(self.actors) and self.actors[a] is not None and a not in busy:  # (a pool shut down: none)
                self._stale[self.actors[a].ready.remote()] = (a, now)
                busy.add(a)

    def _reap(self, ref) -> int | None:
        """A stale actor's probe came back: the slot is idle again (or, its actor dead, being replaced)."""
        a, _ = self._stale.pop(ref)
        try:
            ray.get(ref)
            return a
        except RayError as e:
            logger.warning("worker %d died finishing a cancelled task (%s); replacing it", a, _reason(e))
            self._replace(a)
            return None

    def _poll_stale(self) -> None:
        """Stale actors that are done now rejoin (no waiting); the ones busy too long are replaced."""
        if self._stale:
            ready, _ = ray.wait(list(self._stale), num_returns=len(self._stale), timeout=0)
            for ref in ready:
                self._reap(ref)
        self._expire_stale()

    def _expire_stale(self) -> None:
        now = time.monotonic()
        for ref, (a, since) in list(self._stale.items()):
            if now - since > self.stale_timeout_s:
                del self._stale[ref]
                logger.warning("worker %d still runs a cancelled task after %g s; replacing it", a,
                               self.stale_timeout_s)
                self._replace(a)

    def _new_actor(self, a: int):
        """Slot a's actor: a worker, or the leader of a group in the slot's placement group."""
        if not self._placements:
            return self._actor_cls.options(**self._actor_options).remote(self.spec)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return self._actor_cls.options(**self._actor_options, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self._placements[a], placement_group_bundle_index=0)).remote(self.spec)

    def _replace(self, a: int) -> None:
        self.book.replaced(a)
        ray.kill(self.actors[a], no_restart=True)
        self._holds.pop(self.actors[a], None)
        self.actors[a] = self._new_actor(a)
        self.failures[a] = 0
        self.starting[self.actors[a].ready.remote()] = a  # joins when started (maybe never: lost node)

    def _started(self, ref) -> int | None:
        """A ready() ref came back: the slot, now usable; or None (failed: retried or excluded)."""
        a = self.starting.pop(ref)
        try:
            info = ray.get(ref)
            self.book.started(a, info.get("node", "") if isinstance(info, dict) else "")
            logger.info("worker %d started", a)
            self.start_losses[a] = 0
            return a
        except RayError as e:
            self.last_start_error = _reason(e)
            lost = isinstance(e, RayActorError) and not e.actor_init_failed  # killed or its node lost: not its fault
            if lost:
                self.start_losses[a] += 1
            else:
                self.start_failures[a] += 1
            if self.start_failures[a] >= self.max_attempts or self.start_losses[a] >= LOST_STARTS * self.max_attempts:
                logger.warning("excluding worker %d: it failed to start %d times and was lost starting %d times in "
                               "a row (%s)", a, self.start_failures[a], self.start_losses[a], self.last_start_error)
                self._drop(a)
            else:
                logger.warning("worker %d %s (%s); starting it again", a,
                               "was lost while starting" if lost else "failed to start", self.last_start_error)
                self._replace(a)
            return None

    def _exclude(self, a: int, reason: str) -> None:
        left = self.num_workers - 1
        logger.warning("excluding worker %d after %d failed task%s (last: %s); %d worker%s left", a, self.failures[a],
                       "s" * (self.failures[a] != 1), reason, left, "s" * (left != 1))
        self._drop(a)

    def _drop(self, a: int) -> None:
        """Kill a slot's actor and leave the slot empty: the pool is one worker smaller."""
        self.book.excluded(a)
        ray.kill(self.actors[a], no_restart=True)
        self.actors[a] = None
        self.excluded += 1
        if self._placements:
            remove_placement_group(self._placements[a])

    def timeout(self, method: str) -> float:
        """The time limit of a task of `method` (module docstring)."""
        if self.task_timeout_s is not None:
            return self.task_timeout_s
        if method not in self.slowest:
            return max(self.first_timeout_s, self.timeout_floor_s)
        return max(self.timeout_floor_s, TIMEOUT_FACTOR * self.slowest[method])

    def _measured(self, method: str, seconds: float) -> None:
        self.slowest[method] = max(self.slowest.get(method, 0.0), seconds)

    @property
    def outstanding(self) -> int:
        return len(self.tickets)

    def submit(self, method: str, args: tuple, key: tuple = (), label: str | None = None) -> int:
        """Queue a task; the lowest key starts first on the next idle worker (`poll` dispatches)."""
        if method == "predict":
            args = tuple(_wire(a) for a in args)
        return self.tickets.add(method, args, key, label)

    def cancel(self, tickets: Iterable[int] | None = None) -> None:
        """Drop queued tasks and abandon running ones (all when `tickets` is None): their actors rejoin
        when done (stale), nothing queues behind them."""
        drop = self.tickets.cancel(tickets)
        abandon = {ref: a for ref, (ticket, a, _, _) in self._inflight.items() if ticket in drop}
        for ref in abandon:
            self.book.ended(abandon[ref], self._inflight.pop(ref)[0], ok=None)
        self._abandon(abandon)

    def _dispatch(self) -> None:
        """Queued tasks, lowest key first, to the actors with the fewest tasks (up to `depth` each)."""
        unavailable = set(self.starting.values()) | {a for a, _ in self._stale.values()}
        load = self._load()
        for level in range(self.depth):
            for a, actor in enumerate(self.actors):
                if actor is None or a in unavailable or load.get(a, 0) != level:
                    continue
                ticket = self.tickets.pop()
                if ticket is None:
                    return
                task = self.tickets.tasks[ticket]
                sent = self.traffic.sent(task.method, task.args, self._fetches(actor, task.args))
                self.book.sent(a, ticket, task, sent)
                self._inflight[getattr(actor, task.method).remote(*task.args)] = (ticket, a, time.monotonic(), actor)
                load[a] = level + 1

    def _fetches(self, actor, args: tuple) -> bool:
        """Whether a task's actor will fetch the job's conditioning it carries (it holds what it was sent)."""
        cond = next((a for a in args if isinstance(a, WindowConditioning)), None)
        if cond is None:
            return False
        keys = self._holds.setdefault(actor, set())
        if cond.job.key in keys:
            return False
        keys.add(cond.job.key)
        return True

    def poll(self, timeout: float | None = None) -> list[tuple[int, Any]]:
        """Dispatch queued tasks to idle workers and wait for one to finish: [(ticket, result)], or [] when
        nothing is queued or running, or when none finished within `timeout` seconds. A failed task is
        retried (the policy), a dead or hung worker replaced."""
        self._poll_stale()
        waiting_since = None  # when the pool last had nothing running and only replacements starting
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dispatch()
            if not self._inflight and not self.tickets.queued:
                return []
            if not self._inflight and not self.starting and not self._stale:
                label = self.tickets.peek().label
                raise WindowFailed(f"no worker left for {label}: {self.excluded} excluded"
                                   + (f" (last start error: {self.last_start_error})" if self.last_start_error else ""))
            waiting_since = (waiting_since or time.monotonic()) if not self._inflight else None
            if waiting_since and time.monotonic() - waiting_since > self.start_timeout_s:
                label = self.tickets.peek().label
                raise WindowFailed(f"no worker could be started in {self.start_timeout_s:g} s for {label} "
                                   "(not enough resources left in the cluster?)")
            left = WAIT_S if deadline is None else min(WAIT_S, max(0.0, deadline - time.monotonic()))
            ready, _ = ray.wait(list(self._inflight) + list(self.starting) + list(self._stale), num_returns=1,
                                timeout=left)
            if not ready:
                self._check_timeouts()
                self._expire_stale()
                if deadline is not None and time.monotonic() >= deadline:
                    return []
                continue
            if ready[0] in self._stale:
                self._reap(ready[0])
                continue
            if ready[0] in self.starting:
                self._started(ready[0])
                continue
            ticket, a, since, actor = self._inflight.pop(ready[0])
            now = time.monotonic()
            started = max(since, self._freed.get(a, since))  # when its actor was free to start it
            self._freed[a] = now
            try:
                result = ray.get(ready[0])
            except RayError as e:
                self._retry_or_fail(ticket, a, e, actor=actor)
                continue
            method = self.tickets.finish(ticket).method
            self._measured(method, now - started)
            self.book.ended(a, ticket, self.traffic.received(method, result), now=now)
            return [(ticket, _unwire(result))]

    def imap(self, method: str, args_list: Iterable[tuple], tick=None) -> Iterator[Any]:
        return ordered(self, method, args_list, self.lookahead * max(1, len(self.actors)), tick)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        oldest: dict[int, tuple] = {}  # per slot, its first task (the one running; the others wait behind it)
        for ref, (ticket, a, since, actor) in self._inflight.items():
            if a not in oldest or since < oldest[a][1]:
                oldest[a] = (ref, since, ticket, actor)
        for a, (ref, since, ticket, actor) in oldest.items():
            task = self.tickets.tasks[ticket]
            label, limit = task.label, self.timeout(task.method)
            if now - max(since, self._freed.get(a, since)) > limit:
                del self._inflight[ref]  # the worker is killed and replaced below: that stops the task
                error = GetTimeoutError(f"{label} ran over {limit:g} s on worker {a} (hung?)")
                self._retry_or_fail(ticket, a, error, hung=True, actor=actor)

    def _retry_or_fail(self, ticket: int, a: int, error, hung: bool = False, actor=None) -> None:
        task = self.tickets.tasks[ticket]
        self.book.ended(a, ticket, ok=False)
        actor_died = hung or not isinstance(error, RayTaskError) or isinstance(error.cause, RayActorError)
        reason = _reason(error)
        if actor is not None and self.actors[a] is not actor:
            # queued behind a task that killed or hung its actor (already replaced or excluded): it never
            # ran, so it goes back first in line without using an attempt
            self.tickets.requeue(ticket, attempt_used=False)
            return
        if actor_died:
            logger.warning("worker %d died during %s (%s); replacing it", a, task.label, reason)
            self._replace(a)
        else:
            self.failures[a] += 1
            if self.blocklist_after and self.failures[a] >= self.blocklist_after:
                self._exclude(a, reason)
        try:
            self.retry.after_failure(task.label, task.attempts, reason, error)
        except WindowFailed:
            self.cancel()  # the job is over: nothing of it stays queued or running
            raise
        self.retries += 1
        self.tickets.requeue(ticket)

    def workers(self) -> list[dict]:
        """What each worker slot does and did (pool.WorkerBook.snapshot)."""
        return self.book.snapshot()

    def stats(self) -> list[dict]:
        """Per live worker: seconds of each predict / decode call since the last call (then reset)."""
        return ray.get([a.stats.remote() for a in self.actors if a is not None])

    def shutdown(self) -> None:
        for actor in self.actors + [self._encoder]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        for a, placement in enumerate(self._placements):
            if a < len(self.actors) and self.actors[a] is not None:
                remove_placement_group(placement)
        self._placements = []
        self.actors = []
        self._encoder = None
        self.starting = {}
        self._stale = {}
        self.tickets, self._inflight = Tickets(), {}


def bundle(options: dict) -> dict:
    """A placement-group bundle holding one worker of these actor options (the Ray pool's, Serve's)."""
    return {"GPU": options["num_gpus"], "CPU": options["num_cpus"]} if "num_gpus" in options \
        else {"CPU": options["num_cpus"]}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor names in its messages


def _reason(error: Exception) -> str:
    """One line: the worker's own exception for a task error or a failed start, else the actor error's first
    line."""
    cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
    if cause is not None and not isinstance(cause, RayActorError):
        return f"{type(cause).__name__}: {cause}"
    text = _ANSI.sub("", str(error)).strip()
    if isinstance(error, RayActorError) and error.actor_init_failed and text:
        return f"{text.splitlines()[-1].strip()} (raised as the worker started)"  # its traceback's last line
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'worker died'}"
