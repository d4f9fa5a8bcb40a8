"""VAD stage: cuts a session's audio into windows, runs them through the VAD (batched across
sessions) and endpoints the probabilities."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from host.asr import ComponentFailure, brief
from host.contracts import SAMPLE_RATE, VadModel, VadStream
from host.endpointing import Endpointer, EndpointingOptions, Event, SpeechEnd, TurnCheck, TurnPolicy
from host.turn_text import TextVerdict

Answer = float | None | tuple[float | None, TextVerdict | None]
"""An offline answer to a :class:`TurnCheck`: the detector's probability, or it and the text verdict."""

DEFAULT_WINDOW = 512


class AlwaysSpeech:
    """Stands in for a VAD when a session sets ``enable_vad=false``: the client cuts utterances
    with ``flush`` and only ``max_utterance_s`` still applies."""

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        return np.ones(len(windows), dtype=np.float32)


class VadStage:
    """Per-session VAD: windows the audio, endpoints the probabilities into speech events
    with session sample positions. The probabilities themselves come from a :class:`VadBatcher`
    (or, without a model, from :class:`AlwaysSpeech`)."""

    def __init__(self, model: VadModel | None, options: EndpointingOptions, turn: TurnPolicy | None = None):
        self.window = model.window_samples if model is not None else DEFAULT_WINDOW
        self.stream: VadStream = model.open_stream() if model is not None else AlwaysSpeech()
        self.needs_model = model is not None
        self.endpointer = Endpointer(options, self.window, turn)
        self._model = model
        self._rest = np.zeros(0, dtype=np.float32)
        self._unpushed = np.zeros(0, dtype=np.float64)  # probabilities held behind a TurnCheck or an endpoint
        self.windows = 0
        self.resets = 0
        warm_s = min(options.reset_warmup_s, options.endpoint_silence_s)
        self._resets = options.reset_state_at_endpoint and model is not None
        self._warm_windows = int(warm_s * SAMPLE_RATE) // self.window if self._resets else 0
        self._recent = np.zeros((0, self.window), dtype=np.float32)  # the last windows, for warm-up
        self._frame = self._recent  # the windows of the frame being endpointed
        self._before = self._recent  # the warm-up windows just before them
        self._reset_due = False
        self._skip = 0

    def take_windows(self, samples: np.ndarray) -> np.ndarray:
        """The windows to run through the VAD after adding ``samples``, shape ``(n, window)``.

        After an endpoint the stream's recurrent state is reset first, and the windows start with
        the endpoint's trailing silence again, which only re-warms the fresh state (their
        probabilities are dropped by :meth:`endpoint`).
        """
        if self._rest.size:
            samples = np.concatenate([self._rest, samples])
        n = samples.size // self.window
        self._rest = samples[n * self.window:]
        windows = self._frame = samples[: n * self.window].reshape(n, self.window)
        self._before = self._recent
        if self._reset_due:
            windows = self._fresh(windows)
        if self._warm_windows and n:
            self._recent = np.concatenate([self._recent, self._frame])[-self._warm_windows:]
        return windows

    def _fresh(self, windows: np.ndarray) -> np.ndarray:
        """Reset the stream; ``windows`` preceded by the warm-up windows (skipped by :meth:`endpoint`)."""
        self._reset_stream()
        self._skip = len(self._before)
        return np.concatenate([self._before, windows]) if self._skip else windows

    async def probabilities(self, windows: np.ndarray, batcher: VadBatcher | None, component: str) -> np.ndarray:
        """The speech probabilities of ``windows`` (from ``batcher``, or the stream itself without a model),
        checked at the seam: a VAD that raises, or answers the wrong number of probabilities or non-finite
        ones, fails as a :class:`ComponentFailure` naming ``component`` (it would shift the timeline)."""
        try:
            if batcher is not None:
                probabilities = await batcher.probabilities(self.stream, windows)
            else:
                probabilities = self.stream.probabilities(windows)
        except Exception as exc:
            raise ComponentFailure(component, f"probabilities raised {brief(exc)}") from exc
        return checked_probabilities(probabilities, len(windows), component)

    def endpoint(self, probabilities: np.ndarray) -> list[Event]:
        """Endpoint ``probabilities`` in order. Stops after a :class:`TurnCheck`: the caller answers it
        with :meth:`decide`, then calls :meth:`more` for the events of the windows after it."""
        probabilities, self._skip = probabilities[self._skip:], 0
        self._unpushed = np.asarray(probabilities, dtype=np.float64)
        return self.more()

    def more(self) -> list[Event]:
        """The events of the windows held behind the last :class:`TurnCheck` (none when none are).

        Also stops after an endpoint that resets the VAD's state: the windows after it are then
        computed again from a fresh state (:meth:`rerun_windows`), so where the reset falls never
        depends on how the client cut its frames."""
        events: list[Event] = []
        pushed = 0
        for p in self._unpushed.tolist():
            pushed += 1
            new = self.endpointer.push(p)
            events.extend(new)
            self._note_reset(new)
            if new and (isinstance(new[-1], TurnCheck) or self._reset_due):
                break
        self._unpushed = self._unpushed[pushed:]
        self.windows += pushed
        return events

    @property
    def held(self) -> bool:
        """Whether windows of the frame wait to be endpointed (see :meth:`more`, :meth:`rerun_windows`)."""
        return len(self._unpushed) > 0

    @property
    def rerun_due(self) -> bool:
        """Whether the held windows must be computed again, from a fresh state, before endpointing."""
        return self._reset_due and self.held

    def rerun_windows(self) -> np.ndarray:
        """The frame's held windows for the VAD again, after a state reset (their probabilities go
        to :meth:`endpoint`): an utterance ended inside the frame."""
        done = len(self._frame) - len(self._unpushed)
        if self._warm_windows:
            self._before = np.concatenate([self._before, self._frame[:done]])[-self._warm_windows:]
        self._frame = self._frame[done:]
        self._unpushed = self._unpushed[:0]
        return self._fresh(self._frame)

    def decide(self, check: TurnCheck, probability: float | None, text: TextVerdict | None = None) -> list[Event]:
        """The answer to ``check`` (:meth:`Endpointer.decide`); an end makes the held windows due for
        a rerun."""
        events = self.endpointer.decide(check, probability, text)
        self._note_reset(events)
        return events

    def _note_reset(self, events: list[Event]) -> None:
        if self._resets and any(isinstance(e, SpeechEnd) and e.reason in ("silence", "turn") for e in events):
            self._reset_due = True

    def _reset_stream(self) -> None:
        # Silero's recurrent state drifts over a long stream (after one speaker or recording, the
        # next one can score 0.1-0.5 where a fresh state scores 0.9+): start each silence afresh.
        self._reset_due = False
        self.resets += 1
        reset = getattr(self.stream, "reset", None)
        if reset is not None:
            reset()
        elif self._model is not None:
            self.stream = self._model.open_stream()

    def feed(self, samples: np.ndarray, answer: Callable[[TurnCheck], Answer] | None = None) -> list[Event]:
        """Windows, probabilities and endpointing in one call (for offline use and tests), the same
        steps a session takes: each :class:`TurnCheck` is answered with ``answer(check)`` (the
        detector's probability, or it and the text verdict) before the windows after it (unanswered
        without ``answer``), and a reset inside the frame reruns the rest."""
        windows = self.take_windows(samples)
        assert self.stream is not None, "feed() needs a VAD model"
        if not len(windows):
            return []
        out: list[Event] = []
        events = self.endpoint(self.stream.probabilities(windows))
        while True:
            out += events
            if answer is not None and events and isinstance(events[-1], TurnCheck):
                given = answer(events[-1])
                out += self.decide(events[-1], *(given if isinstance(given, tuple) else (given,)))
            if not self.held:
                return out
            events = self.endpoint(self.stream.probabilities(self.rerun_windows())) if self.rerun_due else self.more()

    def flush(self) -> list[Event]:
        return self.endpointer.flush(upto=self.position + self._rest.size)

    def clear(self) -> list[Event]:
        return self.endpointer.clear()

    def speech_pending_or_open(self) -> bool:
        """Whether speech has begun and not ended (for a first partial decoded before it opens)."""
        return self.endpointer.pending or self.endpointer.in_speech

    @property
    def position(self) -> int:
        """Samples endpointed so far (the last partial window is not yet counted)."""
        return self.endpointer.position


def checked_probabilities(probabilities: object, windows: int, component: str) -> np.ndarray:
    """``probabilities`` if it is ``windows`` finite numbers, else :class:`ComponentFailure` saying how not."""
    p = np.asarray(probabilities)
    if p.dtype.kind not in "fiub":
        raise ComponentFailure(component, f"probabilities returned {type(probabilities).__name__} of {p.dtype}, "
                                          f"not numbers for {windows} windows")
    if p.ndim != 1 or len(p) != windows:
        got = len(p) if p.ndim == 1 else f"shape {p.shape}"
        raise ComponentFailure(component, f"probabilities returned {got} probabilities for {windows} windows")
    if not np.isfinite(p).all():
        bad = int(np.count_nonzero(~np.isfinite(p)))
        raise ComponentFailure(component, f"probabilities returned {bad} non-finite value(s) for {windows} windows")
    return p


class VadBatcher:
    """Runs the VAD windows of every session of one model together, off the event loop.

    A small model like Silero costs far less per window in a batch than alone
    (bench/vad_cost.py): fixed per-call costs and reading its weights dominate. While
    a batch runs, new requests queue up and form the next batch, so batches grow with
    load and a lone session waits for nobody. Under load (see :meth:`busy`) a batch
    also starts at least ``interval_s`` after the previous one, so that more requests
    share it: at 32 real-time sessions 20 ms halved the VAD's CPU time. A model with
    ``run_batch`` gets every waiting request in one call; one with only
    ``batch_probabilities`` gets one call per window position; any other is run stream
    by stream, still off the loop.
    """

    def __init__(self, model: VadModel, executor: Executor, max_batch: int = 64, interval_s: float = 0.0):
        self.model = model
        self.executor = executor
        self.max_batch = max_batch
        self.interval_s = interval_s
        self._pending: list[tuple[VadStream, np.ndarray, asyncio.Future]] = []
        self._draining = False
        self._last_start = float("-inf")
        self._second = 0  # arrivals are counted per whole second of the loop's clock
        self._arrivals = 0
        self._arrivals_last_second = 0
        self._streams: set[int] = set()
        self._streams_last_second = 0
        self._everyone_waits: asyncio.Event | None = None
        self.holds = 0
        """Batches that were held back to gather more requests."""
        self.calls = 0
        self.windows = 0
        self.cpu_seconds = 0.0
        """CPU time spent computing probabilities (thread time of the VAD threads)."""

    async def probabilities(self, stream: VadStream, windows: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        self.count_arrival(loop.time(), id(stream))
        future = loop.create_future()
        self._pending.append((stream, windows, future))
        if self._everyone_waits is not None and self._everyone_queued():
            self._everyone_waits.set()
        if not self._draining:
            self._draining = True
            self._drainer = asyncio.create_task(self._drain())  # a reference: the loop keeps weak ones
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                await self._gather(loop)
                self._last_start = loop.time()
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                try:
                    results = await loop.run_in_executor(self.executor, self._run, batch)
                    if not isinstance(results, list) or len(results) != len(batch):
                        # zip() would leave the sessions without an answer waiting forever
                        n = len(results) if isinstance(results, list) else type(results).__name__
                        raise ValueError(f"run_batch returned {n} results for {len(batch)} streams")
                except Exception as exc:  # noqa: BLE001 - delivered to each waiting session
                    results = [exc] * len(batch)
                for (*_, future), probs in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(probs, Exception):
                        future.set_exception(probs)
                    else:
                        future.set_result(probs)
        finally:
            self._draining = False

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Under load, hold the next batch until ``interval_s`` after the previous one started, or
        until every stream active in the last second has a request waiting. A session that streams
        faster than real time alone is never held: it would only wait for itself."""
        if not self.busy() or self._everyone_queued():
            return
        wait = self._last_start + self.interval_s - loop.time()
        if wait <= 0:
            return
        self.holds += 1
        self._everyone_waits = asyncio.Event()
        try:
            await asyncio.wait_for(self._everyone_waits.wait(), wait)
        except TimeoutError:
            pass
        finally:
            self._everyone_waits = None

    def _everyone_queued(self) -> bool:
        """Whether as many requests wait as streams were active in the last second."""
        return len(self._pending) >= self._streams_last_second

    def count_arrival(self, now: float, stream: int) -> None:
        """Count one request of ``stream`` (an id) that arrived at ``now`` (the event loop's clock)."""
        second = int(now)
        if second != self._second:
            consecutive = second == self._second + 1
            self._arrivals_last_second = self._arrivals if consecutive else 0
            self._streams_last_second = len(self._streams) if consecutive else 0
            self._second, self._arrivals, self._streams = second, 0, set()
        self._arrivals += 1
        self._streams.add(stream)

    def busy(self) -> bool:
        """Whether batches are held apart: only when the last second brought at least four
        requests per ``interval_s`` from at least two streams. A few sessions never wait; many
        share fewer, larger calls."""
        return (self.interval_s > 0 and self._streams_last_second > 1
                and self._arrivals_last_second * self.interval_s >= 4)

    def _run(self, batch) -> list[np.ndarray | Exception]:
        started = time.thread_time()
        try:
            return self._compute(batch)
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _compute(self, batch) -> list[np.ndarray | Exception]:
        self.windows += sum(len(w) for _, w, _ in batch)
        run_batch = getattr(self.model, "run_batch", None)
        if run_batch is not None:
            self.calls += 1
            return run_batch([stream for stream, _, _ in batch], [windows for _, windows, _ in batch])
        batched = getattr(self.model, "batch_probabilities", None)
        if batched is None or len(batch) == 1:
            self.calls += len(batch)
            return [_probabilities_or_failure(stream, windows) for stream, windows, _ in batch]
        out = [np.empty(len(windows), dtype=np.float32) for _, windows, _ in batch]
        # Round k takes the k-th window of every request that has one: each stream's
        # windows stay in order, and its recurrent state advances one window per round.
        for k in range(max(len(windows) for _, windows, _ in batch)):
            rows = [i for i, (_, windows, _) in enumerate(batch) if k < len(windows)]
            probs = batched([batch[i][0] for i in rows], np.stack([batch[i][1][k] for i in rows]))
            for i, p in zip(rows, probs):
                out[i][k] = p
            self.calls += 1
        return list(out)


def _probabilities_or_failure(stream: VadStream, windows: np.ndarray) -> np.ndarray | Exception:
    """One stream's probabilities, or what it raised: one broken stream fails only its own session."""
    try:
        return stream.probabilities(windows)
    except Exception as exc:  # noqa: BLE001 - delivered to that stream's session
        return exc
