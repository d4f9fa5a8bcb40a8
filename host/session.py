"""One ``/session``: receiver → VAD → ASR → assembler → sender.

Audio frames are decoded on the event loop (:mod:`host.audio`, cheap numpy work); their VAD
windows run off the loop, batched with other sessions' (:mod:`host.vad`), and are endpointed one
frame at a time. :mod:`host.decoding` decides which decodes each utterance gets (speculative,
final, partials); a chain of delivery tasks sends the finals strictly in utterance order, and
``flush.done`` and ``session.end`` join the same chain so they follow every final before them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import numpy as np

from host import protocol as msg
from host import turn_text
from host.asr import ComponentFailure
from host.audio import AudioBuffer, AudioDecoder, InvalidAudio
from host.contracts import SAMPLE_RATE, SessionInfo, SessionRecord, Utterance
from host.control import SessionControl
from host.decoding import UtteranceDecoder
from host.endpointing import (
    Event,
    SpeechEnd,
    SpeechLikely,
    SpeechPause,
    SpeechResume,
    SpeechStart,
    TurnCheck,
)
from host.frontdoor import close_now, lost_without_close
from host.keepalive import Keepalive
from host.limits import TokenBucket
from host.models import LoadedEngine
from host.protocol import ENCODINGS, Close, ErrorCode
from host.scheduler import FINAL
from host.sender import Sender, Timeline
from host.services import SessionServices
from host.session_config import SessionConfig
from host.turn import TurnTaking
from host.vad import VadStage

log = logging.getLogger(__name__)


class Session(SessionControl):
    """One client connection's pipeline; :meth:`run` serves it to the end."""

    def __init__(self, ws, engine: LoadedEngine, config: SessionConfig, services: SessionServices,
                 resume_window_s: float = 0.0):
        self.id = f"sess_{uuid.uuid4().hex[:16]}"
        self.engine = engine
        self.config = config
        self.services = services
        native = getattr(ws, "send_message", None) is None  # not a compatibility dialect's connection
        self.resume_window_s = resume_window_s if native and config.resumable else 0.0
        self.resume_token = secrets.token_urlsafe(24) if self.resume_window_s > 0 else None
        """The token a client re-attaches with (docs/protocol.md, "Resume"); None: not resumable."""
        self.out = Sender(ws, Timeline(config.time_offset, config.segment_offset, config.utterance_offset),
                          resumable=self.resume_token is not None)
        self.audio_bytes = 0
        """The client's audio bytes the session has taken (dropped frames are not counted)."""
        self._frame_bytes = config.channels * ENCODINGS[config.encoding]
        self.ack: dict[str, Any] | None = None  # the last audio.ack sent
        self.parked = False
        """The client's connection was lost and the session waits for it to re-attach (resumable only)."""
        self.attached = False
        self._attach: asyncio.Future | None = None  # while parked: resolved with the new connection (None: give up)
        self._let_go: asyncio.Event | None = None  # set once the session is done with a re-attached connection
        self.decoder = AudioDecoder(config.encoding, config.sample_rate, config.channels)
        self.buffer = AudioBuffer()
        self.vad = VadStage(engine.vad if config.enable_vad else None, *self._endpointing())
        self.turns = (TurnTaking(services.turn_batcher(engine.turn, engine.component("turn")), self.id)
                      if engine.turn is not None else None)
        self.transcript = engine.assembler.open_session()
        self.info = SessionInfo(self.id, engine.id, config.public(), services.worker_id)
        self.recorder = services.recorder(self.id) if services.recorder is not None else None
        model = engine.asr.variants[config.model]
        self.decoding = UtteranceDecoder(
            model, services.scheduler.queue_for(model.key, model.parallelism), self.buffer,
            component=engine.component("asr"), config=self.info.config, session_id=self.id,
            recorded=self.recorder is not None, partial_interval_s=services.partial_interval_s,
            metrics=services.metrics, send=self.out.send)
        self.started_at = time.time()
        self._opened = self._last_message = self.decoding.opened
        self._control_rate = TokenBucket(services.max_control_per_s, 2 * services.max_control_per_s)
        self._rate_reported = 0.0
        self.errors: dict[str, int] = {}
        self._ws = ws
        self.keepalive: Keepalive | None = None
        self._lock = asyncio.Lock()  # one pipeline step at a time (frames, control, finish)
        self._tail: asyncio.Task | None = None
        self._abandoned = False  # the lag budget ran out after `end`: queued finals were withdrawn
        self._lag_warned: set[int] = set()
        self._finished = False
        self._finishing: asyncio.Future | None = None
        self._failure: ComponentFailure | None = None  # a stage broke: the session ends with it
        self._status = "completed"
        self._error: str | None = None

    # --- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until ``end``, a disconnect, or :meth:`stop`; a resumable session whose
        connection is lost waits ``resume_window_s`` for the client to re-attach (:meth:`attach`)."""
        self.services.on_started(self.info)
        begin = msg.session_begin(self.id, self.engine.id, self.config.public())
        if self.resume_token is not None:
            begin.update(resume_token=self.resume_token, resume_window_s=self.resume_window_s)
        await self.out.send(begin)
        watchdog = asyncio.create_task(self._watch())
        try:
            while True:
                await self._serve_connection()
                if self._finished or not await self._park():
                    break
        finally:
            self.parked = False
            if not self._finished:
                # The client went away without `end`: nobody waits for this session's finals, so
                # its slot is free now; finalizing (and recording) what was said goes on after,
                # on the decoder time live sessions leave free.
                self.decoding.client_gone = True
                self.services.on_released(self)
            # After a stage broke, the unread audio behind it could hold the close handshake: don't wait.
            await self.finish(msg.NORMAL if self._status == "completed" else msg.INTERNAL, linger=self._failure is None)
            watchdog.cancel()
            if self._let_go is not None:
                self._let_go.set()
            record = self.record()
            if self.services.on_ended is not None:
                await self.services.on_ended(self.info, record)

    async def _serve_connection(self) -> None:
        """Read the current connection's messages until it ends (or the session does)."""
        ws = self._ws
        self.keepalive = (Keepalive(ws, self.services.ping_interval_s, self._backlogged, self._peer_dead)
                          if self.services.ping_interval_s > 0 else None)
        pinger = asyncio.create_task(self.keepalive.run()) if self.keepalive is not None else None
        try:
            async for message in ws:
                self._last_message = time.monotonic()
                if isinstance(message, bytes):
                    await self._on_audio(message)
                elif isinstance(message, dict):  # from a dialect: already a native message
                    await self._on_message(message)
                else:
                    await self._on_text(message)
                if self._finished:
                    break
        except ComponentFailure as exc:  # a stage broke (the VAD): end with what was transcribed before it
            await self._fail(exc)
        except Exception as exc:  # the connection dropping is handled below too
            if not _is_disconnect(exc):
                log.exception("session %s failed", self.id)
                await self._give_up(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}",
                                    "internal error; the session is ending")
        finally:
            if pinger is not None:
                pinger.cancel()

    async def _park(self) -> bool:
        """The connection was lost: a resumable session waits up to ``resume_window_s`` for the client to
        re-attach, holding its slot, producing and keeping its finals. True when one did."""
        if (self.resume_token is None or self._finished or self._failure is not None or self._status != "completed"
                or not lost_without_close(self._ws)):
            return False
        self.out.gone = True
        if self._let_go is not None:  # the connection that re-attached before is done with
            self._let_go.set()
        self.parked, self.attached = True, False
        self._attach = asyncio.get_running_loop().create_future()
        log.info("session %s: connection lost; parked for %g s (resume)", self.id, self.resume_window_s)
        try:
            ws = await asyncio.wait_for(asyncio.shield(self._attach), self.resume_window_s)
        except TimeoutError:
            ws = None
        finally:
            self._attach = None
            self.parked = False
        if ws is None:
            log.info("session %s: not resumed within %g s; finalizing", self.id, self.resume_window_s)
            return False
        self._ws = ws
        self._last_message = time.monotonic()
        return True

    async def attach(self, ws, last_seq: int) -> None:
        """Re-attach the client on ``ws`` (a resume, checked by the caller: :attr:`parked` and
        ``self.out.can_replay(last_seq)``): ``session.resumed``, the messages after ``last_seq``, then
        the session goes on. Returns once the session is done with ``ws``."""
        assert self._attach is not None and not self._attach.done()
        let_go = self._let_go = asyncio.Event()
        self.attached = True
        resumed = msg.session_resumed(self.id, last_seq, self.audio_bytes, self.ack)
        self._attach.set_result(ws)  # the session reads ws from now on
        log.info("session %s: resumed after seq %d (%d sent); client audio from byte %d", self.id, last_seq,
                 self.out.seq, self.audio_bytes)
        await self.out.attach(ws, resumed, last_seq)
        await let_go.wait()

    async def _check_time_limits(self) -> None:
        if self.parked:  # no client to be idle: the resume window is the limit
            return
        await super()._check_time_limits()

    async def _acknowledge(self, utterance: Utterance) -> None:
        """``audio.ack``: every utterance up to ``utterance`` is delivered, so the client's audio before
        its end will never be needed again (resumable sessions)."""
        if self.resume_token is None:
            return
        audio_bytes = min(self.audio_bytes, int(utterance.end * self.config.sample_rate) * self._frame_bytes)
        if self.ack is not None and audio_bytes <= self.ack["bytes"]:
            return
        self.ack = msg.audio_ack(utterance.end, audio_bytes)
        await self.out.send(self.ack)

    def _backlogged(self) -> bool:
        """Whether the session has lately withheld reading its client (backpressure): a pong may then
        wait behind the client's own frames."""
        held = self.decoding.held_back or time.monotonic() - self.decoding.released_at < self.services.ping_interval_s
        return held and not self._finished

    async def _peer_dead(self) -> None:
        """The client stopped answering pings while we read it: drop the connection (its speech is still
        finalized and recorded, as for any client that goes away)."""
        log.info("session %s: keepalive ping timeout; dropping the connection", self.id)
        await close_now(self._ws, msg.CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

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
        if self._attach is not None and not self._attach.done():  # parked: no client will come back
            self._attach.set_result(None)
        async with self._lock:
            if self._finished:
                return
            self._finished = True
            self.decoding.stopped = True
            await self._finalize_open()
        if self._tail is not None:
            await self._tail
        if self._status == "completed" and (all_failed := self.decoding.all_failed()) is not None:
            self._status, self._error = "error", all_failed
        end = msg.session_end(self.id, self.buffer.end / SAMPLE_RATE, self.decoding.speech_seconds,
                              self.transcript.segments, self.config.word_timestamps)
        if self.recorder is not None:
            uris = await self.recorder.close(self._recorded_transcript())
            if uris is not None:
                end["audio_uri"], end["transcript_uri"] = uris
        await self.out.send(end)
        self.services.on_released(self)  # the close handshake holds no capacity
        if self._abandoned:  # the lag budget ran out while finishing: closed like a lag cut
            close = msg.PROCESSING_LAG
        elif self._failure is not None:
            close = msg.INTERNAL
        await self.out.close(close, linger=linger)

    async def _finalize_open(self) -> None:
        """Endpoint the last audio and end the open utterance (caller holds the lock)."""
        try:
            tail = self.decoder.finish()
            if tail.size and self._failure is None:
                await self._process(tail)
        except ComponentFailure as exc:  # the speech before the tail is still finalized
            await self._fail(exc)
        except Exception:  # still deliver what we have
            log.exception("session %s: finalizing failed", self.id)
            return
        try:
            await self._handle(self.vad.flush())
        except Exception:  # still deliver what we have
            log.exception("session %s: finalizing failed", self.id)

    async def _fail(self, exc: ComponentFailure) -> None:
        """A stage broke: report it (not recoverable, naming the component); the session ends with
        every final of the speech before it."""
        if self._failure is not None:
            return
        self._failure = exc
        log.error("session %s: %s; ending the session", self.id, exc)
        await self._give_up(ErrorCode.INTERNAL_ERROR, str(exc), f"{exc}; the session is ending")

    async def _give_up(self, code: ErrorCode, error: str, message: str, close: Close | None = None,
                       linger: bool = True) -> None:
        """Record ``error`` as the session's, send a non-recoverable error, and with ``close`` finish."""
        self._status, self._error = "error", error
        await self._report(code, message, recoverable=False)
        if close is not None:
            await self.finish(close, linger=linger)

    def _recorded_transcript(self) -> dict[str, Any]:
        """The transcript JSON of a recording: session.end with words, plus config and timings."""
        document = msg.session_end(self.id, self.buffer.end / SAMPLE_RATE, self.decoding.speech_seconds,
                                   self.transcript.segments, with_words=True)
        del document["type"]
        document.update(worker_id=self.services.worker_id, engine=self.engine.id, config=self.config.public(),
                        status=self._status, error=self._error, started_at=self.started_at, ended_at=time.time(),
                        audio_file=self.recorder.wav_path.name if self.recorder is not None else None)
        return document

    def record(self) -> SessionRecord:
        return SessionRecord(self.id, self.services.worker_id, self.engine.id, self.config.model, self._status,
                             self.started_at, time.time(), audio_seconds=round(self.buffer.end / SAMPLE_RATE, 3),
                             speech_seconds=round(self.decoding.speech_seconds, 3), segments=len(self.transcript.segments),
                             error=self._error)

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
                self.audio_bytes += len(data)
                await self._process(samples)
        await self._check_lag()

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
        batcher = self.services.vad_batcher(self.engine.vad) if self.vad.needs_model else None
        component = self.engine.component("vad")
        await self._handle(self.vad.endpoint(await self.vad.probabilities(windows, batcher, component)))
        while self.vad.held:  # windows after a turn check (once it is answered) or after an endpoint
            if self.vad.rerun_due:  # the VAD's state was reset there: the rest of the frame from it
                rerun = self.vad.rerun_windows()
                await self._handle(self.vad.endpoint(await self.vad.probabilities(rerun, batcher, component)))
            else:
                await self._handle(self.vad.more())
        self.buffer.discard_before(self.vad.endpointer.earliest_needed_sample())
        self.decoding.request_partial()

    async def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, TurnCheck):
                await self._handle(await self._check_turn(event))
            elif isinstance(event, SpeechStart):
                if self.turns is not None:
                    self.turns.last = None
                self.decoding.start(event.sample, event.onset)
                if self.config.enable_vad:
                    await self.out.send(msg.speech_start(event.sample / SAMPLE_RATE))
            elif isinstance(event, SpeechLikely):
                self.decoding.likely(event.sample, self.vad.speech_pending_or_open)
            elif isinstance(event, SpeechPause):
                turn = self.vad.endpointer.turn
                self.decoding.pause(event.sample, sentence_end=turn is not None and turn.consults_text)
            elif isinstance(event, SpeechResume):
                self.decoding.resume()
            elif isinstance(event, SpeechEnd) and (closed := self.decoding.close()) is not None:
                uid, start = closed
                if self.config.turn_events and event.reason != "clear":
                    verdict = self.vad.endpointer.verdict
                    await self.out.send(msg.turn_end(
                        uid, event.sample / SAMPLE_RATE, event.reason, self.turns.last if self.turns else None,
                        verdict.value if verdict else None,
                        None if event.decided is None else event.decided / SAMPLE_RATE))
                if self.config.enable_vad:
                    await self.out.send(msg.speech_end(event.sample / SAMPLE_RATE))
                if event.reason == "clear":
                    self.decoding.discard(event.sample)
                    continue
                cut = event.reason not in ("silence", "turn")
                utterance, ticket = self.decoding.finalize(uid, start, event.sample, cut=cut, heard=event.heard)
                self._chain(self._deliver_final(utterance, ticket.future))

    async def _check_turn(self, check: TurnCheck) -> list[Event]:
        """Ask the turn detector about the pause ``check`` marks; the events its answer causes."""
        start = self.vad.endpointer.utterance_start
        if self.turns is None or start is None:
            return []
        if self.decoding.queue.waiting(FINAL):
            # The decoders are behind: a check would take CPU from the finals (at 40 streams on two
            # cores it pushed every session into processing_lag). The silence timer ends this pause.
            self.turns.skip()
            return self.vad.decide(check, None)
        verdict = None
        if check.text:
            # A text checkpoint: first how the speculative decode reads (it is this pause's final if
            # the turn ends here, so waiting for it costs that final nothing); the detector is asked
            # only about a finished sentence, so a pause costs it one call, as without the text.
            turn = self.vad.endpointer.turn
            assert turn is not None
            result = await self.decoding.speculated(check.end, turn.max_silence_s)
            verdict = turn_text.read(result, turn.sentence_end)
            if verdict is not turn_text.TextVerdict.FINISHED:
                return self.vad.decide(check, None, verdict)
        audio = self.buffer.slice(max(start, check.sample - self.turns.max_samples), check.sample)
        return self.vad.decide(check, await self.turns.ask(audio), verdict)

    async def _deliver_final(self, utterance: Utterance, future: asyncio.Future) -> None:
        try:
            result = await self.decoding.result(utterance.id, future)
        except asyncio.CancelledError:
            if not (self._abandoned and future.cancelled()):
                raise
            return  # withdrawn by the lag budget after `end` (reported once, with the ids)
        finally:
            endpointed_at = self.decoding.delivered(utterance.id)
        if isinstance(result, ComponentFailure):  # reported; the session goes on
            await self._report(ErrorCode.INTERNAL_ERROR, f"transcription of utterance {utterance.id} failed: "
                               f"{result}", recoverable=True, utterance_id=utterance.id)
            await self._acknowledge(utterance)
            return
        segment = self.transcript.add(utterance, result)
        if segment is not None:
            self.decoding.previous_text = segment.text
            self.decoding.previous_language = segment.language or self.decoding.previous_language
            await self.out.send(msg.transcript_final(segment, self.config.word_timestamps))
            if endpointed_at is not None:
                self.services.metrics.final_latency.observe(time.monotonic() - endpointed_at)
        await self._acknowledge(utterance)

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


def _is_disconnect(exc: BaseException) -> bool:
    from websockets.exceptions import ConnectionClosed

    return isinstance(exc, (ConnectionClosed, ConnectionError, asyncio.CancelledError))

