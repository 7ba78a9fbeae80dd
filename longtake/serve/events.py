"""Server-sent events of jobs (`GET /v1/videos/{id}/events`) in one ingress replica: one poll of the manager
per job, however many streams watch that job, fanned out to each of them; and a cap on the streams one
client has open at once (`max_event_streams`, 429 past it).

    stream ─┐
    stream ─┼─ watch of job J ── poll task: fetch(J) every POLL_S ── the manager
    stream ─┘
A stream is text in the SSE format: `progress` {id, status, progress, error} on every change, then `end`
{id, status} once the job has finished, or `deleted` {id} when it is gone; a comment line every
KEEPALIVE_S without a change, so that a closed connection is noticed (and its slot freed). A job's poll
task starts with its first stream and stops with its last, or when the job ends.

Plain asyncio: no Ray, no FastAPI (the ingress gives `fetch`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, Callable

logger = logging.getLogger(__name__)

POLL_S = 0.5  # between two reads of a watched job
KEEPALIVE_S = 15.0  # a comment line after this long without an event


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class TooManyStreams(Exception):
    """The client has max_event_streams streams open already (HTTP 429)."""


class _Slot:
    """One open stream of a client, counted in `counts` until released: at the end of its stream, or when
    the stream is dropped without ever being started (a client gone before the response began)."""

    def __init__(self, counts: dict, client: str):
        self.counts, self.client, self.held = counts, client, True
        counts[client] = counts.get(client, 0) + 1

    def release(self) -> None:
        if self.held:
            self.held = False
            left = self.counts.get(self.client, 1) - 1
            if left:
                self.counts[self.client] = left
            else:
                self.counts.pop(self.client, None)

    __del__ = release


class _Watch:
    """The latest state of one job, as its poll task last read it, and an event set at every change."""

    def __init__(self):
        self.job: dict | None | Exception = None  # a job, None (deleted), or the error that ended the poll
        self.version = 0  # changes published so far
        self.changed = asyncio.Event()
        self.streams = 0
        self.task: asyncio.Task | None = None

    def publish(self, job) -> None:
        self.job, self.version = job, self.version + 1
        self.changed.set()
        self.changed = asyncio.Event()


class JobEvents:
    """The event streams of one ingress replica. `fetch(job_id)` reads a job (a dict with status, progress
    and error; None once it is deleted); `is_final(status)` says whether a status is the last."""

    def __init__(self, fetch: Callable[[str], Awaitable[dict | None]], is_final: Callable[[str], bool],
                 max_streams: int, poll_s: float = POLL_S, keepalive_s: float = KEEPALIVE_S):
        self.fetch, self.is_final, self.max_streams = fetch, is_final, max_streams
        self.poll_s, self.keepalive_s = poll_s, keepalive_s
        self.open: dict[str, int] = {}  # client -> streams open
        self.watches: dict[str, _Watch] = {}  # job id -> its watch, while streams watch it
        self.polls = 0  # reads of jobs so far (one per watched job per POLL_S, whatever the streams)

    def stream(self, client: str, job_id: str) -> AsyncIterator[str]:
        """The events of `job_id` for `client` (who may see the job: the caller checked). TooManyStreams when
        the client has max_streams open."""
        if self.open.get(client, 0) >= self.max_streams:
            raise TooManyStreams(f"client {client} has {self.open[client]} event streams open, at most "
                                 f"{self.max_streams} (max_event_streams): close one first")
        return self._events(_Slot(self.open, client), job_id)

    async def _events(self, slot: _Slot, job_id: str) -> AsyncIterator[str]:
        watch = self.watches.get(job_id)
        if watch is None:
            watch = self.watches[job_id] = _Watch()
            watch.task = asyncio.get_running_loop().create_task(self._poll(job_id, watch))
        watch.streams += 1
        seen, last = 0, None
        try:
            while True:
                while watch.version == seen:
                    try:
                        await asyncio.wait_for(watch.changed.wait(), self.keepalive_s)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                seen, job = watch.version, watch.job
                if isinstance(job, Exception):
                    return  # the poll failed (logged there): the stream ends, the client may reconnect
                if job is None:
                    yield sse("deleted", {"id": job_id})
                    return
                state = {"status": job["status"], "progress": job["progress"], "error": job["error"]}
                if state != last:
                    yield sse("progress", {"id": job_id, **state})
                    last = state
                if self.is_final(job["status"]):
                    yield sse("end", {"id": job_id, "status": job["status"]})
                    return
        finally:
            watch.streams -= 1
            if not watch.streams and self.watches.get(job_id) is watch:
                del self.watches[job_id]
                watch.task.cancel()
            slot.release()

    async def _poll(self, job_id: str, watch: _Watch) -> None:
        """Read the job every poll_s; publish it when what a stream shows changes; stop once it is final."""
        shown = object()
        while True:
            try:
                job = await self.fetch(job_id)
            except Exception as e:  # the manager is gone or failing: every stream of the job ends
                logger.warning("events of job %s: %s", job_id, e)
                job = e
            self.polls += 1
            state = job if not isinstance(job, dict) else (job["status"], job["progress"], job["error"])
            if state != shown:
                watch.publish(job)
                shown = state
            if not isinstance(job, dict) or self.is_final(job["status"]):
                if self.watches.get(job_id) is watch:
                    del self.watches[job_id]  # a new stream starts a new poll
                return
            await asyncio.sleep(self.poll_s)
