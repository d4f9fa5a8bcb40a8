"""Batched recognition in the inference queues (contract v2 ``transcribe_many``).

A thread that takes a :class:`host.asr.AsrCall` of a model with ``transcribe_many``
(:func:`host.asr.batch_size` above 1) takes with it further waiting AsrCalls of the same model
object (``is``: variants sharing a key decode differently), up to ``batch_size`` in all, in the
queue's order: by level (so a batch of finals may be filled with partials, and uploads' jobs come
last), then the owner with the fewest jobs in the batch, then the least served, then age; only an
owner's next job of a level may join. The per-owner cap counts threads: an owner in a batch holds
its thread once, and joins only if it is in the batch already, holds fewer than ``per_owner``
threads, or no owner under its cap has a job waiting. A batch takes no more than its thread's share
of the model's waiting jobs (split over it and the threads that hold none), so that a second thread
does not idle while one decodes everything. Stale and withdrawn jobs are skipped as usual, never
reach the model, and are not replaced. Every job of the batch is marked started, then one
``transcribe_many`` runs (for a lone job of such a model too: an utterance decodes the same way
however busy the queue is); each future gets its own result or its own ComponentFailure. The
call's seconds are split evenly over its jobs, in ``usage`` and in each owner's served time. A
batch occupies one thread (``busy``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Hashable
from typing import Any

from host import asr

log = logging.getLogger(__name__)


class BatchingQueue:
    """The batch-forming part of :class:`host.scheduler.InferenceQueue` (a mixin: it acts on its state)."""

    _cv: threading.Condition
    _levels: list[dict[Hashable, deque[Any]]]
    _running: dict[Hashable, int]
    _served: dict[Hashable, float]
    _engaged: int
    per_owner: int
    threads: int

    def _pop(self, level: dict[Hashable, deque[Any]], owner: Hashable) -> Any:
        raise NotImplementedError

    def _hold(self, held: dict[Hashable, int], job: Any) -> None:
        raise NotImplementedError

    def _withdrawn(self, held: dict[Hashable, int], job: Any) -> bool:
        raise NotImplementedError

    def _stale(self, held: dict[Hashable, int], job: Any) -> bool:
        raise NotImplementedError

    def _fill_batch(self, job: Any, held: dict[Hashable, int], size: int) -> list[Any]:
        """``job`` and the companions that join it, up to ``size``, withdrawn and stale ones left out."""
        jobs = [job]
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
        return [job] + [j for j in jobs[1:] if not self._stale(held, j)]

    def _take_companion(self, model: Any, held: dict[Hashable, int]) -> Any:
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
                owners = [o for o in level if joins(o, capped) and same_model(level[o][0], model)]
                if owners:
                    return self._pop(level, min(owners, key=lambda o: (held.get(o, 0), self._served[o],
                                                                       level[o][0].seq)))
        return None

    def _share(self, model: Any) -> int:
        """How many jobs a batch of ``model`` may take: the AsrCalls of it waiting (and the one taken),
        split evenly over this thread and the threads that hold no job (caller holds the lock).

        A thread that took every waiting job while another thread idles would halve throughput
        wherever the queue has two threads (on a CPU: measured in bench/batching.py)."""
        waiting = sum(same_model(j, model) for level in self._levels for jobs in level.values() for j in jobs)
        free = max(0, self.threads - self._engaged)
        return -(-(1 + waiting) // (1 + free))


def run_jobs(jobs: list[Any], batch: bool) -> list[tuple[Any, BaseException | None]]:
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
        answers = [asr.ComponentFailure(calls[0].component, f"transcribe_many raised {type(exc).__name__}: {exc}")
                   for _ in jobs]  # one exception object per session: none extends another's traceback
    return [(None, a) if isinstance(a, BaseException) else (a, None) for a in answers]


def same_model(job: Any, model: Any) -> bool:
    """Whether ``job`` is an AsrCall of this very model object (variants sharing a key differ in settings)."""
    return isinstance(job.fn, asr.AsrCall) and job.fn.model is model


def batch_size_of(job: Any) -> int:
    """How many jobs one call may carry for ``job``: 1 unless it is an AsrCall of a batching model."""
    if not isinstance(job.fn, asr.AsrCall):
        return 1
    try:
        return asr.batch_size(job.fn.model)
    except Exception:  # a model whose attributes raise is served one call at a time
        log.exception("batch size of %s", job.fn.component)
        return 1
