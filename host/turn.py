"""Turn detection: asks an engine's turn detector (``pipeline.turn``) whether a paused speaker has
finished, batched across sessions and off the event loop.

The endpointer (:mod:`host.endpointing`) decides *when* to ask (a :class:`~host.endpointing.TurnCheck`
at each checkpoint of a pause) and what an answer does; :class:`TurnBatcher` gets the answers. While a
call runs, the checks of other sessions queue up and form the next call, so a lone session waits for
nobody and many share one model call (a detector with ``probabilities`` gets them all at once).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import Executor
from typing import Any

import numpy as np

from host.asr import ComponentFailure, brief
from host.contracts import SAMPLE_RATE, TurnDetector

log = logging.getLogger(__name__)

DEFAULT_MAX_AUDIO_S = 8.0
"""Audio of the open turn a detector hears when it does not say (``max_audio_s``): Smart Turn's window."""


def max_audio_samples(detector: TurnDetector) -> int:
    """How much of the open turn (samples, from its end) the detector is given."""
    return int(float(getattr(detector, "max_audio_s", DEFAULT_MAX_AUDIO_S)) * SAMPLE_RATE)


class TurnBatcher:
    """One detector's checks from every session, run together off the loop."""

    def __init__(self, detector: TurnDetector, executor: Executor, component: str, max_batch: int = 4,
                 max_waiting: int = 4):
        self.detector = detector
        self.executor = executor
        self.component = component
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        """Checks that may wait for the detector; more are shed (answered None at once). A session's
        windows wait for its check, and a CPU-bound model does not get faster in batches: a long
        queue would only stall every session (at 40 streams it did, into processing_lag)."""
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None
        self.checks = 0
        """Checks answered or failed."""
        self.shed = 0
        """Checks not asked: too many were waiting."""
        self.calls = 0
        """Calls into the detector (one per batch with ``probabilities``)."""
        self.cpu_seconds = 0.0
        """CPU time the detector spent (thread time of the calling threads)."""

    async def probability(self, audio: np.ndarray) -> float | None:
        """The detector's complete-probability for ``audio``, or None when the check is shed (too many
        wait); a detector that raises or answers something other than a number in [0, 1] fails as a
        :class:`ComponentFailure`."""
        if len(self._pending) >= self.max_waiting:
            self.shed += 1
            return None
        future = asyncio.get_running_loop().create_future()
        self._pending.append((audio, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())  # a reference: the loop keeps weak ones
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            try:
                results: list[Any] = await loop.run_in_executor(self.executor, self._run, [a for a, _ in batch])
            except Exception as exc:  # noqa: BLE001 - delivered to each waiting session
                results = [ComponentFailure(self.component, f"probability raised {brief(exc)}")] * len(batch)
            for (_, future), result in zip(batch, results):
                self.checks += 1
                if future.done():
                    continue
                if isinstance(result, ComponentFailure):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _run(self, audios: list[np.ndarray]) -> list[float | ComponentFailure]:
        started = time.thread_time()
        try:
            batched = getattr(self.detector, "probabilities", None)
            if batched is not None and len(audios) > 1:
                self.calls += 1
                answers = list(batched(audios))
                if len(answers) != len(audios):
                    raise ValueError(f"probabilities returned {len(answers)} answers for {len(audios)} audios")
            else:
                self.calls += len(audios)
                answers = [self.detector.probability(a) for a in audios]
            return [self._checked(p) for p in answers]
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _checked(self, p: object) -> float | ComponentFailure:
        try:
            value = float(p)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return ComponentFailure(self.component, f"probability returned {type(p).__name__}, not a number")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            return ComponentFailure(self.component, f"probability returned {value!r}, not a number in [0, 1]")
        return value


class TurnTaking:
    """One session's questions to its engine's turn detector."""

    def __init__(self, batcher: TurnBatcher, session_id: str):
        self.batcher = batcher
        self.session_id = session_id
        self.max_samples = max_audio_samples(batcher.detector)
        self.last: float | None = None
        """The last answer about the open utterance (None: not asked, or no answer)."""
        self._failed = False

    def skip(self) -> None:
        """A check not asked (counted as shed): the pause is left to the silence timer."""
        self.batcher.shed += 1
        self.last = None

    async def ask(self, audio: np.ndarray) -> float | None:
        """The complete-probability of the open turn ``audio`` (its last ``max_samples`` are sent), or
        None when the check was shed or the detector failed (logged once): the pause then ends by the
        silence timer."""
        try:
            self.last = await self.batcher.probability(audio[-self.max_samples:])
        except ComponentFailure as exc:
            self.last = None
            if not self._failed:
                self._failed = True
                log.warning("session %s: %s; its pauses end by silence (logged once)", self.session_id, exc)
        return self.last
