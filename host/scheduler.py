"""Shared inference scheduler: one queue per loaded model, served by worker threads.

Model inference never runs on the asyncio event loop. Each loaded ASR model has
one :class:`InferenceQueue` with as many threads as the model can run at once;
every session of every engine using that model submits to it. Jobs are served
by priority (finals, then speculative finals, then partials), then in
submission order. A job whose ``stale()`` answers True when its turn comes is
skipped (its future is cancelled), so partials that nobody needs any more cost
nothing; under overload partials wait behind every final and so slow down first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

log = logging.getLogger(__name__)

FINAL = 0
SPECULATIVE = 1
PARTIAL = 2
KIND_NAMES = {FINAL: "final", SPECULATIVE: "speculative", PARTIAL: "partial"}


@dataclass
class JobUsage:
    """What one priority of one queue has cost so far (counters, for /metrics and the bench)."""

    seconds: float = 0.0
    completed: int = 0
    skipped: int = 0
    """Stale when their turn came (a partial of an utterance that has ended)."""
    withdrawn: int = 0
    """Cancelled by their session before a thread took them."""

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.completed += 1


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[[], Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    future: asyncio.Future = field(compare=False)
    submitted: float = field(compare=False, default=0.0)
    stale: Callable[[], bool] | None = field(compare=False, default=None)
    started: bool = field(compare=False, default=False)


class InferenceQueue:
    """A priority queue of blocking calls run by ``threads`` daemon threads."""

    def __init__(self, name: str, threads: int = 1):
        self.name = name
        self.threads = max(1, threads)
        self._queue: queue.PriorityQueue[_Job | tuple] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._workers: list[threading.Thread] = []
        self.busy = 0
        self._waiting = {p: 0 for p in KIND_NAMES}
        self._count_lock = threading.Lock()
        self.usage = {p: JobUsage() for p in KIND_NAMES}
        """Per priority: seconds the threads spent running its jobs; jobs run, skipped and withdrawn."""

    def start(self) -> None:
        for i in range(self.threads):
            t = threading.Thread(target=self._work, name=f"infer-{self.name}-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def stop(self) -> None:
        for _ in self._workers:
            self._queue.put((float("inf"), next(self._seq)))  # sentinel sorts last
        for t in self._workers:
            t.join(timeout=5)
        self._workers.clear()

    @property
    def completed(self) -> int:
        """Jobs run, of every priority."""
        with self._count_lock:
            return sum(u.completed for u in self.usage.values())

    @property
    def skipped(self) -> int:
        """Jobs skipped as stale, of every priority."""
        with self._count_lock:
            return sum(u.skipped for u in self.usage.values())

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return self._queue.qsize()

    def submit(self, fn: Callable[[], Any], priority: int = FINAL,
               stale: Callable[[], bool] | None = None) -> "Ticket":
        """Queue ``fn``; the ticket's future resolves with its result (call from the event loop)."""
        loop = asyncio.get_running_loop()
        job = _Job(priority, next(self._seq), fn, loop, loop.create_future(), time.monotonic(), stale)
        with self._count_lock:
            self._waiting[priority] += 1
        self._queue.put(job)
        return Ticket(job)

    def waiting(self, up_to_priority: int) -> int:
        """Jobs waiting whose priority is ``up_to_priority`` or more urgent."""
        with self._count_lock:
            return sum(n for p, n in self._waiting.items() if p <= up_to_priority)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if not isinstance(job, _Job):
                return
            with self._count_lock:
                self._waiting[job.priority] -= 1
            if job.future.cancelled():
                with self._count_lock:
                    self.usage[job.priority].withdrawn += 1
                continue
            if job.stale is not None and job.stale():
                job.loop.call_soon_threadsafe(job.future.cancel)
                with self._count_lock:
                    self.usage[job.priority].skipped += 1
                continue
            job.started = True
            with self._count_lock:
                self.busy += 1
            t0 = time.perf_counter()
            try:
                result, error = job.fn(), None
            except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting session
                result, error = None, exc
            finally:
                spent = time.perf_counter() - t0
                with self._count_lock:  # two threads may finish at once
                    self.busy -= 1
                    self.usage[job.priority].add(spent)
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more


class Ticket:
    """A queued job: its future, and whether a worker thread has picked it up."""

    def __init__(self, job: _Job):
        self._job = job
        self.future = job.future

    @property
    def started(self) -> bool:
        return self._job.started

    def cancel(self) -> bool:
        """Withdraw the job if no thread has started it; True if withdrawn."""
        if self._job.started:
            return False
        return self.future.cancel()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Scheduler:
    """All inference queues of a worker, keyed by model key."""

    def __init__(self):
        self.queues: dict[tuple, InferenceQueue] = {}

    def queue_for(self, key: tuple, threads: int) -> InferenceQueue:
        q = self.queues.get(key)
        if q is None:
            q = InferenceQueue("-".join(map(str, key))[-40:], threads)
            q.start()
            self.queues[key] = q
        return q

    def stop(self) -> None:
        for q in self.queues.values():
            q.stop()

    def depths(self) -> dict[tuple[str, str], int]:
        """Jobs waiting per (queue name, priority name), for metrics."""
        out = {}
        for q in self.queues.values():
            with q._count_lock:
                counts = dict(q._waiting)
            out.update({(q.name, KIND_NAMES[p]): n for p, n in counts.items()})
        return out

    def usage(self) -> dict[tuple[str, str], JobUsage]:
        """A copy of each queue's :class:`JobUsage` per (queue name, priority name), for metrics."""
        out = {}
        for q in self.queues.values():
            with q._count_lock:
                out.update({(q.name, KIND_NAMES[p]): replace(u) for p, u in q.usage.items()})
        return out

    def stats(self) -> dict[str, Any]:
        return {
            q.name: {"threads": q.threads, "waiting": q.depth, "running": q.busy, "completed": q.completed,
                     "skipped": q.skipped}
            for q in self.queues.values()
        }
