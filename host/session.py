"""One ``/session``: receiver → VAD → ASR → assembler → sender.

Audio frames are decoded on the event loop (:mod:`host.audio`, cheap numpy
work); their VAD windows run off the loop, batched with other sessions'
(:mod:`host.vad`), and are endpointed one frame at a time. Each finished
utterance is submitted to the model's inference queue at once (or reuses the
speculative decode started during its endpoint silence); a chain of delivery
tasks sends the finals strictly in utterance order, and ``flush.done`` and
``session.end`` join the same chain so they follow every final before them.
Partials of the open utterance are requested as audio arrives, one in flight
at a time, and dropped if their utterance has ended when they return.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from host import protocol as msg
from host.audio import AudioBuffer, AudioDecoder, InvalidAudio
from host.contracts import SAMPLE_RATE, SessionInfo, SessionRecord, Utterance
from host.endpointing import Event, SpeechEnd, SpeechPause, SpeechResume, SpeechStart
from host.limits import TokenBucket
from host.metrics import Metrics
from host.models import LoadedEngine
from host.partials import LocalAgreement
from host.protocol import MAX_JSON_DEPTH, Close, ConfigError, ErrorCode, nested_deeper_than
from host.recording import SessionRecorder
from host.scheduler import FINAL, PARTIAL, SPECULATIVE, Scheduler, Ticket
from host.sender import Sender
from host.session_config import SessionConfig, check_language
from host.vad import VadBatcher, VadStage

log = logging.getLogger(__name__)


@dataclass
class SessionServices:
    """What a session needs from its worker."""

    worker_id: str
    scheduler: Scheduler
    vad_batcher: Callable[[Any], VadBatcher]
    """The shared :class:`VadBatcher` of a VAD model."""
    max_frame_bytes: int
    partial_interval_s: float
    """New audio (seconds) between two partial requests of an open utterance."""
    lag_warning_s: float
    """A final waiting this long after its endpoint triggers a processing_lag warning."""
    lag_limit_s: float
    """...and this long ends the session with a processing_lag error."""
    metrics: Metrics
    idle_timeout_s: float = 0.0
    """No client message for this long ends the session (0: never)."""
    max_session_s: float = 0.0
    """A session open this long is ended (0: no limit)."""
    max_control_per_s: float = 0.0
    """Sustained JSON control messages per second (0: unlimited); more are dropped with an error."""
    max_pending_finals: int = 4
    """Final decodes one session may have queued or running; past this its messages wait (backpressure).
    Real-time speech rarely has two; a flush storm without it queued 645 and starved every other session."""
    recorder: Callable[[str], SessionRecorder] | None = None
    """Makes the recorder of a session id; None: recording is off."""
    on_started: Callable[[SessionInfo], None] = lambda info: None
    on_released: Callable[[Session], None] = lambda session: None
    """The session gives back its capacity slot: its client is gone, or has session.end."""
    on_ended: Callable[[SessionInfo, SessionRecord], Awaitable[None]] | None = None


class _Speculation(NamedTuple):
    """A speculative decode of the open utterance as if it ended at ``end``."""

    utterance_id: int
    end: int
    words: bool
    ticket: Ticket


class Session:
    def __init__(self, ws, engine: LoadedEngine, config: SessionConfig, services: SessionServices):
        self.id = f"sess_{uuid.uuid4().hex[:16]}"
        self.engine = engine
        self.config = config
        self.services = services
        self.out = Sender(ws)
        self.decoder = AudioDecoder(config.encoding, config.sample_rate, config.channels)
        self.buffer = AudioBuffer()
        self.vad = VadStage(engine.vad if config.enable_vad else None, engine.endpointing)
        self.transcript = engine.assembler.open_session()
        self.language = config.language
        self.model = engine.asr.variants[config.model]
        self.queue = services.scheduler.queue_for(self.model.key, self.model.parallelism)
        self.info = SessionInfo(self.id, engine.id, config.public(), services.worker_id)
        self.recorder = services.recorder(self.id) if services.recorder is not None else None
        self.started_at = time.time()
        self._opened = self._last_message = time.monotonic()
        self._control_rate = TokenBucket(services.max_control_per_s, 2 * services.max_control_per_s)
        self._rate_reported = 0.0
        self.speech_seconds = 0.0
        self.errors: dict[str, int] = {}
        self._ws = ws
        self._lock = asyncio.Lock()  # one pipeline step at a time (frames, control, finish)
        self._tail: asyncio.Task | None = None
        self._utterance: tuple[int, int] | None = None  # (id, start sample) of the open utterance
        self._agreement = LocalAgreement()
        self._partial: tuple[int, Ticket] | None = None  # (utterance id, job): one partial in flight
        self._partial_from = 0  # buffer position the last partial request covered
        self._partial_tasks: set[asyncio.Task] = set()
        self._speculative: _Speculation | None = None
        self._previous_end = -1  # end sample of the last utterance
        self._awaiting: dict[int, float] = {}  # utterance id -> monotonic time its endpoint fired
        self._pending: dict[int, Ticket] = {}  # utterance id -> its final's decode, until it settles
        self._settled = asyncio.Event()  # set whenever a final's decode settles
        self._held_back = False  # waiting for room in the final queue (backpressure): not idle
        self._client_gone = False  # disconnected without `end`: its last finals are for the record only
        self._abandoned = False  # the lag budget ran out after `end`: queued finals were withdrawn
        self._lag_warned: set[int] = set()
        self._next_utterance = 0
        self._finished = False
        self._finishing: asyncio.Future | None = None
        self._status = "completed"
        self._error: str | None = None

    # --- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until ``end``, a disconnect, or :meth:`stop`."""
        self.services.on_started(self.info)
        await self.out.send(msg.session_begin(self.id, self.engine.id, self.config.public()))
        watchdog = asyncio.create_task(self._watch())
        try:
            async for message in self._ws:
                self._last_message = time.monotonic()
                if isinstance(message, bytes):
                    await self._on_audio(message)
                else:
                    await self._on_text(message)
                if self._finished:
                    break
        except Exception as exc:  # the connection dropping is handled below too
            if not _is_disconnect(exc):
                log.exception("session %s failed", self.id)
                self._status, self._error = "error", f"{type(exc).__name__}: {exc}"
                await self._report(ErrorCode.INTERNAL_ERROR, "internal error; the session is ending", recoverable=False)
        finally:
            if not self._finished:
                # The client went away without `end`: nobody waits for this session's finals, so
                # its slot is free now; finalizing (and recording) what was said goes on after,
                # on the decoder time live sessions leave free.
                self._client_gone = True
                self.services.on_released(self)
            await self.finish(msg.NORMAL if self._status == "completed" else msg.INTERNAL)
            watchdog.cancel()
            record = self.record()
            if self.services.on_ended is not None:
                await self.services.on_ended(self.info, record)

    async def stop(self, close: Close = msg.SHUTTING_DOWN) -> None:
        """End the session from the server side: finalize, send session.end, close."""
        await self.finish(close)

    async def finish(self, close: Close = msg.NORMAL, linger: bool = True) -> None:
        """Finalize open speech, wait for every final, send session.end and close.

        ``linger=False`` sends the close frame and FIN without waiting for the peer's reply (a peer
        presumed gone; see :func:`host.frontdoor.close_now`). Idempotent: later and concurrent callers wait
        for the first one's work, which cancelling a waiter does not interrupt."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._finish(close, linger))
        await asyncio.shield(self._finishing)

    async def _finish(self, close: Close, linger: bool) -> None:
        async with self._lock:
            if self._finished:
                return
            self._finished = True
            try:
                tail = self.decoder.finish()
                if tail.size:
                    await self._process(tail)
                await self._handle(self.vad.flush())
            except Exception:  # still deliver what we have
                log.exception("session %s: finalizing failed", self.id)
        if self._tail is not None:
            await self._tail
        end = msg.session_end(self.id, self.buffer.end / SAMPLE_RATE, self.speech_seconds,
                              self.transcript.segments, self.config.word_timestamps)
        if self.recorder is not None:
            uris = await self.recorder.close(self._recorded_transcript())
            if uris is not None:
                end["audio_uri"], end["transcript_uri"] = uris
        await self.out.send(end)
        self.services.on_released(self)  # the close handshake holds no capacity
        if self._abandoned:  # the lag budget ran out while finishing: closed like a lag cut
            close = msg.PROCESSING_LAG
        await self.out.close(close, linger=linger)

    def _recorded_transcript(self) -> dict[str, Any]:
        """The transcript JSON of a recording: session.end with words, plus config and timings."""
        document = msg.session_end(self.id, self.buffer.end / SAMPLE_RATE, self.speech_seconds,
                                   self.transcript.segments, with_words=True)
        del document["type"]
        document.update(worker_id=self.services.worker_id, engine=self.engine.id, config=self.config.public(),
                        status=self._status, error=self._error, started_at=self.started_at, ended_at=time.time(),
                        audio_file=self.recorder.wav_path.name if self.recorder is not None else None)
        return document

    def record(self) -> SessionRecord:
        return SessionRecord(
            session_id=self.id,
            worker_id=self.services.worker_id,
            engine=self.engine.id,
            model=self.config.model,
            status=self._status,
            started_at=self.started_at,
            ended_at=time.time(),
            audio_seconds=round(self.buffer.end / SAMPLE_RATE, 3),
            speech_seconds=round(self.speech_seconds, 3),
            segments=len(self.transcript.segments),
            error=self._error,
        )

    # --- client messages ----------------------------------------------------

    async def _on_audio(self, data: bytes) -> None:
        if len(data) > self.services.max_frame_bytes:
            await self._report(ErrorCode.FRAME_TOO_LARGE, f"audio frame of {len(data)} bytes exceeds max_frame_bytes "
                               f"({self.services.max_frame_bytes}); frame dropped", recoverable=True)
            return
        try:
            samples = self.decoder.decode(data)
        except InvalidAudio as exc:
            await self._report(ErrorCode.INVALID_AUDIO, f"{exc}; frame dropped", recoverable=True)
            return
        await self._room_for_finals()
        async with self._lock:
            if not self._finished:
                await self._process(samples)
        await self._check_lag()

    async def _watch(self, every_s: float = 0.25) -> None:
        """Check limits between frames too: a client may stop sending while finals fall behind,
        and after `end` while the last finals are decoded (the lag budget holds until session.end)."""
        while not self._finished or self._awaiting:
            await asyncio.sleep(every_s)
            if self._finished:
                await self._check_lag_after_end()
            else:
                await self._check_lag()
                await self._check_time_limits()

    async def _check_time_limits(self) -> None:
        now, s = time.monotonic(), self.services
        if self._finished:
            return
        # A compat dialect's connection also counts vendor messages that map to no native one.
        last = max(self._last_message, getattr(self._ws, "last_activity", 0.0))
        if s.idle_timeout_s and now - last >= s.idle_timeout_s and not self._held_back:
            self._status, self._error = "error", "idle_timeout"
            await self._report(ErrorCode.IDLE_TIMEOUT, f"no audio or message for {s.idle_timeout_s:g} s; ending the session",
                               recoverable=False)
            await self.finish(msg.IDLE_TIMEOUT, linger=False)
        elif s.max_session_s and now - self._opened >= s.max_session_s:
            self._status, self._error = "error", "max_duration"
            await self._report(ErrorCode.MAX_DURATION, f"the session reached the {s.max_session_s:g} s limit; ending it",
                               recoverable=False)
            await self.finish(msg.SESSION_TOO_LONG)

    async def _check_lag(self) -> None:
        """Warn when finals fall behind; past the hard limit end the session rather than drift."""
        if not self._awaiting or self._finished:
            return
        now = time.monotonic()
        uid, since = min(self._awaiting.items(), key=lambda item: item[1])
        lag = now - since
        if lag >= self.services.lag_limit_s:
            self._status, self._error = "error", f"processing_lag {lag:.1f} s"
            await self._report(ErrorCode.PROCESSING_LAG, f"transcription is {lag:.1f} s behind the audio "
                               f"(limit {self.services.lag_limit_s:g} s); ending the session", recoverable=False)
            await self.finish(msg.PROCESSING_LAG)
        elif lag >= self.services.lag_warning_s and uid not in self._lag_warned:
            self._lag_warned.add(uid)
            await self.out.send(msg.warning(ErrorCode.PROCESSING_LAG, f"the final of utterance {uid} is "
                                            f"{lag:.1f} s late", lag_s=round(lag, 2)))

    async def _check_lag_after_end(self) -> None:
        """After `end` the session is finishing; past the lag limit its queued finals are withdrawn
        (those already decoding still arrive), so a session that has left cannot keep the decoders."""
        if self._abandoned or not self._awaiting:
            return
        lag = time.monotonic() - min(self._awaiting.values())
        if lag < self.services.lag_limit_s:
            return
        self._abandoned = True
        withdrawn = sorted(uid for uid, ticket in self._pending.items() if ticket.cancel())
        self._status, self._error = "error", f"processing_lag {lag:.1f} s"
        await self._report(ErrorCode.PROCESSING_LAG, f"transcription is {lag:.1f} s behind the audio (limit "
                           f"{self.services.lag_limit_s:g} s) after end; {len(withdrawn)} queued utterance(s) "
                           f"withdrawn: {withdrawn[:20]}", recoverable=False)

    async def _room_for_finals(self) -> None:
        """Backpressure: while this session has ``max_pending_finals`` final decodes unsettled, stop reading
        its messages (TCP then slows the client) instead of queueing more decodes. A flush storm or a
        fast upload so holds at most that many jobs in the shared queue."""
        limit = max(1, self.services.max_pending_finals)
        if len(self._pending) < limit:
            return
        self._held_back = True
        try:
            while len(self._pending) >= limit and not self._finished:
                self._settled.clear()
                await self._settled.wait()
        finally:
            self._held_back = False
            self._last_message = time.monotonic()

    def _bulk(self) -> bool:
        """Whether the client sends audio faster than real time (an upload), or has gone: its
        decodes then use the capacity real-time sessions leave free."""
        return self._client_gone or self.buffer.end / SAMPLE_RATE - (time.monotonic() - self._opened) > BULK_AHEAD_S

    async def _on_text(self, text: str) -> None:
        try:
            if nested_deeper_than(text, MAX_JSON_DEPTH):
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:
            await self._report(ErrorCode.INVALID_JSON, f"malformed JSON: {str(exc)[:200]}", recoverable=True)
            return
        kind = message.get("type") if isinstance(message, dict) else None
        # `end` always goes through: dropping it would leave the client waiting for session.end.
        if kind != "end" and not self._control_rate.take():
            now = time.monotonic()
            if now - self._rate_reported >= 1.0:  # one error a second, not one per dropped message
                self._rate_reported = now
                await self._report(ErrorCode.RATE_LIMITED, f"more than {self.services.max_control_per_s:g} control "
                                   "messages per second; extra messages are dropped", recoverable=True)
            return
        handler = {
            "config": self._on_config,
            "flush": self._on_flush,
            "clear": self._on_clear,
            "end": self._on_end,
        }.get(kind) if isinstance(kind, str) else None
        if handler is None:
            shown = kind if isinstance(kind, str) else "(missing)"
            await self._report(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {shown!r}; "
                               "expected config, flush, clear or end", recoverable=True)
            return
        await handler(message)

    async def _on_config(self, message: dict) -> None:
        unknown = sorted(set(message) - {"type", "language"})
        try:
            if unknown:
                raise ConfigError(ascii(unknown[0]), "cannot be changed during a session (only language can)")
            if "language" in message:
                self.language = check_language(message["language"], self.engine.spec)
        except ConfigError as exc:
            await self._report(ErrorCode.INVALID_CONFIG, str(exc), recoverable=True, param=exc.param)

    async def _on_flush(self, message: dict) -> None:
        await self._room_for_finals()
        async with self._lock:
            if self._finished:
                return
            await self._handle(self.vad.flush())
            self._after_finals(lambda: self.out.send(msg.flush_done()))

    async def _on_clear(self, message: dict) -> None:
        async with self._lock:
            if not self._finished:
                await self._handle(self.vad.clear())
                self.buffer.discard_before(self.buffer.end)

    async def _on_end(self, message: dict) -> None:
        await self.finish(msg.NORMAL)

    # --- pipeline -------------------------------------------------------------

    async def _process(self, samples: np.ndarray) -> None:
        """Buffer and endpoint one frame's samples (caller holds the lock)."""
        self.buffer.append(samples)
        self.services.metrics.audio_seconds.inc(len(samples) / SAMPLE_RATE)
        if self.recorder is not None:
            self.recorder.append(samples)
        windows = self.vad.take_windows(samples)
        if not len(windows):
            return
        if self.vad.needs_model:
            probabilities = await self.services.vad_batcher(self.engine.vad).probabilities(self.vad.stream, windows)
        else:
            probabilities = self.vad.stream.probabilities(windows)
        await self._handle(self.vad.endpoint(probabilities))
        self.buffer.discard_before(self.vad.endpointer.earliest_needed_sample())
        self._request_partial()

    async def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, SpeechStart):
                self._utterance = (self._next_utterance, event.sample)
                self._next_utterance += 1
                self._agreement = LocalAgreement()
                self._partial_from = event.sample
                if self.config.enable_vad:
                    await self.out.send(msg.speech_start(event.sample / SAMPLE_RATE))
            elif isinstance(event, SpeechPause) and self._utterance is not None:
                self._speculate(event.sample)
            elif isinstance(event, SpeechResume):
                # Withdraw the guess now, not at the next pause: under load it would otherwise wait
                # in the queue and could still take a thread for audio that is no longer the end.
                self._drop_speculative()
            elif isinstance(event, SpeechEnd) and self._utterance is not None:
                uid, start = self._utterance
                self._utterance = None
                if self._partial is not None:
                    self._partial[1].cancel()  # not started yet: its utterance is over
                if self.config.enable_vad:
                    await self.out.send(msg.speech_end(event.sample / SAMPLE_RATE))
                if event.reason != "clear":
                    self._finalize(Utterance(uid, start / SAMPLE_RATE, event.sample / SAMPLE_RATE),
                                   start, event.sample, self._wants_words(start, cut=event.reason != "silence"))
                else:
                    self._drop_speculative()
                self._previous_end = event.sample

    def _transcribe_job(self, audio: np.ndarray, *, words: bool = False, partial_: bool = False):
        language = None if self.language == "auto" else self.language
        return partial(self.model.transcribe, audio, language=language, word_timestamps=words, partial=partial_)

    def _wants_words(self, start: int, cut: bool = False) -> bool:
        """Whether the final of an utterance starting at ``start`` needs word timings: the client
        asked for them, the session is recorded, or the utterance borders a cut that was not a
        pause (the assembler drops words repeated across such a cut by their times). Otherwise
        word alignment, a second decoder pass, is skipped: about a tenth of a final's compute."""
        return (self.config.word_timestamps or self.recorder is not None or cut
                or start <= self._previous_end)

    def _speculate(self, end: int) -> None:
        """Speech paused: decode the utterance as it would end now, so the final is ready at the endpoint."""
        assert self._utterance is not None  # the caller checked
        uid, start = self._utterance
        self._drop_speculative()
        if self.queue.waiting(SPECULATIVE):
            return  # finals are queued: a guess that speech may resume would only delay them
        words = self._wants_words(start)
        ticket = self.queue.submit(self._transcribe_job(self.buffer.slice(start, end), words=words), SPECULATIVE,
                                   owner=self.id, bulk=self._bulk())
        self._speculative = _Speculation(uid, end, words, ticket)

    def _drop_speculative(self) -> None:
        """Forget the speculative decode, withdrawing it if no thread has started it."""
        if self._speculative is not None:
            withdrawn = self._speculative.ticket.cancel()
            self.services.metrics.speculative.labels("withdrawn" if withdrawn else "wasted").inc()
            self._speculative = None

    def _finalize(self, utterance: Utterance, start: int, end: int, words: bool) -> None:
        self.speech_seconds += utterance.end - utterance.start
        self.services.metrics.speech_seconds.inc(utterance.end - utterance.start)
        ticket = None
        spec, self._speculative = self._speculative, None
        if spec is not None:
            withdrawn = spec.ticket.cancel()  # a guess for other audio must not keep a decoder busy
            if (spec.utterance_id, spec.end, spec.words) == (utterance.id, end, words) and not withdrawn:
                ticket = spec.ticket  # already decoding or decoded exactly this audio: reuse it
            outcome = "withdrawn" if withdrawn else "used" if ticket is not None else "wasted"
            self.services.metrics.speculative.labels(outcome).inc()
        if ticket is None:
            ticket = self.queue.submit(self._transcribe_job(self.buffer.slice(start, end), words=words), FINAL,
                                       owner=self.id, bulk=self._bulk())
        self._awaiting[utterance.id] = time.monotonic()
        self._pending[utterance.id] = ticket
        ticket.future.add_done_callback(lambda _: self._final_settled(utterance.id))
        self._chain(self._deliver_final(utterance, ticket.future))

    def _final_settled(self, uid: int) -> None:
        self._pending.pop(uid, None)
        self._settled.set()

    async def _deliver_final(self, utterance: Utterance, future: asyncio.Future) -> None:
        try:
            result = await future
        except asyncio.CancelledError:
            if not (self._abandoned and future.cancelled()):
                raise
            return  # withdrawn by the lag budget after `end` (reported once, with the ids)
        except Exception as exc:  # one failed utterance must not end the session
            log.exception("session %s: transcription of utterance %d failed", self.id, utterance.id)
            await self._report(ErrorCode.INTERNAL_ERROR, f"transcription of utterance {utterance.id} failed: "
                               f"{type(exc).__name__}", recoverable=True, utterance_id=utterance.id)
            return
        finally:
            endpointed_at = self._awaiting.pop(utterance.id, None)
        segment = self.transcript.add(utterance, result)
        if segment is not None:
            await self.out.send(msg.transcript_final(segment, self.config.word_timestamps))
            if endpointed_at is not None:
                self.services.metrics.final_latency.observe(time.monotonic() - endpointed_at)

    def _request_partial(self) -> None:
        """Ask for a partial of the open utterance when enough new audio came since the last one."""
        if not self.config.interim_results or self._utterance is None or self._finished:
            return
        uid, start = self._utterance
        if self._partial is not None and self._partial[0] == uid:
            return  # one in flight for this utterance; the next is asked for when it returns
        pos = self.buffer.end
        first = self._partial_from == start
        # Until a partial with text was sent, ask again sooner: the first one is the one users wait for.
        interval = self.services.partial_interval_s * (1.0 if self._agreement.shown else 0.4)
        if not first and pos - self._partial_from < interval * SAMPLE_RATE:
            return
        self._partial_from = pos
        ticket = self.queue.submit(
            self._transcribe_job(self.buffer.slice(start, pos), partial_=True), PARTIAL,
            stale=lambda: self._utterance is None or self._utterance[0] != uid, owner=self.id, bulk=self._bulk(),
        )
        self._partial = (uid, ticket)
        task = asyncio.create_task(self._deliver_partial(uid, start, pos, ticket, time.monotonic()))
        self._partial_tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._partial_tasks.discard)

    async def _deliver_partial(self, uid: int, start: int, end: int, ticket: Ticket, asked_at: float) -> None:
        try:
            result = await ticket.future
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a skipped or failed partial is just dropped
            result = None
        finally:
            if self._partial is not None and self._partial[1] is ticket:
                self._partial = None
        # Only while its utterance is still open: a partial never follows its speech_end or final.
        if result is not None and self._utterance is not None and self._utterance[0] == uid:
            text = self._agreement.update(result.text)
            if text:
                await self.out.send(msg.transcript_partial(uid, text, start / SAMPLE_RATE, end / SAMPLE_RATE))
                self.services.metrics.partial_latency.observe(time.monotonic() - asked_at)
        self._request_partial()

    def _after_finals(self, send: Callable[[], Awaitable[Any]]) -> None:
        self._chain(send())

    def _chain(self, step: Awaitable[Any]) -> None:
        """Run ``step`` after every step chained before it, in order."""
        previous = self._tail

        async def run() -> None:
            if previous is not None:
                await previous
            try:
                await step
            except Exception:  # keep the chain alive for later steps
                log.exception("session %s: delivery step failed", self.id)

        self._tail = asyncio.create_task(run())

    async def _report(self, code: ErrorCode, message: str, recoverable: bool, **fields: Any) -> None:
        """Send an ``error`` (``fields``: its structured ``utterance_id`` or ``param``), count and log it."""
        self.errors[code] = self.errors.get(code, 0) + 1
        self.services.metrics.errors.labels(str(code)).inc()
        log.info("session %s: %s (%s)", self.id, code, message)
        await self.out.send(msg.error(code, message, recoverable, **fields))


BULK_AHEAD_S = 2.0
"""Audio this far ahead of the session's wall-clock age marks an upload: its decodes are served after
every real-time session's (12 uploads at 100x made a real-time session's finals 5-9 s late)."""

def _is_disconnect(exc: BaseException) -> bool:
    from websockets.exceptions import ConnectionClosed

    return isinstance(exc, (ConnectionClosed, ConnectionError, asyncio.CancelledError))

