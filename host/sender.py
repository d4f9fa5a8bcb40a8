"""JSON sender: writes the server → client messages (built in :mod:`host.protocol`) to a socket.

:class:`Sender` never raises when the client has gone away, so a disconnect never interrupts
finalizing (and recording) a session.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from host.frontdoor import close_now
from host.protocol import INVALID_CONFIG, Close, ConfigError, ErrorCode, error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeline:
    """Where a session's timeline starts (the ``time_offset``, ``segment_offset`` and ``utterance_offset``
    parameters): a session that continues another's (the router's failover) reports its times and ids
    shifted by these, so they go on from where the other left off."""

    time: float = 0.0
    segment: int = 0
    utterance: int = 0

    def __bool__(self) -> bool:
        return bool(self.time or self.segment or self.utterance)

    def shift(self, message: dict[str, Any]) -> dict[str, Any]:
        """``message`` (a server → client message) on this timeline: a shifted copy, or itself."""
        kind = message.get("type")
        if kind not in _TIMED:
            if kind == "error" and message.get("utterance_id") is not None:
                return {**message, "utterance_id": message["utterance_id"] + self.utterance}
            return message
        out = dict(message)
        for key in _TIMED[kind]:
            if out.get(key) is not None:
                out[key] = round(out[key] + self.time, 3)
        if out.get("utterance_id") is not None:
            out["utterance_id"] += self.utterance
        if kind == "transcript.final":
            out["segment_id"] += self.segment
            if "words" in out:
                out["words"] = [self._word(w) for w in out["words"]]
        elif kind == "session.end":
            out["segments"] = [self._segment(s) for s in out["segments"]]
        return out

    def _word(self, word: dict[str, Any]) -> dict[str, Any]:
        return {**word, "start": round(word["start"] + self.time, 3), "end": round(word["end"] + self.time, 3)}

    def _segment(self, segment: dict[str, Any]) -> dict[str, Any]:
        out = {**segment, "id": segment["id"] + self.segment, "start": round(segment["start"] + self.time, 3),
               "end": round(segment["end"] + self.time, 3)}
        if "words" in out:
            out["words"] = [self._word(w) for w in out["words"]]
        return out


_TIMED = {
    "vad.speech_start": ("timestamp",), "vad.speech_end": ("timestamp",), "turn.end": ("timestamp", "decided_at"),
    "transcript.partial": ("start", "end"), "transcript.final": ("start", "end"),
    "session.end": ("total_duration",),  # the session time where its audio ended; speech seconds stay its own
    "audio.ack": ("time",), "session.resumed": ("ack_time",),
}
"""The session times each message carries (besides ``words`` and ``segments``)."""


REPLAY_BYTES = 256 * 1024
"""The most bytes of sent messages (their JSON text) a resumable session keeps for a replay; the
oldest go first. Partials are never kept while no client is attached."""


class Sender:
    """Writes JSON messages to one WebSocket (on ``timeline``); counts what it sent.

    ``resumable``: every message carries ``seq``, 1, 2, 3…, and the messages are kept (their last
    :data:`REPLAY_BYTES`) so that :meth:`attach` can replay them to a new connection after the
    client's was lost; while none is attached they are only kept."""

    def __init__(self, ws, timeline: Timeline | None = None, resumable: bool = False):
        self.ws = ws
        self.timeline = timeline or Timeline()
        self.gone = False
        self.sent: dict[str, int] = {}
        self.seq = 0
        """The ``seq`` of the last message."""
        self.kept: deque[tuple[int, str]] | None = deque() if resumable else None
        self.kept_bytes = 0

    @property
    def oldest_kept(self) -> int:
        """The ``seq`` of the oldest message kept for a replay (``seq + 1`` when none is)."""
        return self.kept[0][0] if self.kept else self.seq + 1

    async def send(self, message: dict[str, Any]) -> bool:
        """Send ``message``; False (and nothing raised) when the client is gone (a resumable session
        keeps it for the next connection)."""
        if self.gone and (self.kept is None or message["type"] == "transcript.partial"):
            return False
        out = self.timeline.shift(message) if self.timeline else message
        text: str | None = None
        if self.kept is not None:
            self.seq += 1
            out = {**out, "seq": self.seq}
            text = _dumps(out)
            self.kept.append((self.seq, text))
            self.kept_bytes += len(text)
            while self.kept_bytes > REPLAY_BYTES and len(self.kept) > 1:
                self.kept_bytes -= len(self.kept.popleft()[1])
        if self.gone:
            return False
        if self.ws.state is not State.OPEN:
            # The client has closed (or we have). websockets would make this send wait up to the
            # close timeout for the TCP connection to end, which it cannot while the socket's reading
            # is paused behind the messages this session has yet to read: a 10 s stall that held the
            # slot. The session reads on and finalizes; nothing more is sent.
            self.gone = True
            return False
        try:
            if text is not None:
                await self.ws.send(text)
            else:
                await send_message(self.ws, out)
        except ConnectionClosed:
            self.gone = True
            return False
        kind = message["type"]
        self.sent[kind] = self.sent.get(kind, 0) + 1
        return True

    def can_replay(self, last_seq: int) -> bool:
        """Whether every message after ``last_seq`` is still kept."""
        return self.kept is not None and 0 <= last_seq <= self.seq and last_seq + 1 >= self.oldest_kept

    async def attach(self, ws, first: dict[str, Any], last_seq: int) -> bool:
        """Go on on ``ws``: send ``first`` (unnumbered), then every kept message after ``last_seq``,
        then the live ones. Messages sent meanwhile are kept and follow in order. False when ``ws``
        closed on the way."""
        assert self.kept is not None
        self.gone, self.ws = True, ws  # live messages are kept, not sent, until the replay caught up
        try:
            await ws.send(_dumps(self.timeline.shift(first) if self.timeline else first))
            done = last_seq
            while True:
                pending = [(seq, text) for seq, text in self.kept if seq > done]
                if not pending:
                    break
                for seq, text in pending:
                    await ws.send(text)
                    done = seq
        except ConnectionClosed:
            return False
        self.gone = False  # no await since the last check: nothing kept is left behind
        return True

    async def close(self, close: Close, linger: bool = True) -> None:
        """Close the connection; ``linger=False`` does not wait for the peer's close frame."""
        if linger:
            try:
                await self.ws.close(*close)
            except ConnectionClosed:
                pass
        else:
            await close_now(self.ws, *close)
        self.gone = True


def _dumps(message: dict[str, Any]) -> str:
    try:
        return json.dumps(message, ensure_ascii=False).encode().decode()
    except UnicodeEncodeError:  # lone surrogates echoed from client input: send them escaped
        return json.dumps(message)


async def send_message(ws: Any, message: dict[str, Any]) -> None:
    """Write one native message: a compatibility dialect's connection takes the dict (and translates
    it), a socket its JSON text."""
    native = getattr(ws, "send_message", None)
    if native is not None:
        await native(message)
        return
    await ws.send(_dumps(message))


async def refuse(conn: Any, code: ErrorCode, text: str, close: Close, param: str | None = None) -> None:
    """Turn a connection away (worker and router alike): a non-recoverable ``error``, then ``close`` at once."""
    try:
        await send_message(conn, error(code, text, recoverable=False, param=param))
    except ConnectionClosed:
        pass  # the close below finds the connection gone
    await close_now(conn, *close)


async def refuse_config(conn: Any, exc: ConfigError) -> None:
    """Turn a session away for a bad connect-time parameter: ``invalid_config`` naming it, close 1008."""
    await refuse(conn, ErrorCode.INVALID_CONFIG, str(exc), INVALID_CONFIG, exc.param)
