"""The pool core: the worker-pool interface, the one ticket book and retry policy every pool uses, and the
in-process pool (the reference result).

A pool runs worker methods as tickets: `submit(method, args, key, label)` queues one task and returns its
ticket; `poll(timeout)` runs or waits for queued tasks and returns those finished, as [(ticket, result)], in
whatever order they finish (the lowest `key` starts first when workers are scarce), or [] after `timeout`
seconds with none finished (`outstanding` says how many tickets are still queued or running); `cancel(tickets)`
drops queued ones and abandons running ones. No wait is unbounded: a caller polls with a timeout of WAIT_S and
checks whether to stop (cancel, pause, shutdown) between polls; `imap` and `stream` take a `tick` callback for
the same (it raises to stop them). A failed task is retried by the one `RetryPolicy` (the
same in the in-process, Ray and Serve pools) and, past its attempts, raises `WindowFailed` naming it.
`imap` (results in list order, a bounded number in flight) is built on the tickets for every pool; `stream`
yields the items of one generator method run on one worker (an ordered decode session); `encode` makes a
job's conditioning once; `put` makes it a `Held` (its content hash, and where workers fetch it from: each
fetches it once and keeps it, worker.py) and `release` tells the workers the job is over. The Ray pool
(`ray_pool.py`) and the Serve pool (`serve_pool.py`) have the same
methods; all three are thin executors over the same `Tickets` (queue by key, cancel, attempts) and
`RetryPolicy`, and differ only in how a task runs (here, on Ray actors, as Serve calls). The in-process and
Ray pools keep a `WorkerBook` (`workers()`: what each worker computes now, its utilisation, window-steps,
bytes, failures and restarts), which a job's progress carries to the monitors and Prometheus; `Traffic`
counts the bytes by kind (`longtake bench --simulate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch

from longtake.actors.worker import Held, Worker, WorkerSpec, WindowConditioning

logger = logging.getLogger(__name__)


WAIT_S = 1.0  # the longest a pool blocks before its caller may check whether to stop


class WindowFailed(RuntimeError):
    """A task failed on every attempt; the job cannot finish."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed task runs again, in every pool: `max_attempts` in all (the first included)."""

    max_attempts: int = 3

    def after_failure(self, label: str, attempt: int, reason: str, error: BaseException | None = None) -> None:
        """A task failed on its `attempt`-th run: raise WindowFailed when that was its last, else log the
        retry (the caller queues it again)."""
        if attempt >= self.max_attempts:
            raise WindowFailed(f"{label} failed {attempt} times; last error: {reason}") from error
        logger.warning("retrying %s (attempt %d of %d) after: %s", label, attempt + 1, self.max_attempts, reason)


@dataclass
class Task:
    """One task of a pool: the worker method, its arguments, a label for errors and logs, and how many times
    it has started (its attempts)."""

    method: str
    args: tuple
    label: str
    attempts: int = 0
    key: tuple = ()


class Tickets:
    """The ticket book of a pool: tasks queued by key (the lowest runs first when workers are scarce), each
    until it finishes or is cancelled. Tickets are ints, unique in their book."""

    def __init__(self):
        self.tasks: dict[int, Task] = {}  # ticket -> task, until it finishes or is cancelled
        self._queue: list[tuple[tuple, int]] = []  # heap of (key, ticket): queued (cancelled ones are skipped)
        self._next = 0

    def __len__(self) -> int:
        """Tickets neither finished nor cancelled (queued or running)."""
        return len(self.tasks)

    def add(self, method: str, args: tuple, key: tuple = (), label: str | None = None) -> int:
        ticket, self._next = self._next, self._next + 1
        self.tasks[ticket] = Task(method, args, label or f"{method} task {ticket}", key=key)
        heapq.heappush(self._queue, (key, ticket))
        return ticket

    def _skip_cancelled(self) -> None:
        while self._queue and self._queue[0][1] not in self.tasks:
            heapq.heappop(self._queue)

    @property
    def queued(self) -> bool:
        self._skip_cancelled()
        return bool(self._queue)

    def peek(self) -> Task:
        """The task `pop` would start (the queue is not empty: see `queued`)."""
        self._skip_cancelled()
        return self.tasks[self._queue[0][1]]

    def pop(self) -> int | None:
        """The queued ticket with the lowest key, now started (its attempts counted), or None."""
        self._skip_cancelled()
        if not self._queue:
            return None
        _, ticket = heapq.heappop(self._queue)
        self.tasks[ticket].attempts += 1
        return ticket

    def requeue(self, ticket: int, attempt_used: bool = True) -> None:
        """Back in the queue, first in line (the empty key sorts before any other); `attempt_used=False`: it
        never ran (queued behind a worker that died), so that start does not count."""
        if not attempt_used:
            self.tasks[ticket].attempts -= 1
        heapq.heappush(self._queue, ((), ticket))

    def finish(self, ticket: int) -> Task | None:
        return self.tasks.pop(ticket, None)

    def cancel(self, tickets: Iterable[int] | None = None) -> set[int]:
        """Drop these tickets (all when None), queued or running: the ones dropped."""
        dropped = set(self.tasks) if tickets is None else {t for t in tickets if t in self.tasks}
        for ticket in dropped:
            del self.tasks[ticket]
        return dropped


def _arrays(obj) -> Iterator[Any]:
    """The tensors and arrays in an object (nested tuples, lists, dicts, dataclasses, plain objects; a
    `Held` as its size only), and its other leaves (as their repr)."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _arrays(item)
    elif isinstance(obj, dict):
        for name in sorted(obj, key=str):
            yield repr(name)
            yield from _arrays(obj[name])
    elif hasattr(obj, "array") and isinstance(obj.array, np.ndarray):  # a tensor as the Ray pool sends it
        yield obj.array
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        yield type(obj).__name__
        yield from _arrays(vars(obj))
    else:
        yield repr(obj)


def nbytes(obj) -> int:
    """Bytes of the tensors and arrays an object carries (what sending it moves)."""
    if isinstance(obj, Held):
        return obj.nbytes
    return sum(a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()
               for a in _arrays(obj) if not isinstance(a, str))


def content_key(obj) -> str:
    """A hash of an object's content: its tensors' dtypes, shapes and bytes, and every other leaf."""
    digest = hashlib.sha256()
    for a in _arrays(obj):
        if isinstance(a, str):
            digest.update(a.encode())
        else:
            array = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def hold(obj, value=None) -> Held:
    """A job's conditioning as a pool's `put` returns it: by content hash, `value` where it is (the object
    itself by default)."""
    return Held(content_key(obj), nbytes(obj), obj if value is None else value)


@dataclass
class Traffic:
    """Bytes a pool's calls move between the driver and the workers, by kind (`longtake bench --simulate`):
    latents (a window's; a decode's apart), predictions, conditioning (the job's, counted once for each worker
    that fetches it: a worker keeps it by its hash), media (a window's own per-frame slices), frames
    (decoded), encoded (the encoder's result, once per job). `calls` counts calls by method; `window_media`
    the media of the last call of each window."""

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    window_media: dict = field(default_factory=dict)  # (start, end) -> bytes

    def sent(self, method: str, args: tuple, fetches: bool) -> int:
        """A call's arguments, as they leave for a worker (`fetches`: that worker does not hold the job's
        conditioning yet): the bytes counted."""
        self.calls[method] += 1
        total = 0
        for a in args:
            if isinstance(a, WindowConditioning):
                media = nbytes(a.frames)
                self.bytes["media"] += media
                self.bytes["conditioning"] += a.job.nbytes if fetches else 0
                self.window_media[tuple(args[3:5])] = media
                total += media + (a.job.nbytes if fetches else 0)
            else:  # a window's latents; a decode's (kept apart: not per window-step)
                n = nbytes(a)
                self.bytes["latents" if method == "predict" else f"{method} latents"] += n
                total += n
        return total

    def received(self, method: str, result) -> int:
        n = nbytes(result)
        self.bytes["predictions" if method == "predict" else "encoded" if method == "encode" else "frames"] += n
        return n

    def summary(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls)}


UTILISATION_S = 300.0  # a worker's utilisation is its busy share of the last this many seconds


@dataclass
class _Slot:
    """One worker slot's record (`WorkerBook`)."""

    node: str = ""
    state: str = "starting"  # starting, idle, busy, excluded
    running: dict = field(default_factory=dict)  # ticket -> (label, key, method), in the order sent
    busy_since: float | None = None  # when its current task started (its previous one ended)
    busy_s: float = 0.0
    window_steps: int = 0  # predictions returned
    tasks: int = 0  # tasks returned (predictions, decodes, encodes)
    bytes: int = 0  # to and from it
    failures: int = 0  # its tasks that failed (retried elsewhere or again)
    restarts: int = 0  # its worker replaced (died, hung, lost with its node)
    spans: deque = field(default_factory=deque)  # (start, end) of its busy time in the last UTILISATION_S


class WorkerBook:
    """What each worker of a pool does and has done, for the monitors and Prometheus (`workers()`): its
    node, its state, the window and step it computes now, its busy seconds and utilisation over the last
    UTILISATION_S, window-steps, bytes moved, failed tasks and restarts. The pools write it as tasks start
    and end; a task sent behind another on the same worker starts when that one ends."""

    def __init__(self, slots: int):
        self.slots = [_Slot() for _ in range(slots)]

    def started(self, slot: int, node: str) -> None:
        s = self.slots[slot]
        s.node, s.state = node or s.node, "idle" if not s.running else "busy"

    def sent(self, slot: int, ticket: int, task: Task, nbytes: int = 0, now: float | None = None) -> None:
        s = self.slots[slot]
        s.running[ticket] = (task.label, task.key, task.method)
        s.bytes += nbytes
        if s.busy_since is None:
            s.busy_since = time.monotonic() if now is None else now
        s.state = "busy"

    def ended(self, slot: int, ticket, nbytes: int = 0, ok: bool | None = True, now: float | None = None) -> None:
        """A task came back (ok), failed (False), or was abandoned (None: a cancelled job's)."""
        s = self.slots[slot]
        item = s.running.pop(ticket, None)
        if item is None:
            return
        now = time.monotonic() if now is None else now
        s.bytes += nbytes
        if ok:
            s.tasks += 1
            s.window_steps += item[2] == "predict"
        elif ok is False:
            s.failures += 1
        if s.busy_since is not None:
            s.busy_s += now - s.busy_since
            s.spans.append((s.busy_since, now))
        s.busy_since = now if s.running else None
        if s.state != "excluded":
            s.state = "busy" if s.running else "idle"

    def add(self, node: str = "") -> int:
        """A worker more (serve's replicas come and go): its slot."""
        self.slots.append(_Slot())
        if node:
            self.started(len(self.slots) - 1, node)
        return len(self.slots) - 1

    def moved(self, slot: int, nbytes: int) -> None:
        """Bytes to or from a worker in the middle of a task (a stream's items)."""
        self.slots[slot].bytes += nbytes

    def lost(self, slot: int, state: str) -> None:
        """Its worker is gone (replaced: "starting"; "excluded"; a replica "stopped" or "lost"): what it was
        running failed there."""
        for ticket in list(self.slots[slot].running):
            self.ended(slot, ticket, ok=False)
        self.slots[slot].state = state

    def replaced(self, slot: int) -> None:
        self.lost(slot, "starting")
        self.slots[slot].restarts += 1

    def excluded(self, slot: int) -> None:
        self.lost(slot, "excluded")

    def snapshot(self, now: float | None = None) -> list[dict]:
        """One dict per worker: id, node, state, now (the label of the task it computes), window and step
        (of a prediction), busy_s, utilisation (its busy share of the last UTILISATION_S, or of its life if
        shorter), window_steps, tasks, bytes, failures, restarts."""
        now = time.monotonic() if now is None else now
        start = now - UTILISATION_S
        out = []
        for i, s in enumerate(self.slots):
            while s.spans and s.spans[0][1] < start:
                s.spans.popleft()
            spans = list(s.spans) + ([(s.busy_since, now)] if s.busy_since is not None else [])
            busy = sum(max(0.0, end - max(begin, start)) for begin, end in spans)
            span = min(UTILISATION_S, max(1e-9, now - min((b for b, _ in spans), default=now)))
            label, key, method = next(iter(s.running.values()), (None, (), None))
            window_step = key if method == "predict" and len(key) == 2 else (None, None)
            out.append({"worker": i, "node": s.node, "state": s.state, "now": label,
                        "window": window_step[1], "step": window_step[0],
                        "busy_s": round(s.busy_s + (now - s.busy_since if s.busy_since is not None else 0.0), 3),
                        "utilisation": round(min(1.0, busy / span) if spans else 0.0, 3),
                        "window_steps": s.window_steps, "tasks": s.tasks, "bytes": s.bytes,
                        "failures": s.failures, "restarts": s.restarts})
        return out


class Pool(Protocol):
    num_workers: int

    def put(self, obj: Any) -> Any: ...
    def call(self, method: str, *args, tick=None) -> Any: ...
    outstanding: int  # tickets queued or running

    def submit(self, method: str, args: tuple, key: tuple = (), label: str | None = None) -> int: ...
    def poll(self, timeout: float | None = None) -> list[tuple[int, Any]]: ...
    def cancel(self, tickets: Iterable[int] | None = None) -> None: ...
    def imap(self, method: str, args_list: Iterable[tuple], tick=None) -> Iterator[Any]: ...
    def stream(self, method: str, args: tuple, tick=None) -> Iterator[Any]: ...
    def encode(self, *args, tick=None) -> Any: ...
    def release(self, held: Held) -> None: ...
    def shutdown(self) -> None: ...
    def workers(self) -> list[dict]: ...  # WorkerBook.snapshot


def ordered(pool, method: str, args_list: Iterable[tuple], in_flight: int, tick=None) -> Iterator[Any]:
    """`imap` on tickets: the results in list order, at most `in_flight` tasks submitted and not yet
    yielded (that bounds the results held here). Closing the iterator early cancels what is left. `tick()`
    is called at least every WAIT_S seconds while it waits (it raises to stop)."""
    args_iter = enumerate(args_list)
    waiting: deque[int] = deque()
    results: dict[int, Any] = {}
    more = True
    try:
        while True:
            while more and len(waiting) < max(1, in_flight):
                item = next(args_iter, None)
                if item is None:
                    more = False
                    break
                i, args = item
                waiting.append(pool.submit(method, args, key=(i,), label=f"{method} task {i}"))
            if not waiting:
                return
            while waiting[0] not in results:
                finished = pool.poll(WAIT_S)
                if not finished and not pool.outstanding:
                    raise RuntimeError(f"{method}: the pool has no task left but ticket {waiting[0]} is not done")
                if not finished and tick is not None:
                    tick()
                results.update(finished)
            yield results.pop(waiting.popleft())
    finally:
        if waiting:
            pool.cancel(list(waiting))


class InProcessPool:
    """One worker in this process; tasks run one after another, the lowest key first."""

    num_workers = 1

    def __init__(self, spec: WorkerSpec, retry: RetryPolicy = RetryPolicy()):
        self._threads = torch.get_num_threads()
        self.spec = spec
        self.retry = retry
        self.retries = 0
        self.worker = Worker(spec)
        self.tickets = Tickets()
        self.book = WorkerBook(1)
        self.book.started(0, "in-process")

    def workers(self) -> list[dict]:
        return self.book.snapshot()

    def put(self, obj: Any) -> Held:
        return hold(obj)

    def release(self, held: Held) -> None:
        self.worker.forget(held.key)

    def call(self, method: str, *args, tick=None) -> Any:
        return next(self.imap(method, [args], tick))

    def stats(self) -> list[dict]:
        """Per worker: seconds of each predict / decode call since the last call (then reset)."""
        return [self.worker.stats()]

    def submit(self, method: str, args: tuple, key: tuple = (), label: str | None = None) -> int:
        return self.tickets.add(method, args, key, label)

    @property
    def outstanding(self) -> int:
        return len(self.tickets)

    def poll(self, timeout: float | None = None) -> list[tuple[int, Any]]:
        """Run the queued task with the lowest key (retried by the policy): [(ticket, result)], or [] when
        nothing is queued. (It runs here, in the caller's thread: `timeout` does not apply.)"""
        ticket = self.tickets.pop()
        if ticket is None:
            return []
        task = self.tickets.finish(ticket)  # it runs now, to its end or its last attempt
        while True:
            self.book.sent(0, ticket, task)
            try:
                result = getattr(self.worker, task.method)(*task.args)
                self.book.ended(0, ticket)
                return [(ticket, result)]
            except Exception as e:
                self.book.ended(0, ticket, ok=False)
                self.retry.after_failure(task.label, task.attempts, f"{type(e).__name__}: {e}", e)
                self.retries += 1
                task.attempts += 1

    def cancel(self, tickets: Iterable[int] | None = None) -> None:
        self.tickets.cancel(tickets)

    def imap(self, method: str, args_list: Iterable[tuple], tick=None) -> Iterator[Any]:
        return ordered(self, method, args_list, 1, tick)

    def stream(self, method: str, args: tuple, tick=None) -> Iterator[Any]:
        try:
            yield from getattr(self.worker, method)(*args)
        except Exception as e:
            raise WindowFailed(f"{method} failed: {e}") from e

    def encode(self, *args, tick=None) -> Any:
        return self.worker.encode(*args)

    def shutdown(self) -> None:
        torch.set_num_threads(self._threads)
