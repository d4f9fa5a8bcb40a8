"""Shared inference scheduler: one queue per loaded model, served by worker threads.

Model inference never runs on the asyncio event loop. Each loaded ASR model has
one :class:`InferenceQueue` with as many threads as the model can run at once;
every session of every engine using that model submits to it.

Order of service:

1. By priority: finals, then speculative finals, then partials. A job whose
   ``stale()`` answers True when its turn comes is skipped (its future is
   cancelled), so partials that nobody needs any more cost nothing; under
   overload partials wait behind every final and so slow down first.
2. Jobs marked ``bulk`` (a session sending audio faster than real time: an upload)
   come after every job of every real-time session, finals of uploads included:
   uploads get the capacity real-time sessions leave free.
3. Within one priority, fairly between sessions: the session (``owner``) that has
   used the least decoder time so far goes first ("least attained service"); a
   session that was idle rejoins at the lowest usage of those waiting, so idling
   banks no credit. Then in submission order. Before this, one session's flush
   storm (645 queued decodes) made an ordinary session's finals 16-31 s late.
4. One session runs on at most half the threads (at least one) while another
   session's job waits, of whatever priority: otherwise a storm of finals keeps
   every thread and another session's partials never run. With nobody else
   waiting, it may use them all.
5. Batches (contract v2): a thread that takes a job for a model with ``transcribe_many``
   fills one call with further jobs for the same model, in the order above; see
   :mod:`host.batches`. Other jobs run one at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

from host.batches import BatchingQueue, batch_size_of, run_jobs

log = logging.getLogger(__name__)

FINAL = 0
SPECULATIVE = 1
PARTIAL = 2
KIND_NAMES = {FINAL: "final", SPECULATIVE: "speculative", PARTIAL: "partial"}
_LEVELS = 2 * len(KIND_NAMES)  # each kind for real-time sessions, then each kind for bulk ones


@dataclass
class JobUsage:
    """What one priority of one queue has cost so far (counters, for /metrics and the bench)."""

    seconds: float = 0.0
    completed: int = 0
    skipped: int = 0
    """Stale when their turn came (a partial of an utterance that has ended)."""
    withdrawn: int = 0
    """Cancelled by their session before a thread took them."""
    batched: int = 0
    """Of the completed, those run in one ``transcribe_many`` call with other jobs."""

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.completed += 1


@dataclass(eq=False)
class _Job:
    priority: int
    seq: int
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    submitted: float = 0.0
    stale: Callable[[], bool] | None = None
    started: bool = False
    owner: Hashable = None
    bulk: bool = False

    @property
    def level(self) -> int:
        return self.priority + (len(KIND_NAMES) if self.bulk else 0)


class InferenceQueue(BatchingQueue):
    """Prioritized, per-session fair queue of blocking calls run by ``threads`` daemon threads."""

    def __init__(self, name: str, threads: int = 1):
        self.name = name
        self.threads = max(1, threads)
        self._cv = threading.Condition()
        self._levels: list[dict[Hashable, deque[_Job]]] = [{} for _ in range(_LEVELS)]
        self._served: dict[Hashable, float] = {}  # decoder seconds of owners with jobs waiting or running
        self._holding: dict[Hashable, int] = {}  # owner -> jobs waiting or running
        self._running: dict[Hashable, int] = {}  # owner -> jobs taken by a thread and not yet done
        self.per_owner = max(1, self.threads // 2)
        """Threads one owner may hold while another owner's job waits."""
        self._seq = itertools.count()
        self._workers: list[threading.Thread] = []
        self._stopping = False
        self.busy = 0
        """Threads running a job or a batch."""
        self.batches = 0
        """``transcribe_many`` calls made (batches, of one job or more)."""
        self._engaged = 0  # threads from taking a job until it is done (skipped, withdrawn or run)
        self.usage = {p: JobUsage() for p in KIND_NAMES}
        """Per priority: seconds the threads spent running its jobs; jobs run, skipped and withdrawn."""

    def start(self) -> None:
        self._stopping = False
        for i in range(self.threads):
            t = threading.Thread(target=self._work, name=f"infer-{self.name}-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._workers:
            t.join(timeout=5)
        self._workers.clear()

    @property
    def completed(self) -> int:
        """Jobs run, of every priority."""
        with self._cv:
            return sum(u.completed for u in self.usage.values())

    @property
    def skipped(self) -> int:
        """Jobs skipped as stale, of every priority."""
        with self._cv:
            return sum(u.skipped for u in self.usage.values())

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running), bulk ones included."""
        with self._cv:
            return sum(self._queued(level) for level in range(_LEVELS))

    def submit(self, fn: Callable[[], Any], priority: int = FINAL, stale: Callable[[], bool] | None = None,
               owner: Hashable = None, bulk: bool = False) -> Ticket:
        """Queue ``fn``; the ticket's future resolves with its result (call from the event loop).

        Args:
            priority: ``FINAL``, ``SPECULATIVE`` or ``PARTIAL``.
            stale: asked when the job's turn comes; True skips it.
            owner: the session the job is for; sessions share the queue fairly.
            bulk: the session sends faster than real time; served after real-time sessions.
        """
        loop = asyncio.get_running_loop()
        job = _Job(priority, next(self._seq), fn, loop, loop.create_future(), time.monotonic(), stale,
                   owner=owner, bulk=bulk)
        with self._cv:
            if owner not in self._served:
                self._served[owner] = min(self._served.values(), default=0.0)
            self._holding[owner] = self._holding.get(owner, 0) + 1
            self._levels[job.level].setdefault(owner, deque()).append(job)
            self._cv.notify()
        return Ticket(job)

    def waiting(self, up_to_priority: int) -> int:
        """Real-time sessions' jobs waiting whose priority is ``up_to_priority`` or more urgent."""
        with self._cv:
            return sum(self._queued(p) for p in KIND_NAMES if p <= up_to_priority)

    def waiting_by_kind(self) -> dict[str, int]:
        """Jobs waiting per kind name, real-time sessions' ones; uploads' jobs together as ``bulk``."""
        with self._cv:
            counts = {name: self._queued(p) for p, name in KIND_NAMES.items()}
            counts["bulk"] = sum(self._queued(p + len(KIND_NAMES)) for p in KIND_NAMES)
            return counts

    def _queued(self, level: int) -> int:
        """Jobs waiting at one level (caller holds the lock)."""
        return sum(len(jobs) for jobs in self._levels[level].values())

    def _take(self) -> _Job | None:
        """The next job by priority, then least-served owner, then age, skipping owners that hold
        their share of the threads while anyone else has a job (caller holds the lock)."""
        for capped in (True, False):
            for level in self._levels:
                owners = [o for o in level if not capped or self._running.get(o, 0) < self.per_owner]
                if owners:
                    return self._pop(level, min(owners, key=lambda o: (self._served[o], level[o][0].seq)))
        return None

    @staticmethod
    def _pop(level: dict[Hashable, deque[_Job]], owner: Hashable) -> _Job:
        jobs = level[owner]
        job = jobs.popleft()
        if not jobs:
            del level[owner]
        return job

    def _hold(self, held: dict[Hashable, int], job: _Job) -> None:
        """``job`` is on this thread; its owner holds the thread (caller holds the lock)."""
        if job.owner not in held:
            self._running[job.owner] = self._running.get(job.owner, 0) + 1
        held[job.owner] = held.get(job.owner, 0) + 1

    def _release(self, held: dict[Hashable, int], job: _Job, spent: float) -> None:
        """A job is done (run, skipped or withdrawn): charge its owner, who lets go of the thread
        with its last job on it (caller holds the lock)."""
        mine = held.pop(job.owner) - 1
        if mine:
            held[job.owner] = mine
        else:
            running = self._running[job.owner] - 1
            if running:
                self._running[job.owner] = running
            else:
                del self._running[job.owner]
        left = self._holding[job.owner] - 1
        if left:
            self._holding[job.owner] = left
            self._served[job.owner] += spent
        else:  # nothing waiting or running: the owner rejoins at the current lowest usage
            del self._holding[job.owner]
            del self._served[job.owner]

    def _next(self) -> tuple[list[_Job], dict[Hashable, int], bool] | None:
        """Wait for the jobs this thread runs next, started: one job, or AsrCalls of one batching
        model (one or more: all of a batching model's decodes go through ``transcribe_many``); with
        their owners and whether they are such a batch. None when the queue stops."""
        while True:
            held: dict[Hashable, int] = {}
            with self._cv:
                job = self._take()
                while job is None:
                    if self._stopping:
                        return None
                    self._cv.wait()
                    job = self._take()
                self._hold(held, job)
                self._engaged += 1
                if self._withdrawn(held, job):
                    self._engaged -= 1
                    continue
            if self._stale(held, job):
                with self._cv:
                    self._engaged -= 1
                continue
            size = batch_size_of(job)  # outside the lock: it reads plugin attributes
            jobs = self._fill_batch(job, held, size) if size > 1 else [job]
            for j in jobs:
                j.started = True
            # A session may have withdrawn a job between its taking and now (Ticket.cancel saw it
            # not started): the model never sees it.
            with self._cv:
                jobs = [j for j in jobs if not self._withdrawn(held, j)]
                if jobs:
                    return jobs, held, size > 1
                self._engaged -= 1

    def _withdrawn(self, held: dict[Hashable, int], job: _Job) -> bool:
        """True (and the job is let go) if its session cancelled it (caller holds the lock)."""
        if not job.future.cancelled():
            return False
        self.usage[job.priority].withdrawn += 1
        self._release(held, job, 0.0)
        return True

    def _stale(self, held: dict[Hashable, int], job: _Job) -> bool:
        """True (and the job is skipped, its future cancelled) if nobody needs it any more."""
        if job.stale is None or not job.stale():
            return False
        _deliver(job, _cancel, None)
        with self._cv:
            self.usage[job.priority].skipped += 1
            self._release(held, job, 0.0)
        return True

    def _work(self) -> None:
        while True:
            taken = self._next()
            if taken is None:
                return
            jobs, held, batch = taken
            with self._cv:
                self.busy += 1  # a batch occupies one thread
            t0 = time.perf_counter()
            outcomes = run_jobs(jobs, batch)
            share = (time.perf_counter() - t0) / len(jobs)  # a batch's seconds, split evenly
            with self._cv:  # two threads may finish at once
                self.busy -= 1
                self._engaged -= 1
                self.batches += batch
                for job in jobs:
                    self.usage[job.priority].add(share)
                    if len(jobs) > 1:
                        self.usage[job.priority].batched += 1
                    self._release(held, job, share)
            for job, (result, error) in zip(jobs, outcomes):
                _deliver(job, result, error)


_cancel = object()
"""Passed as a result to :func:`_deliver`: cancel the future (a skipped job)."""


def _deliver(job: _Job, result: Any, error: BaseException | None) -> None:
    """Settle the job's future from a worker thread."""
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
    if result is _cancel:
        future.cancel()
    elif error is not None:
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
            out.update({(q.name, kind): n for kind, n in q.waiting_by_kind().items()})
        return out

    def usage(self) -> dict[tuple[str, str], JobUsage]:
        """A copy of each queue's :class:`JobUsage` per (queue name, priority name), for metrics."""
        out = {}
        for q in self.queues.values():
            with q._cv:
                out.update({(q.name, KIND_NAMES[p]): replace(u) for p, u in q.usage.items()})
        return out

    def stats(self) -> dict[str, Any]:
        return {
            q.name: {"threads": q.threads, "waiting": q.depth, "running": q.busy, "completed": q.completed,
                     "skipped": q.skipped, "batches": q.batches}
            for q in self.queues.values()
        }
