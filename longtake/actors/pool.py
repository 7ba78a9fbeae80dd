"""The worker-pool interface, and its in-process implementation (the reference result).

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
job's conditioning once. The Ray pool (`ray_pool.py`) and the Serve pool (`serve/app.py`) have the same
methods.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol

import torch

from longtake.actors.worker import Worker, WorkerSpec

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
    def shutdown(self) -> None: ...


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
        self._queue: list[tuple[tuple, int]] = []  # heap of (key, ticket)
        self._tasks: dict[int, tuple[str, tuple, str]] = {}  # ticket -> (method, args, label)
        self._next = 0

    def put(self, obj: Any) -> Any:
        return obj

    def call(self, method: str, *args, tick=None) -> Any:
        return next(self.imap(method, [args], tick))

    def stats(self) -> list[dict]:
        """Per worker: seconds of each predict / decode call since the last call (then reset)."""
        return [self.worker.stats()]

    def submit(self, method: str, args: tuple, key: tuple = (), label: str | None = None) -> int:
        ticket, self._next = self._next, self._next + 1
        self._tasks[ticket] = (method, args, label or f"{method} task {ticket}")
        heapq.heappush(self._queue, (key, ticket))
        return ticket

    @property
    def outstanding(self) -> int:
        return len(self._tasks)

    def poll(self, timeout: float | None = None) -> list[tuple[int, Any]]:
        """Run the queued task with the lowest key (retried by the policy): [(ticket, result)], or [] when
        nothing is queued. (It runs here, in the caller's thread: `timeout` does not apply.)"""
        while self._queue:
            _, ticket = heapq.heappop(self._queue)
            if ticket not in self._tasks:
                continue  # cancelled
            method, args, label = self._tasks.pop(ticket)
            for attempt in range(1, self.retry.max_attempts + 1):
                try:
                    return [(ticket, getattr(self.worker, method)(*args))]
                except Exception as e:
                    self.retry.after_failure(label, attempt, f"{type(e).__name__}: {e}", e)
                    self.retries += 1
        return []

    def cancel(self, tickets: Iterable[int] | None = None) -> None:
        for ticket in list(self._tasks) if tickets is None else tickets:
            self._tasks.pop(ticket, None)

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
