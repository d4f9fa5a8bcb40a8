"""JSON sender: the server → client messages of the ``/session`` protocol.

Message shapes follow PROTOCOL.md; one function builds each. :class:`Sender`
writes them to the socket and never raises when the client has gone away, so
a disconnect never interrupts finalizing (and recording) a session.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from host.contracts import Segment, Word
from host.frontdoor import close_now

log = logging.getLogger(__name__)


def _words(words: list[Word]) -> list[dict[str, Any]]:
    return [{"word": w.word, "start": w.start, "end": w.end, "confidence": w.probability} for w in words]


def session_begin(session_id: str, engine: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"type": "session.begin", "session_id": session_id, "engine": engine, "config": config}


def speech_start(timestamp: float) -> dict[str, Any]:
    return {"type": "vad.speech_start", "timestamp": round(timestamp, 3)}


def speech_end(timestamp: float) -> dict[str, Any]:
    return {"type": "vad.speech_end", "timestamp": round(timestamp, 3)}


def transcript_partial(utterance_id: int, text: str, start: float, end: float) -> dict[str, Any]:
    return {"type": "transcript.partial", "utterance_id": utterance_id, "text": text,
            "start": round(start, 3), "end": round(end, 3)}


def transcript_final(segment: Segment, with_words: bool) -> dict[str, Any]:
    msg = {
        "type": "transcript.final",
        "segment_id": segment.id,
        "utterance_id": segment.utterance_id,
        "text": segment.text,
        "start": segment.start,
        "end": segment.end,
        "confidence": segment.confidence,
        "language": segment.language,
    }
    if with_words:
        msg["words"] = _words(segment.words)
    return msg


def flush_done() -> dict[str, Any]:
    return {"type": "flush.done"}


def error(code: str, message: str, recoverable: bool) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "recoverable": recoverable}


def warning(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "warning", "code": code, "message": message, **extra}


def session_end(
    session_id: str, total_duration: float, speech_duration: float, segments: list[Segment], with_words: bool,
    **extra: Any,
) -> dict[str, Any]:
    out_segments = []
    for s in segments:
        item = {"id": s.id, "start": s.start, "end": s.end, "text": s.text, "confidence": s.confidence}
        if with_words:
            item["words"] = _words(s.words)
        out_segments.append(item)
    return {
        "type": "session.end",
        "session_id": session_id,
        "total_duration": round(total_duration, 3),
        "total_speech_duration": round(speech_duration, 3),
        "transcript": " ".join(s.text for s in segments),
        "segments": out_segments,
        **extra,
    }


class Sender:
    """Writes JSON messages to one WebSocket; counts what it sent."""

    def __init__(self, ws):
        self.ws = ws
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
            try:
                await self.ws.send(json.dumps(message, ensure_ascii=False))
            except UnicodeEncodeError:  # lone surrogates echoed from client input: send them escaped
                await self.ws.send(json.dumps(message))
        except ConnectionClosed:
            self.gone = True
            return False
        kind = message["type"]
        self.sent[kind] = self.sent.get(kind, 0) + 1
        return True

    async def close(self, code: int, reason: str = "", linger: bool = True) -> None:
        """Close the connection; ``linger=False`` does not wait for the peer's close frame."""
        if linger:
            try:
                await self.ws.close(code, reason)
            except ConnectionClosed:
                pass
        else:
            await close_now(self.ws, code, reason)
        self.gone = True
