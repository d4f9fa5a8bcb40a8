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
5. Batches (contract v2). A thread that takes a :class:`host.asr.AsrCall` of a model
   with ``transcribe_many`` (:func:`host.asr.batch_size` above 1) takes with it further
   waiting AsrCalls of the same model object (``is``: variants sharing a key decode
   differently), up to ``batch_size`` in all, in the order above: by level (so a batch of
   finals may be filled with partials, and uploads' jobs come last), then the owner with
   the fewest jobs in the batch, then the least served, then age; only an owner's next
   job of a level may join. Rule 4 counts threads: an owner in a batch holds its thread
   once, and joins only if it is in the batch already, holds fewer than ``per_owner``
   threads, or no owner under its cap has a job waiting. A batch takes no more than its
   thread's share of the model's waiting jobs (split over it and the threads that hold
   none), so that a second thread does not idle while one decodes everything. Stale and
   withdrawn jobs are skipped as above, never reach the model, and are not replaced.
   Every job of the batch is marked started, then one ``transcribe_many`` runs (for a
   lone job of such a model too: an utterance decodes the same way however busy the queue
   is); each future gets its own result or its own ComponentFailure. The call's seconds
   are split evenly over its jobs, in ``usage`` and in each owner's served time. A batch
   occupies one thread (``busy``). Other jobs (plain callables) run one at a time.
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

from host import asr

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


class InferenceQueue:
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

    def _take_companion(self, model: Any, held: dict[Hashable, int]) -> _Job | None:
        """The next waiting AsrCall of ``model`` for the batch whose owners are ``held`` (caller holds
        the lock), or None.

        The queue's order, restricted to such jobs: by level, then by owner, then age. Only the
        next job of an owner at a level may join (an owner's jobs of one level keep their order).
        Owners with fewer jobs in this batch go first, then the least served: each job of the batch
        is charged a share of it, so this is least attained service within the batch too. The
        thread cap holds as for taking a thread: an owner joins if it is already in this batch, or
        holds fewer than ``per_owner`` threads, or when no owner under its cap has a job waiting.
        """
        def joins(owner: Hashable, capped: bool) -> bool:
            return not capped or owner in held or self._running.get(owner, 0) < self.per_owner

        uncapped = not any(o not in held and self._running.get(o, 0) < self.per_owner
                           for level in self._levels for o in level)
        for capped in (True, False) if uncapped else (True,):
            for level in self._levels:
                owners = [o for o in level if joins(o, capped) and _same_model(level[o][0], model)]
                if owners:
                    return self._pop(level, min(owners, key=lambda o: (held.get(o, 0), self._served[o],
                                                                       level[o][0].seq)))
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
            jobs = [job]
            size = _batch_size(job)  # outside the lock: it reads plugin attributes
            if size > 1 and isinstance(job.fn, asr.AsrCall):
                with self._cv:
                    limit = min(size, self._share(job.fn.model))
                    while len(jobs) < limit:
                        other = self._take_companion(job.fn.model, held)
                        if other is None:
                            break
                        self._hold(held, other)
                        if not self._withdrawn(held, other):
                            jobs.append(other)
                    if limit < size:
                        self._cv.notify()  # what this batch left is for a thread that holds nothing
                # Asked one by one outside the lock, as for a single job; a skipped one is not replaced.
                jobs = [job] + [j for j in jobs[1:] if not self._stale(held, j)]
            for j in jobs:
                j.started = True
            # A session may have withdrawn a job between its taking and now (Ticket.cancel saw it
            # not started): the model never sees it.
            with self._cv:
                jobs = [j for j in jobs if not self._withdrawn(held, j)]
                if jobs:
                    return jobs, held, size > 1
                self._engaged -= 1

    def _share(self, model: Any) -> int:
        """How many jobs a batch of ``model`` may take: the AsrCalls of it waiting (and the one taken),
        split evenly over this thread and the threads that hold no job (caller holds the lock).

        A thread that took every waiting job while another thread idles would halve throughput
        wherever the queue has two threads (on a CPU: measured in bench/batching.py)."""
        waiting = sum(_same_model(j, model) for level in self._levels for jobs in level.values() for j in jobs)
        free = max(0, self.threads - self._engaged)
        return -(-(1 + waiting) // (1 + free))

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
            outcomes = _run(jobs, batch)
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


def _run(jobs: list[_Job], batch: bool) -> list[tuple[Any, BaseException | None]]:
    """Run one job, or one ``transcribe_many`` for a batch (blocking): (result, error) per job."""
    if not batch:
        try:
            return [(jobs[0].fn(), None)]
        except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting session
            return [(None, exc)]
    calls = [job.fn for job in jobs if isinstance(job.fn, asr.AsrCall)]
    try:
        answers = asr.transcribe_many(calls)
        if len(answers) != len(jobs):
            raise RuntimeError(f"{len(answers)} answers for {len(jobs)} calls")
    except BaseException as exc:  # noqa: BLE001 - what asr.transcribe_many does not catch, to every session
        failure = asr.ComponentFailure(calls[0].component, f"transcribe_many raised {type(exc).__name__}: {exc}")
        failure.__cause__ = exc
        answers = [failure] * len(jobs)
    outcomes: list[tuple[Any, BaseException | None]] = []
    seen: set[int] = set()
    for answer in answers:
        if isinstance(answer, BaseException):
            # One failure object may answer the whole batch: each session gets its own.
            outcomes.append((None, answer if id(answer) not in seen else _copy_failure(answer)))
            seen.add(id(answer))
        else:
            outcomes.append((answer, None))
    return outcomes


def _same_model(job: _Job, model: Any) -> bool:
    """Whether ``job`` is an AsrCall of this very model object (variants sharing a key differ in settings)."""
    return isinstance(job.fn, asr.AsrCall) and job.fn.model is model


def _batch_size(job: _Job) -> int:
    """How many jobs one call may carry for ``job``: 1 unless it is an AsrCall of a batching model."""
    if not isinstance(job.fn, asr.AsrCall):
        return 1
    try:
        return asr.batch_size(job.fn.model)
    except Exception:  # a model whose attributes raise is served one call at a time
        log.exception("batch size of %s", job.fn.component)
        return 1


def _copy_failure(error: BaseException) -> BaseException:
    """A fresh exception like ``error``, so that no two sessions raise (and extend the traceback of) one object."""
    if not isinstance(error, asr.ComponentFailure):
        return error
    copy = asr.ComponentFailure(error.component, str(error).removeprefix(f"{error.component}: "))
    copy.__cause__ = error.__cause__
    return copy


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
