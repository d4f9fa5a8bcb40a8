"""One routed session: the router's relay between a client and the worker it was given.

It passes the frames both ways and remembers what the client got and what it sent since the last
final: the connect query (the router's), any ``config`` messages, and the audio since the end of the
utterance of the last final relayed (bounded: ``max_buffer_s``). When the worker is lost mid-session
(its connection drops, or it misses the router's pings), the session fails over: another worker is
opened on the same timeline (``time_offset``/``segment_offset``/``utterance_offset`` = where the last
final's utterance ended), the buffered audio is replayed to it at full speed, and relaying goes on; the
client gets a recoverable ``warning{code:"worker_lost"}``, never the new worker's ``session.begin``, and
one ``session.end`` whose segments are every final it got. Only when no worker takes the session does
the client get ``error{code:"worker_lost"}`` and a ``session.end`` built from the finals relayed.

A resumable session (its ``resume_token``) whose client connection is lost without a close frame has
its worker connection dropped the same way, so that the worker parks it for a resume through any
router; after a failover it is no longer resumable (the warning says ``"resumable": false``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from host import protocol as msg
from host.contracts import WorkerRecord
from host.frontdoor import close_now, lost_without_close
from host.keepalive import Keepalive
from host.protocol import ENCODINGS, ErrorCode

log = logging.getLogger(__name__)

WAITED_S = 0.05
"""A send to the worker that took longer than this waited for the worker to read (backpressure)."""

REPLAY_CHUNK_S = 0.5
"""The buffered audio goes to the new worker in frames of this many seconds."""

MAX_FAILOVERS = 3
"""Failovers in a row (with no final between them) before the session is given up as lost."""

Reopen = Callable[["RoutedSession"], Awaitable[tuple[ClientConnection, dict, WorkerRecord] | None]]
"""Opens the session on another worker with :meth:`RoutedSession.offsets` (the router's reservation);
the new connection (after its ``session.begin``), that message and the worker, or None when none takes it."""


class Refused(Exception):
    """The worker turned the session away before it began (full, starting, draining)."""


@dataclass(eq=False)
class RoutedSession:
    """Relays one session between a client and a worker, remembers what the client got, and moves
    the session to another worker when its worker is lost (``reopen``)."""

    client: ServerConnection
    upstream: ClientConnection
    worker: WorkerRecord
    begin: dict
    finals: list[dict] = field(default_factory=list)
    ended: bool = False
    bytes_in: int = 0
    stopping: bool = False
    ping_interval_s: float = 0.0
    """Keepalive pings to the client (0: none)."""
    reopen: Reopen | None = None
    """How to open the session on another worker; None: no failover (the old worker_lost path)."""
    max_buffer_s: float = 40.0
    """The most audio kept for a replay (the engine's ``max_utterance_s`` plus a margin)."""
    failovers: int = 0
    first: dict | None = None
    """The first message to the client instead of ``begin`` (a resume: the worker's ``session.resumed``)."""
    buffer_peak: int = 0
    """The most bytes the replay buffer held in this session."""
    _forwarding: bool = False  # a frame is on its way to the worker, which may not be reading (backpressure)
    _forwarded_at: float = float("-inf")
    _closed_by_us: bool = False  # we closed the worker's connection (the client left): not a loss
    _client_gone: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one writer to the worker; a failover excludes it
    _audio: bytearray = field(default_factory=bytearray)  # the client's audio since _dropped bytes
    _dropped: int = 0  # bytes of the client's audio before the buffer
    _speech_ends: list[float] = field(default_factory=list)  # vad.speech_end times (= utterance ends) since
    _configs: list[str] = field(default_factory=list)  # the client's config messages, in order
    _flushes: int = 0  # flushes sent and not yet answered with flush.done
    _end_sent: bool = False
    _speaking: bool = False  # the client's last vad event was speech_start
    _last_vad: float = float("-inf")
    _last_turn: float = float("-inf")
    _next_utterance: int = 0
    _seam_finals: int = 0  # finals relayed before the current worker took the session
    _last_seq: int = 0  # the seq of the last message relayed (native sessions number their messages)
    _seq_base: int = 0  # added to the current worker's seq after a failover, so the client's goes on
    _in_a_row: int = 0  # failovers since the last final
    _byte_base: int = 0  # the client's audio bytes before the current worker's first (audio.ack after a failover)

    def __post_init__(self) -> None:
        config = self.begin.get("config", {})
        self._frame = (config.get("channels") or 1) * ENCODINGS.get(config.get("encoding"), 2)
        self._rate = (config.get("sample_rate") or 16000) * self._frame  # bytes per second
        self._origin = float(config.get("time_offset") or 0.0)  # the session time of the client's first byte
        self._next_utterance = int(config.get("utterance_offset") or 0)
        self._max_bytes = int(self.max_buffer_s * self._rate) // self._frame * self._frame
        self._numbered = isinstance(self.begin.get("seq"), int)
        self._last_seq = self.begin.get("seq") or 0

    @property
    def resumable(self) -> bool:
        """Whether a lost client connection parks the session on its worker for a resume: a resumable
        session (its ``resume_token``) that has not failed over (the new worker's session has another token)."""
        return bool(self.begin.get("resume_token")) and not self.failovers

    def _numbered_message(self, message: dict[str, Any]) -> dict[str, Any]:
        """A message of the router's own, numbered after the last relayed (when the session numbers them)."""
        if self._numbered:
            self._last_seq += 1
            message = {**message, "seq": self._last_seq}
        return message

    # --- the replay buffer -------------------------------------------------------

    @property
    def buffer_start(self) -> float:
        """The session time of the first buffered byte: where a new worker's timeline starts."""
        return self._origin + self._dropped / self._rate

    @property
    def buffered_bytes(self) -> int:
        return len(self._audio)

    def offsets(self) -> dict[str, str]:
        """The query parameters that put a new worker's session where this one is (see docs/protocol.md)."""
        config = self.begin.get("config", {})
        segment = self.finals[-1]["segment_id"] + 1 if self.finals else int(config.get("segment_offset") or 0)
        return {"time_offset": f"{self.buffer_start:.6f}", "segment_offset": str(segment),
                "utterance_offset": str(self._next_utterance)}

    def _keep(self, message: str | bytes) -> None:
        """Remember what a replay needs of a client message."""
        if isinstance(message, bytes):
            self.bytes_in += len(message)
            self._audio += message
            over = len(self._audio) - self._max_bytes
            if over > 0:  # bounded: the oldest audio goes (a long stretch with no final, e.g. silence)
                self._drop(-(-over // self._frame) * self._frame)
            self.buffer_peak = max(self.buffer_peak, len(self._audio))
            return
        try:
            data = json.loads(message)
        except ValueError:
            return
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "config":
            self._configs.append(message)
        elif kind == "flush":
            self._flushes += 1
        elif kind == "end":
            self._end_sent = True

    def _drop(self, n: int) -> None:
        n = max(0, min(n, len(self._audio)))
        del self._audio[:n]
        self._dropped += n
        start = self.buffer_start
        self._speech_ends = [t for t in self._speech_ends if t >= start]

    def _final_relayed(self, final: dict) -> None:
        """The buffer keeps the audio after the utterance of ``final``: the utterance ends at the first
        ``vad.speech_end`` at or after the final's end (its speech_end is always sent before it)."""
        end = final.get("end")
        if end is None:
            return
        cut = next((t for t in self._speech_ends if t >= end - 0.0005), end)
        n = round((cut - self.buffer_start) * self._rate) // self._frame * self._frame
        self._drop(n)

    # --- relaying ------------------------------------------------------------------

    async def run(self) -> bool:
        """Relay until either side ends; True when the worker was lost mid-session and none took it."""
        try:
            await self.client.send(json.dumps(self.first or self.begin))
        except ConnectionClosed:
            return False  # the client left while we were finding it a worker
        upward = asyncio.create_task(self._client_to_worker())
        pinger = None
        if self.ping_interval_s > 0:
            pinger = asyncio.create_task(Keepalive(self.client, self.ping_interval_s, self._backlogged,
                                                   self._client_dead).run())
        try:
            lost = await self._worker_to_client()
        finally:
            if pinger is not None:
                pinger.cancel()
            if not upward.done():
                try:
                    await asyncio.wait_for(asyncio.shield(upward), timeout=5)
                except TimeoutError:
                    upward.cancel()
        return lost

    def _backlogged(self) -> bool:
        """Whether the worker has lately kept us waiting to forward (its session holds back reading):
        the client's pong may then wait behind frames we have not read."""
        return self._forwarding or time.monotonic() - self._forwarded_at < self.ping_interval_s

    async def _client_dead(self) -> None:
        await close_now(self.client, msg.CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

    async def end(self) -> None:
        """Router shutdown: ask the worker to finalize; its session.end reaches the client."""
        self.stopping = True
        self._end_sent = True
        try:
            await self.upstream.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass

    async def close_upstream(self) -> None:
        self._closed_by_us = True
        if self.upstream.state.name != "CLOSED":
            await self.upstream.close()

    async def _client_to_worker(self) -> None:
        try:
            async for message in self.client:
                if isinstance(message, dict):  # a dialect's native control message
                    message = json.dumps(message)
                async with self._lock:  # a failover replays what is kept here, then this goes on
                    self._keep(message)
                    self._forwarding, began = True, time.monotonic()
                    try:
                        await self.upstream.send(message)
                    except ConnectionClosed:
                        pass  # the worker is gone: _worker_to_client fails over, and the replay has this
                    finally:
                        self._forwarding = False
                        if time.monotonic() - began > WAITED_S:  # the worker's socket was full: it is not reading
                            self._forwarded_at = time.monotonic()
        except ConnectionClosed:
            pass  # the client vanished
        # The client is gone: closing the worker's side makes it finalize and record the session.
        self._client_gone = True
        async with self._lock:
            if self.resumable and not self._end_sent and not self.stopping and lost_without_close(self.client):
                # Lost, not left: the worker must see its connection lost too (no close frame), so that it
                # parks the session for a resume through any router (docs/protocol.md, "Resume").
                self._closed_by_us = True
                transport = getattr(self.upstream, "transport", None)
                if transport is not None:
                    transport.abort()
                    log.info("session %s: client connection lost; worker connection dropped so that it parks "
                             "the session", self.begin.get("session_id"))
            await self.close_upstream()

    async def _worker_to_client(self) -> bool:
        while True:
            try:
                async for message in self.upstream:
                    relayed: str | bytes | None = self._note(message) if isinstance(message, str) else message
                    if relayed is not None:
                        await self.client.send(relayed)
            except ConnectionClosed:
                pass
            if self.ended or self._closed_by_us or self._client_gone or self.client.state.name != "OPEN":
                code = msg.CloseCode.GOING_AWAY if self.stopping else (self.upstream.close_code or msg.CloseCode.NORMAL_CLOSURE)
                await self.client.close(code, self.upstream.close_reason or "")
                return False
            if not await self._fail_over():
                await self._report_lost()
                return True

    def _note(self, message: str) -> str | None:
        """Note what the client gets; the message to relay (None: not relayed)."""
        try:
            data = json.loads(message)
        except ValueError:
            return message
        if not isinstance(data, dict):
            return message
        kind = data.get("type")
        renumbered = False
        if isinstance(data.get("seq"), int):
            if self._seq_base:  # after a failover: the new worker counts from 1
                data["seq"] += self._seq_base
                renumbered = True
            self._last_seq = data["seq"]
        if isinstance(data.get("utterance_id"), int):
            self._next_utterance = max(self._next_utterance, data["utterance_id"] + 1)
        if kind in ("vad.speech_start", "vad.speech_end"):
            stamp = data.get("timestamp") or 0.0
            starts = kind == "vad.speech_start"
            if not starts:
                self._speech_ends.append(stamp)
            # After a failover the replay repeats events the client had: it keeps them alternating and in order.
            if self.failovers and (starts == self._speaking or stamp < self._last_vad):
                return None
            self._speaking, self._last_vad = starts, stamp
        elif kind == "turn.end":
            stamp = data.get("timestamp") or 0.0
            if self.failovers and stamp <= self._last_turn:
                return None
            self._last_turn = stamp
        elif kind == "transcript.final":
            self.finals.append(data)
            self._in_a_row = 0
            self._final_relayed(data)
        elif kind == "audio.ack" and self._byte_base and isinstance(data.get("bytes"), int):
            data["bytes"] += self._byte_base  # the new worker counts the client's bytes from its first
            renumbered = True
        elif kind == "flush.done":
            self._flushes = max(0, self._flushes - 1)
        elif kind == "session.end":
            self.ended = True
            if self.failovers:
                return json.dumps(self._merged_end(data), ensure_ascii=False)
        return json.dumps(data, ensure_ascii=False) if renumbered else message

    def _merged_end(self, end: dict) -> dict:
        """The last worker's ``session.end`` with the finals of the workers before it in front: its
        segments are every final the client got."""
        before = [segment_of(f) for f in self.finals[:self._seam_finals]]
        speech = speech_of(before)
        extra = {k: v for k, v in end.items() if k not in ("type", "session_id", "total_duration",
                                                           "total_speech_duration", "transcript", "segments",
                                                           "languages")}
        return msg.session_end_of(self.begin.get("session_id"), end.get("total_duration") or 0.0,
                                  speech + (end.get("total_speech_duration") or 0.0), before + end["segments"],
                                  **extra, failovers=self.failovers)

    # --- failover ------------------------------------------------------------------

    async def _fail_over(self) -> bool:
        """Move the session to another worker; False when none takes it (or too many failed in a row)."""
        if self.reopen is None or self._in_a_row >= MAX_FAILOVERS:
            return False
        lost = self.worker
        async with self._lock:
            if self._client_gone:
                return False
            self._in_a_row += 1
            began = time.monotonic()
            try:
                opened = await self.reopen(self)
            except Exception:  # a failure of ours: the old path
                log.exception("failover of session %s failed", self.begin.get("session_id"))
                opened = None
            if opened is None:
                return False
            resumable = self.resumable
            self.upstream, _begin, self.worker = opened
            self.failovers += 1
            self._byte_base = self._dropped
            self._seam_finals = len(self.finals)
            self._speech_ends = []
            log.info("session %s: worker %s lost; continued on %s at %.3f s (replaying %d bytes)",
                     self.begin.get("session_id"), lost.info.worker_id, self.worker.info.worker_id,
                     self.buffer_start, len(self._audio))
            try:
                await self.client.send(json.dumps(self._numbered_message(msg.warning(
                    ErrorCode.WORKER_LOST, f"worker {lost.info.worker_id} went away; the session goes on on "
                    f"{self.worker.info.worker_id} from {self.buffer_start:.3f} s, with nothing lost",
                    resumed_at=round(self.buffer_start, 3), **({"resumable": False} if resumable else {})))))
            except ConnectionClosed:
                pass  # the client left: the loop ends the session
            # The new worker's session.begin (seq 1) is not relayed: its next message follows this warning.
            self._seq_base = self._last_seq - 1
            try:
                for config in self._configs:
                    await self.upstream.send(config)
                chunk = max(self._frame, int(REPLAY_CHUNK_S * self._rate) // self._frame * self._frame)
                audio = bytes(self._audio)
                for i in range(0, len(audio), chunk):
                    await self.upstream.send(audio[i:i + chunk])
                for _ in range(self._flushes):
                    await self.upstream.send(json.dumps({"type": "flush"}))
                if self._end_sent:
                    await self.upstream.send(json.dumps({"type": "end"}))
            except ConnectionClosed:
                pass  # this one is gone too: the loop fails over again
            log.info("session %s: replayed to %s in %.2f s", self.begin.get("session_id"),
                     self.worker.info.worker_id, time.monotonic() - began)
        return True

    async def _report_lost(self) -> None:
        """The worker vanished before session.end and none took the session: tell the client and hand
        it what it already has."""
        duration = self._origin + self.bytes_in / self._rate
        segments = [segment_of(f) for f in self.finals]
        speech = speech_of(segments)
        try:
            await self.client.send(json.dumps(self._numbered_message(msg.error(
                ErrorCode.WORKER_LOST, f"worker {self.worker.info.worker_id} went away mid-session and no worker "
                "could take the session over; the finals sent so far are kept in session.end", recoverable=False))))
            await self.client.send(json.dumps(self._numbered_message(msg.session_end_of(
                self.begin.get("session_id"), duration, speech, segments, incomplete=True))))
            await self.client.close(*msg.WORKER_LOST)
        except ConnectionClosed:
            pass


def segment_of(final: dict[str, Any]) -> dict[str, Any]:
    """A relayed ``transcript.final`` as an entry of ``session.end.segments``."""
    return {"id": final.get("segment_id"), "start": final.get("start"), "end": final.get("end"),
            "text": final.get("text"), "confidence": final.get("confidence"), "language": final.get("language"),
            **({"words": final["words"]} if "words" in final else {})}


def speech_of(segments: list[dict[str, Any]]) -> float:
    """The seconds of speech ``segments`` span (those with both times)."""
    return sum(s["end"] - s["start"] for s in segments if s["end"] is not None and s["start"] is not None)
