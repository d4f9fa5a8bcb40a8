"""The per-utterance ASR policy of one session: which decodes to ask the model for, and when.

:class:`UtteranceDecoder` decodes an utterance speculatively during its endpoint pause, submits
(or reuses) its final at the endpoint, withdraws guesses that speech made wrong, and asks for
partials of the open utterance at a steady cadence, one in flight at a time. It owns no socket:
finals come back as tickets that the session delivers in order; partials go out through ``send``.
Every job is an :class:`host.asr.AsrCall` carrying the session's options (contract v2). A
streaming model (``open_stream``) is fed each utterance's audio as it arrives instead, one piece
in flight at a time, and asked for the final at the endpoint: nothing is decoded twice, so there
is no speculation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from host import languages
from host import protocol as msg
from host.asr import AsrCall, ComponentFailure, StreamCall, StreamState, brief, session_options, streams
from host.audio import AudioBuffer
from host.contracts import SAMPLE_RATE, AsrModel, AsrResult, SessionOptions, TranscribeRequest, Utterance
from host.metrics import Metrics
from host.partials import LocalAgreement
from host.scheduler import FINAL, PARTIAL, SPECULATIVE, InferenceQueue, Ticket

log = logging.getLogger(__name__)

BULK_AHEAD_S = 2.0
"""Audio this far ahead of the session's wall-clock age marks an upload: its decodes are served after
every real-time session's (12 uploads at 100x made a real-time session's finals 5-9 s late)."""


class _Speculation(NamedTuple):
    """A speculative decode of the open utterance as if it ended at ``end``."""

    utterance_id: int
    end: int
    words: bool
    ticket: Ticket


class UtteranceDecoder:
    """Speculation, finals and partials of one session's utterances, as jobs of ``queue``.

    ``config`` is the session's public configuration (what ``session.begin`` echoes), handed to the
    model as its options; ``send`` writes a protocol message (a partial) to the client.
    """

    def __init__(self, model: AsrModel, queue: InferenceQueue, buffer: AudioBuffer, *, component: str,
                 config: dict[str, Any], session_id: str, recorded: bool, partial_interval_s: float,
                 metrics: Metrics, send: Callable[[dict[str, Any]], Awaitable[Any]]):
        self.model = model
        self.queue = queue
        self.buffer = buffer
        self.component = component
        self.config = dict(config)
        self.session_id = session_id
        self.previous_text = ""
        """The text of the session's most recent delivered final, for the model's options."""
        self.previous_language: str | None = None
        """The language of that final: an utterance keeps it unless another wins clearly (host.languages)."""
        self.word_timestamps = bool(self.config.get("word_timestamps"))
        self.interim_results = bool(self.config.get("interim_results"))
        self.recorded = recorded
        self.partial_interval_s = partial_interval_s
        self.metrics = metrics
        self.send = send
        self.opened = time.monotonic()  # the session's start, for telling uploads from live audio
        self.client_gone = False  # disconnected without `end`: its last finals are for the record only
        self.awaiting: dict[int, float] = {}  # utterance id -> monotonic time its endpoint fired
        self.pending: dict[int, Ticket] = {}  # utterance id -> its final's decode, until it settles
        self.settled = asyncio.Event()  # set whenever a final's decode settles
        self.held_back = False  # waiting for room in the final queue (backpressure): not idle
        self.released_at = float("-inf")  # when the last such wait ended
        self.stopped = False  # the session is finishing: no more partials
        self.speech_seconds = 0.0  # of every utterance finalized
        self.decoded = 0  # finals that came back, and the failure of each that did not
        self.failures: list[str] = []
        self._utterance: tuple[int, int] | None = None  # (id, start sample) of the open utterance
        self._next_utterance = 0
        self._previous_end = -1  # end sample of the last utterance
        self._speculative: _Speculation | None = None
        self._agreement = LocalAgreement()
        self._partial_language: str | None = None  # of the open utterance's last partial
        self._onset = 0  # where the VAD heard the open utterance's speech begin
        self._partial: tuple[int, Ticket] | None = None  # (utterance id, job): one partial in flight
        self._partial_from = 0  # buffer position the last partial request covered
        self._early: tuple[int, int, Ticket, float] | None = None  # (start, end, job, asked at): a first partial
        self._partial_tasks: set[asyncio.Task] = set()
        self._partial_failures: set[str] = set()  # logged once each
        self.streaming = streams(model)
        self._next_model: tuple[AsrModel, InferenceQueue] | None = None  # use_model's, from the next utterance
        self._stream: StreamState | None = None  # the open utterance's stream (streaming models)
        self._fed = 0  # buffer position fed to the stream so far
        self._feed: tuple[StreamCall, Ticket, int] | None = None  # the piece in flight, and where it starts

    # --- jobs -----------------------------------------------------------------

    def call(self, start: int, end: int, *, words: bool = False, partial: bool = False,
             sentence_end: bool = False) -> AsrCall:
        """The job that transcribes buffer samples ``start:end`` with the session's options
        (``sentence_end``: the model says how sure it is that the text ends a sentence)."""
        request = TranscribeRequest(self.buffer.slice(start, end), languages.forced(self.language), words, partial,
                                    self.options(), languages.candidates(self.language), sentence_end)
        return AsrCall(self.model, request, component=self.component)

    @property
    def language(self) -> str:
        """The session's ``language`` (``auto``, a code or candidates), as its config holds it now."""
        return self.config.get("language") or "auto"

    def options(self) -> SessionOptions:
        """The session's options as its next job sees them."""
        return session_options(self.config, previous_text=self.previous_text, session_id=self.session_id,
                               previous_language=self.previous_language)

    def _submit(self, call: AsrCall | StreamCall, kind: int, stale: Callable[[], bool] | None = None) -> Ticket:
        return self.queue.submit(call, kind, stale=stale, owner=self.session_id, bulk=self.bulk())

    def bulk(self) -> bool:
        """Whether the client sends audio faster than real time (an upload), or has gone: its
        decodes then use the capacity real-time sessions leave free."""
        return self.client_gone or self.buffer.end / SAMPLE_RATE - (time.monotonic() - self.opened) > BULK_AHEAD_S

    # --- utterances -------------------------------------------------------------

    @property
    def open_utterance(self) -> int | None:
        """The id of the utterance in progress, if any."""
        return self._utterance[0] if self._utterance is not None else None

    def use_model(self, model: AsrModel, queue: InferenceQueue) -> None:
        """Decode the utterances that open from now on with ``model`` (a mid-session ``config``);
        an utterance already open keeps the model it began with."""
        self._next_model = (model, queue)
        if self._utterance is None:
            self._switch_model()

    def _switch_model(self) -> None:
        if self._next_model is not None:
            (self.model, self.queue), self._next_model = self._next_model, None
            self.streaming = streams(self.model)

    def start(self, sample: int, onset: int | None = None) -> int:
        """Speech started at ``sample`` (heard from ``onset``): open the next utterance; its id."""
        self._switch_model()
        self._onset = sample if onset is None else onset
        uid = self._next_utterance
        self._utterance = (uid, sample)
        self._next_utterance += 1
        self._agreement = LocalAgreement()
        self._partial_language = None
        self._partial_from = sample
        early, self._early = self._early, None
        if early is not None and early[0] == sample:  # decoding since before the utterance opened
            _, end, ticket, asked_at = early
            self._partial, self._partial_from = (uid, ticket), end
            self._spawn(self._deliver_partial(uid, sample, end, ticket, asked_at))
        elif early is not None:
            early[2].cancel()
        if self.streaming:
            self._stream = StreamState(self.model, self.component, language=languages.forced(self.language),
                                       word_timestamps=self.wants_words(sample), options=self.options())
            self._fed = sample
        return uid

    def likely(self, sample: int, alive: Callable[[], bool]) -> None:
        """Speech probably starts at ``sample``: decode the utterance's first partial already, so that
        it does not wait for ``min_speech_s``; it is shown if the utterance opens there. ``alive``
        says whether that speech is still pending or open (a blip's decode is skipped as stale)."""
        if not self.interim_results or self.stopped or self.streaming or self._utterance is not None:
            return
        if self._early is not None:
            self._early[2].cancel()
        end = self.buffer.end
        ticket = self._submit(self.call(sample, end, partial=True), PARTIAL, stale=lambda: not alive())
        self._early = (sample, end, ticket, time.monotonic())

    def wants_words(self, start: int, cut: bool = False) -> bool:
        """Whether the final of an utterance starting at ``start`` needs word timings: the client
        asked for them, the session is recorded, or the utterance borders a cut that was not a
        pause (the assembler drops words repeated across such a cut by their times). Otherwise
        word alignment, a second decoder pass, is skipped: about a tenth of a final's compute."""
        return self.word_timestamps or self.recorded or cut or start <= self._previous_end

    def pause(self, end: int, sentence_end: bool = False) -> None:
        """Speech paused: decode the utterance as it would end now, so the final is ready at the endpoint
        (``sentence_end``: the turn policy reads the decode's text, :meth:`speculated`)."""
        if self._utterance is None or self.streaming:
            return
        uid, start = self._utterance
        self.drop_speculative()
        if self.queue.waiting(SPECULATIVE):
            return  # finals are queued: a guess that speech may resume would only delay them
        words = self.wants_words(start)
        ticket = self._submit(self.call(start, end, words=words, sentence_end=sentence_end), SPECULATIVE)
        self._speculative = _Speculation(uid, end, words, ticket)

    async def speculated(self, end: int, longest_s: float) -> AsrResult | None:
        """The speculative decode of the open utterance as it would end at ``end``, once it is back;
        None when there is none (decodes were queued), the session is an upload, it has not started
        and no thread is free for it (the caller's windows would wait with it: under load the text
        is not read), it failed or was withdrawn, or it took longer than ``longest_s``."""
        spec = self._speculative
        if spec is None or spec.end != end or spec.utterance_id != self.open_utterance or self.bulk():
            return None  # an upload is not waited for: its audio would wait with it, and nobody waits for its turns
        if not spec.ticket.started and (self.queue.busy >= self.queue.threads or self.queue.waiting(SPECULATIVE) > 1):
            return None  # no thread is free for it: under load the text is not read
        future = spec.ticket.future
        await asyncio.wait({future}, timeout=longest_s)  # never raises; the final may still use it
        if not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    def resume(self) -> None:
        """Speech resumed after a pause."""
        # Withdraw the guess now, not at the next pause: under load it would otherwise wait
        # in the queue and could still take a thread for audio that is no longer the end.
        self.drop_speculative()

    def drop_speculative(self) -> None:
        """Forget the speculative decode, withdrawing it if no thread has started it."""
        if self._speculative is not None:
            withdrawn = self._speculative.ticket.cancel()
            self.metrics.speculative.labels("withdrawn" if withdrawn else "wasted").inc()
            self._speculative = None

    def close(self) -> tuple[int, int] | None:
        """Speech ended: close the open utterance; its (id, start sample), or None if none was open."""
        if self._utterance is None:
            return None
        closed, self._utterance = self._utterance, None
        if self._partial is not None:
            self._partial[1].cancel()  # not started yet: its utterance is over
        return closed

    def discard(self, end: int) -> None:
        """The closed utterance ending at ``end`` is cleared, not transcribed."""
        self.drop_speculative()
        self._previous_end = end
        if self._stream is not None:  # dropped; its close() runs after the pieces it was fed
            state, self._stream = self._stream, None
            self._withdraw_feed(state)
            self._submit(state.job(self.buffer.slice(end, end), close=True), PARTIAL)

    def finalize(self, uid: int, start: int, end: int, cut: bool = False,
                 heard: int | None = None) -> tuple[Utterance, Ticket]:
        """The closed utterance ``start:end`` (speech last heard at ``heard``) and its final decode:
        the speculative one when it decoded exactly this, else a new FINAL job. ``cut``: it ended
        other than by a pause."""
        onset = min(max(self._onset, start), end)
        utterance = Utterance(uid, start / SAMPLE_RATE, end / SAMPLE_RATE, onset / SAMPLE_RATE,
                              None if heard is None else heard / SAMPLE_RATE)
        self.speech_seconds += utterance.end - utterance.start
        self.metrics.speech_seconds.inc(utterance.end - utterance.start)
        words = self.wants_words(start, cut)
        ticket = None
        spec, self._speculative = self._speculative, None
        if spec is not None:
            withdrawn = spec.ticket.cancel()  # a guess for other audio must not keep a decoder busy
            if (spec.utterance_id, spec.end, spec.words) == (uid, end, words) and not withdrawn:
                ticket = spec.ticket  # already decoding or decoded exactly this audio: reuse it
            outcome = "withdrawn" if withdrawn else "used" if ticket is not None else "wasted"
            self.metrics.speculative.labels(outcome).inc()
        if self._stream is not None:
            state, self._stream = self._stream, None
            self._withdraw_feed(state)
            # The pieces may already run past the end: where speech ends is known only after its silence.
            ticket = self._submit(state.job(self.buffer.slice(min(self._fed, end), end), finish=True), FINAL)
        elif ticket is None:
            ticket = self._submit(self.call(start, end, words=words), FINAL)
        self.awaiting[uid] = time.monotonic()
        self.pending[uid] = ticket
        ticket.future.add_done_callback(lambda _: self._final_settled(uid))
        self._previous_end = end
        return utterance, ticket

    def _final_settled(self, uid: int) -> None:
        self.pending.pop(uid, None)
        self.settled.set()

    async def result(self, uid: int, future: asyncio.Future) -> AsrResult | ComponentFailure:
        """The final of ``uid``: its result, or its failure (logged, counted, naming the component).
        A withdrawn decode raises ``CancelledError``."""
        try:
            result = await future
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one failed utterance must not end the session
            failure = exc if isinstance(exc, ComponentFailure) else ComponentFailure(self.component, brief(exc))
            self.failures.append(str(failure))
            log.error("session %s: transcription of utterance %d failed: %s", self.session_id, uid, failure)
            log.debug("session %s: utterance %d failed", self.session_id, uid, exc_info=exc)
            return failure
        self.decoded += 1
        return result

    def all_failed(self) -> str | None:
        """When at least one final was decoded for and every one failed: a line saying so, else None."""
        if not self.failures or self.decoded:
            return None
        n = len(self.failures)
        return f"asr failed on all {n} utterance{'s' if n != 1 else ''}: {self.failures[0]}"

    async def room_for_finals(self, limit: int, stop: Callable[[], bool]) -> bool:
        """Wait while ``limit`` finals are unsettled (until ``stop()``); whether it had to."""
        if len(self.pending) < limit:
            return False
        self.held_back = True
        try:
            while len(self.pending) >= limit and not stop():
                self.settled.clear()
                await self.settled.wait()
        finally:
            self.held_back = False
            self.released_at = time.monotonic()
        return True

    def delivered(self, uid: int) -> float | None:
        """The final of ``uid`` was delivered (or failed): when its endpoint fired, if still awaited."""
        return self.awaiting.pop(uid, None)

    def oldest_awaiting(self) -> tuple[int, float] | None:
        """The awaited final whose endpoint fired first: (utterance id, monotonic time)."""
        return min(self.awaiting.items(), key=lambda item: item[1]) if self.awaiting else None

    def withdraw_queued(self) -> list[int]:
        """Withdraw every final no thread has started; their utterance ids, sorted."""
        return sorted(uid for uid, ticket in self.pending.items() if ticket.cancel())

    # --- partials ---------------------------------------------------------------

    def request_partial(self) -> None:
        """Ask for a partial of the open utterance when enough new audio came since the last one."""
        if self.streaming:
            self._feed_stream()
            return
        if not self.interim_results or self._utterance is None or self.stopped:
            return
        uid, start = self._utterance
        if self._partial is not None and self._partial[0] == uid:
            return  # one in flight for this utterance; the next is asked for when it returns
        pos = self.buffer.end
        first = self._partial_from == start
        # Until a partial with text was sent, ask again sooner: the first one is the one users wait for.
        interval = self.partial_interval_s * (1.0 if self._agreement.shown else 0.2)
        if not first and pos - self._partial_from < interval * SAMPLE_RATE:
            return
        self._partial_from = pos
        ticket = self._submit(self.call(start, pos, partial=True), PARTIAL,
                              stale=lambda: self._utterance is None or self._utterance[0] != uid)
        self._partial = (uid, ticket)
        self._spawn(self._deliver_partial(uid, start, pos, ticket, time.monotonic()))

    def _spawn(self, step: Awaitable[None]) -> None:
        task = asyncio.ensure_future(step)
        self._partial_tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._partial_tasks.discard)

    async def _deliver_partial(self, uid: int, start: int, end: int, ticket: Ticket, asked_at: float) -> None:
        result = await self._partial_result(uid, ticket)
        if self._partial is not None and self._partial[1] is ticket:
            self._partial = None
        await self._show_partial(uid, start, end, result, asked_at)
        self.request_partial()

    async def _partial_result(self, uid: int, ticket: Ticket) -> AsrResult | None:
        """What a partial job (or a stream's piece) returned; None when it was skipped as stale,
        withdrawn (a piece withdrawn at the endpoint goes with the final) or failed (logged)."""
        try:
            return await ticket.future
        except asyncio.CancelledError:
            return None
        except Exception as exc:  # noqa: BLE001 - a failed partial is dropped; the final still comes (or reports it)
            self._partial_failed(uid, exc)
            return None

    async def _show_partial(self, uid: int, start: int, end: int, result: AsrResult | None, asked_at: float) -> None:
        """Send a partial of samples ``start:end``, only while its utterance is still open: a partial
        never follows its speech_end or final."""
        if result is None or not self.interim_results or self.open_utterance != uid:
            return
        if result.language != self._partial_language:  # words agreed in another language are not kept
            self._agreement, self._partial_language = LocalAgreement(), result.language
        text = self._agreement.update(result.text)
        if text:
            await self.send(msg.transcript_partial(uid, text, start / SAMPLE_RATE, end / SAMPLE_RATE,
                                                   self._agreement.stable_text))
            self.metrics.partial_latency.observe(time.monotonic() - asked_at)

    def _partial_failed(self, uid: int, exc: Exception) -> None:
        """Log a failed partial, once per session per distinct failure (they repeat every interval)."""
        text = str(exc) if isinstance(exc, ComponentFailure) else f"{self.component}: {brief(exc)}"
        if text in self._partial_failures:
            return
        self._partial_failures.add(text)
        log.warning("session %s: a partial of utterance %d failed (dropped; logged once): %s",
                    self.session_id, uid, text)

    # --- streaming models ---------------------------------------------------------

    def _feed_stream(self) -> None:
        """Feed the open utterance's new audio to its stream, one piece in flight at a time; pieces
        are at least ``chunk_s`` (the model's, else the partial interval) apart."""
        if self._stream is None or self._feed is not None or self.stopped or self._utterance is None:
            return
        pos = self.buffer.end
        chunk_s = getattr(self.model, "chunk_s", None) or self.partial_interval_s
        if pos - self._fed < chunk_s * SAMPLE_RATE:
            return
        uid, start = self._utterance
        call = self._stream.job(self.buffer.slice(self._fed, pos))
        # Never skipped as stale: a piece the stream does not get would be a hole in its audio.
        ticket = self._submit(call, PARTIAL)
        self._feed, self._fed = (call, ticket, self._fed), pos
        self._spawn(self._stream_partial(uid, start, pos, call, ticket, time.monotonic()))

    def _withdraw_feed(self, state: StreamState) -> None:
        """The utterance ended: withdraw the piece in flight unless a thread has begun it (its audio
        then goes with the final instead)."""
        if self._feed is None:
            return
        call, ticket, began = self._feed
        self._feed = None
        ticket.cancel()
        if state.skip(call):
            self._fed = began

    async def _stream_partial(self, uid: int, start: int, end: int, call: StreamCall, ticket: Ticket,
                              asked_at: float) -> None:
        result = await self._partial_result(uid, ticket)
        if self._feed is not None and self._feed[0] is call:
            self._feed = None
        await self._show_partial(uid, start, end, result, asked_at)
        self._feed_stream()
