"""The worker-pool interface, and its in-process implementation (the reference result).

A pool runs a worker method over a list of argument tuples and yields the results in list order
(`imap`), whichever worker computed them; `stream` yields the items of one generator method run on one
worker (an ordered decode session); `encode` makes a job's conditioning once. The Ray pool
(`ray_pool.py`) has the same methods.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol

import torch

from longtake.actors.worker import Worker, WorkerSpec


class WindowFailed(RuntimeError):
    """A task failed on every attempt; the job cannot finish."""


class Pool(Protocol):
    num_workers: int

    def put(self, obj: Any) -> Any: ...
    def call(self, method: str, *args) -> Any: ...
    def imap(self, method: str, args_list: Iterable[tuple]) -> Iterator[Any]: ...
    def stream(self, method: str, args: tuple) -> Iterator[Any]: ...
    def encode(self, *args) -> Any: ...
    def shutdown(self) -> None: ...


class InProcessPool:
    """One worker in this process; tasks run one after another."""

    num_workers = 1

    def __init__(self, spec: WorkerSpec):
        self._threads = torch.get_num_threads()
        self.spec = spec
        self.worker = Worker(spec)

    def put(self, obj: Any) -> Any:
        return obj

    def call(self, method: str, *args) -> Any:
        return getattr(self.worker, method)(*args)

    def stats(self) -> list[dict]:
        """Per worker: seconds of each predict / decode call since the last call (then reset)."""
        return [self.worker.stats()]

    def imap(self, method: str, args_list: Iterable[tuple]) -> Iterator[Any]:
        fn = getattr(self.worker, method)
        for i, args in enumerate(args_list):
            try:
                yield fn(*args)
            except Exception as e:
                raise WindowFailed(f"task {i} ({method}) failed: {e}") from e

    def stream(self, method: str, args: tuple) -> Iterator[Any]:
        try:
            yield from getattr(self.worker, method)(*args)
        except Exception as e:
            raise WindowFailed(f"{method} failed: {e}") from e

    def encode(self, *args) -> Any:
        return self.worker.encode(*args)

    def shutdown(self) -> None:
        torch.set_num_threads(self._threads)
