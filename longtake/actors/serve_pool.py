"""The engine's pool over serve's Denoiser deployment: the executor `serve/`'s job manager renders on.

Its threads (one per running job) each see their own tickets; all jobs together keep up to 2 calls per
replica (max replicas) in flight, so Serve's queue (ongoing requests) is what its autoscaler scales on. Jobs
share that budget shortest first: the job with the fewest window predictions left takes all but one call per
other running job, and every running job keeps at least one call in flight (a short job submitted while a
long one renders is not queued behind it, and the long one never stops). Families with a large text encoder
(Wan's UMT5) encode here, in the manager, on a CPU worker kept here, under a lock of its own (the other jobs
keep stepping meanwhile); their denoisers never load it. A causal VAE's decode is one streamed call to one
replica.

Every call has a timeout (a replica that cannot be scheduled fails the job with a clear error, it never stays
`running`), and a failed call is retried (max attempts) on whichever replica Serve picks.

A handle cannot say which replica runs a call, so the replicas say it themselves: each reports its calls as
they start and end to the application's `ReplicaBoard` (one named actor, a pool.WorkerBook whose workers are
the replicas), which the pool reads for the job pages, serve's workers view and /metrics.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
import weakref
from concurrent import futures
from dataclasses import dataclass, field

import ray
from ray.serve.handle import DeploymentHandle

from longtake.actors.pool import (UTILISATION_S, WAIT_S, RetryPolicy, Task, Tickets, WindowFailed, WorkerBook,
                                  hold, nbytes, ordered)
from longtake.actors.worker import Held, WindowConditioning, Worker, WorkerSpec, encoder_spec

BOARD_NAMESPACE = "longtake"  # the replica boards' Ray namespace (one board per Serve application, by its name)
BOARD_READ_S = 1.0  # a pool reads its board at most this often (every job's progress report asks)
SILENT_S = 30.0  # a replica not heard from this long (its health checks report every 2 s) is taken as lost


def _one_line(error: Exception) -> str:
    """A denoiser call's error in one line: its class and the last line of its message (Serve wraps the
    replica's traceback around it)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else 'failed'}"


@dataclass(eq=False)
class _Job:
    """One engine thread's (one job's) tasks in a ServePool: its ticket book, the calls running (a future
    each, in the pool's threads) and their Serve responses (what a cancel cancels)."""

    tickets: Tickets = field(default_factory=Tickets)
    running: dict = field(default_factory=dict)  # future -> ticket
    responses: dict = field(default_factory=dict)  # ticket -> its call's Serve response, while it runs
    total: int | None = None  # the job's window predictions, when told (`begin_job`): unknown sorts last
    done: int = 0  # calls finished
    started: float = field(default_factory=time.monotonic)

    @property
    def remaining(self) -> float:
        return math.inf if self.total is None else self.total - self.done


class ServePool:
    """The engine's pool interface over the Denoiser deployment (used from the manager's threads).

    Families whose text encoder the denoisers do not hold (Wan's UMT5) encode here, in the manager, on
    a CPU worker built on first use and kept."""

    def __init__(self, handle: DeploymentHandle, num_workers: int, model_path: str, device: str = "cpu",
                 decode_in_flight: int = 4, timeout_s: float = 600.0, max_attempts: int = 3,
                 per_job: int | None = None, board=None):
        self.handle, self.num_workers, self.decode_in_flight = handle, num_workers, decode_in_flight
        self.board, self._rows, self._read_at = board, [], -math.inf  # the replicas' board (`workers`)
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.retry = RetryPolicy(max_attempts)
        self.retries = 0
        self.per_job = per_job or 2 * num_workers  # calls in flight at once, all jobs together
        self._local = threading.local()
        self._jobs: weakref.WeakSet = weakref.WeakSet()  # every engine thread's tickets (gone with the thread)
        self._executor = futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="serve-call")
        self.spec = denoiser_spec(model_path, device)
        self._encoder = None
        self._lock = threading.Lock()  # the jobs' ticket states (`_jobs`): held for microseconds
        self._encode_lock = threading.Lock()  # the encoder: one job encodes at a time, the others keep stepping

    def encode(self, *args, tick=None):
        if "encode" in self.spec.roles:
            return self.call("encode", *args, tick=tick)
        with self._encode_lock:
            if self._encoder is None:
                self._encoder = Worker(encoder_spec(self.spec))
            return self._encoder.encode(*args)

    @property
    def outstanding(self) -> int:
        return len(self._state().tickets)

    def stream(self, method: str, args: tuple, tick=None):
        """Items of one streamed call, in order, each within the timeout. A failed stream restarts (max
        attempts) and skips the items already delivered (the method takes `skip` after `args`). `tick()`
        runs at least every WAIT_S seconds while it waits."""
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
                    since = time.monotonic()
                    while True:
                        try:
                            kind, value = items.get(timeout=WAIT_S)
                            break
                        except queue.Empty:
                            if time.monotonic() - since > self.timeout_s:
                                raise WindowFailed(f"{method}: no denoiser answered in {self.timeout_s:g} s (can a "
                                                   "replica be scheduled? see `ray status`)") from None
                            if tick is not None:
                                tick()
                    if kind == "end":
                        return
                    if kind == "error":
                        break
                    delivered += 1
                    yield value
            finally:
                stop.set()
                response.cancel()
            self.retry.after_failure(f"{method} (after {delivered} items)", attempt, _one_line(value), value)
            self.retries += 1

    def put(self, obj) -> Held:
        """A job's conditioning into the object store, once: a replica fetches it on its first window of the
        job and keeps it by its hash (the HELD newest; the store drops it with the job's last reference)."""
        return hold(obj, [ray.put(obj)])

    def release(self, held: Held) -> None:
        """Nothing to tell: a handle cannot reach every replica; each keeps the HELD newest conditionings."""

    def call(self, method: str, *args, tick=None):
        return next(self.imap(method, [args], tick))

    def _call(self, job: _Job, ticket: int, task: Task):
        """One task in one of the pool's threads: the call's result within the timeout; a failure is retried
        (a new call: Serve may pick another replica) by the policy; then, or on a timeout, WindowFailed.
        None once the ticket is cancelled."""
        while True:
            if ticket not in job.tickets.tasks:
                return None
            response = job.responses[ticket] = getattr(self.handle, task.method).remote(
                *task.args, task=(task.label, task.key))
            try:
                return response.result(timeout_s=self.timeout_s)
            except TimeoutError:
                response.cancel()
                raise WindowFailed(f"{task.label}: no denoiser answered in {self.timeout_s:g} s (can a replica "
                                   "be scheduled? see `ray status`)") from None
            except Exception as e:  # the replica's own error, a replica that died, or our own cancel
                if ticket not in job.tickets.tasks:
                    return None
                self.retry.after_failure(task.label, task.attempts, _one_line(e), e)
                self.retries += 1
                task.attempts += 1

    def _state(self) -> _Job:
        """The calling thread's tickets: each engine thread (one job) sees only its own."""
        state = getattr(self._local, "state", None)
        if state is None:
            state = self.begin_job(None)
        return state

    def begin_job(self, total: int | None) -> _Job:
        """The calling thread starts a job of `total` window predictions (its share depends on what is left)."""
        state = self._local.state = _Job(total=total)
        with self._lock:
            self._jobs.add(state)
        return state

    def _share(self, state: _Job) -> int:
        """Calls this job may have in flight now: all of them when it runs alone; else the job with the
        fewest window predictions left takes all but one per other running job, and the others one each."""
        with self._lock:
            active = [s for s in self._jobs if len(s.tickets)]  # with tasks queued or running
        if len(active) <= 1:
            return self.per_job
        first = min(active, key=lambda s: (s.remaining, s.started))
        return max(1, self.per_job - (len(active) - 1)) if first is state else 1

    def submit(self, method: str, args: tuple, key: tuple = (), label: str | None = None) -> int:
        """Queue a task of this thread's job; `poll` sends it (lowest keys first) within the job's share."""
        return self._state().tickets.add(method, args, key, label)

    def poll(self, timeout: float | None = None):
        """Send queued calls (up to the job's share), wait for one to finish: [(ticket, result)], or [] when
        nothing is running or none finished within `timeout` seconds."""
        state = self._state()
        share = self._share(state) if state.tickets.queued else 0
        while len(state.running) < share and (ticket := state.tickets.pop()) is not None:
            state.running[self._executor.submit(self._call, state, ticket, state.tickets.tasks[ticket])] = ticket
        if not state.running:
            return []
        done, _ = futures.wait(list(state.running), timeout=timeout, return_when=futures.FIRST_COMPLETED)
        finished = []
        for future in done:
            ticket = state.running.pop(future)
            state.done += 1
            state.responses.pop(ticket, None)
            error = future.exception()
            if error is not None:
                self.cancel()
                raise error
            if state.tickets.finish(ticket) is not None:  # (None: cancelled meanwhile)
                finished.append((ticket, future.result()))
        return finished

    def cancel(self, tickets=None) -> None:
        state = self._state()
        dropped = state.tickets.cancel(tickets)
        for ticket in dropped:
            response = state.responses.pop(ticket, None)
            if response is not None:
                response.cancel()
        state.running = {f: t for f, t in state.running.items() if t not in dropped}

    def imap(self, method: str, args_list, tick=None):
        # decoded frames are big: only a few decode chunks are in flight
        return ordered(self, method, args_list, self.decode_in_flight if method == "decode" else self.per_job, tick)

    def workers(self) -> list[dict]:
        """The replicas, as their board last said (read at most every BOARD_READ_S): WorkerBook.snapshot's
        rows with each replica's id. [] without a board, or while it cannot be read."""
        if self.board is None:
            return []
        with self._lock:
            if time.monotonic() - self._read_at < BOARD_READ_S:
                return self._rows
            self._read_at = time.monotonic()
        try:
            rows = ray.get(self.board.snapshot.remote(), timeout=2)
        except Exception:  # the board restarting with the manager: the last rows
            return self._rows
        self._rows = rows
        return rows

    def shutdown(self) -> None:
        pass


class ReplicaBoard:
    """What each denoiser replica does and has done: a pool.WorkerBook whose slots are the replicas, by id, in
    the order they were first heard from. Replicas report (`Reporter`, fire and forget) each call as it starts
    and ends, and their health checks (every 2 s) as a heartbeat; a replica Serve stops says so and is dropped
    after UTILISATION_S; one not heard from in SILENT_S is lost (what it ran failed there)."""

    def __init__(self):
        self.book, self.ids, self.heard = WorkerBook(0), {}, {}

    def _slot(self, replica: str, node: str) -> int:
        slot = self.ids.get(replica)
        if slot is None:
            slot = self.ids[replica] = self.book.add(node)
        self.heard[replica] = time.monotonic()
        return slot

    def alive(self, replica: str, node: str) -> None:
        slot = self._slot(replica, node)
        if self.book.slots[slot].state in ("starting", "lost"):
            self.book.started(slot, node)

    def sent(self, replica: str, node: str, call: int, method: str, label: str, key: tuple, nbytes: int) -> None:
        self.book.sent(self._slot(replica, node), call, Task(method, (), label, key=tuple(key)), nbytes)

    def ended(self, replica: str, node: str, call: int, nbytes: int, ok: bool | None) -> None:
        self.book.ended(self._slot(replica, node), call, nbytes, ok)

    def stopped(self, replica: str, node: str) -> None:
        self.book.lost(self._slot(replica, node), "stopped")

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        for replica, slot in list(self.ids.items()):
            state, silent = self.book.slots[slot].state, now - self.heard[replica]
            if silent > SILENT_S and state not in ("stopped", "lost"):
                self.book.lost(slot, "lost")
            elif state in ("stopped", "lost") and silent > UTILISATION_S:
                del self.ids[replica], self.heard[replica]  # its row goes (its slot stays, unlisted)
        listed = {slot: replica for replica, slot in self.ids.items()}
        return [{**row, "replica": listed[row["worker"]]} for row in self.book.snapshot(now)
                if row["worker"] in listed]


def start_board(app: str):
    """The board of Serve application `app` (a named actor, owned by the caller: the manager's replica)."""
    return ray.remote(num_cpus=0)(ReplicaBoard).options(
        name=f"replicas-{app}", namespace=BOARD_NAMESPACE, get_if_exists=True).remote()


class Reporter:
    """A replica's side of its application's board: each call as it starts and ends, and a heartbeat, sent
    without waiting. Nothing is sent (and no call waits) while the board cannot be found."""

    def __init__(self, app: str, replica: str, node: str):
        self.name, self.me, self._board = f"replicas-{app}", (replica, node), None
        self._calls = itertools.count(1)  # (a replica runs several calls at once, on Serve's threads)
        self._look_after = 0.0  # when to look the board up again (not on every call while there is none)

    def _send(self, method: str, *args) -> None:
        try:
            if self._board is None:
                if time.monotonic() < self._look_after:
                    return
                self._look_after = time.monotonic() + BOARD_READ_S
                self._board = ray.get_actor(self.name, namespace=BOARD_NAMESPACE)
            getattr(self._board, method).remote(*self.me, *args)
        except Exception:  # no board (yet, or it restarts with the manager): look again after BOARD_READ_S
            self._board = None

    def alive(self) -> None:
        """A heartbeat (serve's health check, every 2 s); the board is looked up again (a manager that
        restarted has a new one: calls to the old one's handle would be lost without an error)."""
        self._board, self._look_after = None, 0.0
        self._send("alive")

    def stopped(self) -> None:
        self._send("stopped")

    def call(self, method: str, args: tuple, task: tuple | None, run):
        """run() as the call `method(*args)` of the pool's task (label, key), reported to the board."""
        call = self._sent(method, args, task)
        try:
            result = run()
        except BaseException:
            self._send("ended", call, 0, False)
            raise
        self._send("ended", call, nbytes(result), True)
        return result

    def stream(self, method: str, args: tuple, items):
        """The items of a streamed call, reported as one call (its items' bytes together; closed early by the
        pool: abandoned, not failed)."""
        call, received, ok = self._sent(method, args, None), 0, None
        try:
            for item in items:
                received += nbytes(item)
                yield item
            ok = True
        except GeneratorExit:
            raise
        except BaseException:
            ok = False
            raise
        finally:
            self._send("ended", call, received, ok)

    def _sent(self, method: str, args: tuple, task: tuple | None) -> int:
        call, (label, key) = next(self._calls), task or (method, ())
        # the bytes of its arguments as Traffic counts them (a job's conditioning, fetched once, apart)
        sent = sum(nbytes(a.frames) if isinstance(a, WindowConditioning) else nbytes(a) for a in args)
        self._send("sent", call, method, label, tuple(key), sent)
        return call


def denoiser_spec(model_path: str, device: str, cp: int = 1) -> WorkerSpec:
    """A denoiser replica's worker: the family's dtype on GPUs, and no text encoder when it is large; with
    cp > 1, the leader of a group of cp (the way it attends: the model's, `auto`)."""
    from longtake.pipelines import ROLES, inspect_model
    from longtake.pipelines.parallel import server_mode

    info = inspect_model(model_path)
    roles = ("predict", "decode") if info.separate_encoder else ROLES
    return WorkerSpec(model_path, device, info.cuda_dtype if device == "cuda" else "float32", roles=roles, cp=cp,
                      cp_mode=server_mode(info, cp))
