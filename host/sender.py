"""JSON sender: writes the server → client messages (built in :mod:`host.protocol`) to a socket.

:class:`Sender` never raises when the client has gone away, so a disconnect never interrupts
finalizing (and recording) a session.
"""

from __future__ import annotations

import json
import logging
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
    "vad.speech_start": ("timestamp",), "vad.speech_end": ("timestamp",), "turn.end": ("timestamp",),
    "transcript.partial": ("start", "end"), "transcript.final": ("start", "end"),
    "session.end": ("total_duration",),  # the session time where its audio ended; speech seconds stay its own
}
"""The session times each message carries (besides ``words`` and ``segments``)."""


class Sender:
    """Writes JSON messages to one WebSocket (on ``timeline``); counts what it sent."""

    def __init__(self, ws, timeline: Timeline | None = None):
        self.ws = ws
        self.timeline = timeline or Timeline()
        self.gone = False
        self.sent: dict[str, int] = {}

    async def send(self, message: dict[str, Any]) -> bool:
        """Send ``message``; False (and nothing raised) when the client is gone."""
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
            await send_message(self.ws, self.timeline.shift(message) if self.timeline else message)
        except ConnectionClosed:
            self.gone = True
            return False
        kind = message["type"]
        self.sent[kind] = self.sent.get(kind, 0) + 1
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


async def send_message(ws: Any, message: dict[str, Any]) -> None:
    """Write one native message: a compatibility dialect's connection takes the dict (and translates
    it), a socket its JSON text."""
    native = getattr(ws, "send_message", None)
    if native is not None:
        await native(message)
        return
    try:
        await ws.send(json.dumps(message, ensure_ascii=False))
    except UnicodeEncodeError:  # lone surrogates echoed from client input: send them escaped
        await ws.send(json.dumps(message))


async def refuse_config(conn: Any, exc: ConfigError) -> None:
    """Turn a session away for a bad connect-time parameter: a non-recoverable ``invalid_config``
    naming it, then close 1008 (worker and router alike)."""
    try:
        await send_message(conn, error(ErrorCode.INVALID_CONFIG, str(exc), recoverable=False, param=exc.param))
    except ConnectionClosed:
        pass  # the close below finds the connection gone
    await close_now(conn, *INVALID_CONFIG)
