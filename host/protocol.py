"""The wire: every message, error code and close of the native ``/session`` protocol, in one place.

``docs/protocol.md`` documents what each means; ``../shared/PROTOCOL.md`` is the contract. Server
messages are built by the functions here as plain dicts, which the :class:`host.sender.Sender`
serializes (or a compatibility dialect translates). Errors carry structured fields besides their
text (``utterance_id`` for a failed utterance, ``param`` for a bad parameter), so that nobody has
to parse a message back out of its wording.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any, NamedTuple

from host.contracts import Segment, Word

ENCODINGS = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
"""Audio encodings of binary frames, and the bytes of one sample in each."""


class CloseCode(IntEnum):
    """The WebSocket close codes the server uses (RFC 6455 §7.4.1)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class Close(NamedTuple):
    """A close code and its reason text."""

    code: CloseCode
    reason: str = ""


NORMAL = Close(CloseCode.NORMAL_CLOSURE)
SHUTTING_DOWN = Close(CloseCode.GOING_AWAY, "worker shutting down")
INVALID_PATH = Close(CloseCode.POLICY_VIOLATION, "Invalid path")
INVALID_CONFIG = Close(CloseCode.POLICY_VIOLATION, "Invalid config")
UNAUTHORIZED = Close(CloseCode.POLICY_VIOLATION, "Unauthorized")
IDLE_TIMEOUT = Close(CloseCode.POLICY_VIOLATION, "Idle timeout")
SESSION_TOO_LONG = Close(CloseCode.POLICY_VIOLATION, "Session too long")
INTERNAL = Close(CloseCode.INTERNAL_ERROR)
WORKER_LOST = Close(CloseCode.INTERNAL_ERROR, "Worker lost")
AT_CAPACITY = Close(CloseCode.TRY_AGAIN_LATER, "Server at capacity")
PROCESSING_LAG = Close(CloseCode.TRY_AGAIN_LATER, "Processing lag")
ROUTER_DRAINING = Close(CloseCode.TRY_AGAIN_LATER, "Router draining")
REGISTRY_UNAVAILABLE = Close(CloseCode.TRY_AGAIN_LATER, "Registry unavailable")
NO_WORKER = Close(CloseCode.TRY_AGAIN_LATER, "No worker available")
NO_WORKER_REGISTERED = Close(CloseCode.TRY_AGAIN_LATER, "No worker registered")
RESUME_REFUSED = Close(CloseCode.POLICY_VIOLATION, "Resume refused")


def not_ready(status: str) -> Close:
    """1013 ``Server starting`` / ``Server draining``."""
    return Close(CloseCode.TRY_AGAIN_LATER, f"Server {status}")


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` (and of a ``warning``) message."""

    INVALID_JSON = "invalid_json"
    UNKNOWN_MESSAGE = "unknown_message"
    INVALID_CONFIG = "invalid_config"
    INVALID_AUDIO = "invalid_audio"
    FRAME_TOO_LARGE = "frame_too_large"
    INTERNAL_ERROR = "internal_error"
    PROCESSING_LAG = "processing_lag"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_DURATION = "max_duration"
    RATE_LIMITED = "rate_limited"
    WORKER_LOST = "worker_lost"
    INVALID_RESUME = "invalid_resume"
    RESUME_EXPIRED = "resume_expired"
    RESUME_IN_USE = "resume_in_use"


CLIENT_ERRORS = frozenset({ErrorCode.INVALID_JSON, ErrorCode.UNKNOWN_MESSAGE, ErrorCode.INVALID_CONFIG,
                           ErrorCode.INVALID_AUDIO, ErrorCode.FRAME_TOO_LARGE, ErrorCode.RATE_LIMITED,
                           ErrorCode.IDLE_TIMEOUT, ErrorCode.MAX_DURATION})
"""Errors caused by what the client sent or did (the others are the server's)."""


class ConfigError(ValueError):
    """A bad session parameter; ``param`` names it (empty when no single parameter is to blame)."""

    def __init__(self, param: str, message: str):
        self.param = param
        self.reason = message
        super().__init__(f"{param}: {message}" if param else message)


# --- server -> client messages ----------------------------------------------------------------


def _words(words: list[Word]) -> list[dict[str, Any]]:
    return [{"word": w.word, "start": w.start, "end": w.end, "confidence": w.probability} for w in words]


def session_begin(session_id: str, engine: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"type": "session.begin", "session_id": session_id, "engine": engine, "config": config}


def speech_start(timestamp: float) -> dict[str, Any]:
    return {"type": "vad.speech_start", "timestamp": round(timestamp, 3)}


def speech_end(timestamp: float) -> dict[str, Any]:
    return {"type": "vad.speech_end", "timestamp": round(timestamp, 3)}


def turn_end(utterance_id: int, timestamp: float, reason: str, probability: float | None,
             text: str | None = None, decided_at: float | None = None) -> dict[str, Any]:
    """The end of a turn (``turn_events=true``): why the utterance ended (``turn``: the turn detector
    judged it complete; ``silence``, ``max_length``, ``flush``), the detector's last answer, how the
    speculative decode read (``finished``, ``unfinished``, ``unsure``; None: not read) and the session
    time at which the end was decided."""
    return {"type": "turn.end", "utterance_id": utterance_id, "timestamp": round(timestamp, 3), "reason": reason,
            "probability": None if probability is None else round(probability, 3), "text": text,
            "decided_at": round(timestamp if decided_at is None else decided_at, 3)}


def transcript_partial(utterance_id: int, text: str, start: float, end: float, stable: str = "") -> dict[str, Any]:
    """``stable``: the prefix of ``text`` that later partials and the final keep (host.partials)."""
    return {"type": "transcript.partial", "utterance_id": utterance_id, "text": text,
            "start": round(start, 3), "end": round(end, 3), "stable": stable}


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
        "language_probability": segment.language_probability,
    }
    if with_words:
        msg["words"] = _words(segment.words)
    return msg


def flush_done() -> dict[str, Any]:
    return {"type": "flush.done"}


def error(code: ErrorCode | str, message: str, recoverable: bool, *, utterance_id: int | None = None,
          param: str | None = None) -> dict[str, Any]:
    """An ``error``; ``utterance_id`` names a failed utterance, ``param`` a bad parameter."""
    out: dict[str, Any] = {"type": "error", "code": str(code), "message": message, "recoverable": recoverable}
    if utterance_id is not None:
        out["utterance_id"] = utterance_id
    if param:
        out["param"] = param
    return out


def audio_ack(time: float, audio_bytes: int) -> dict[str, Any]:
    """The client's audio before ``audio_bytes`` (session time ``time``) is final: every utterance
    before it has its final, and the server will never need it again (resumable sessions)."""
    return {"type": "audio.ack", "time": round(time, 3), "bytes": audio_bytes}


def session_resumed(session_id: str, last_seq: int, audio_bytes: int, ack: dict[str, Any] | None) -> dict[str, Any]:
    """The answer to a resume: messages after ``last_seq`` follow; the server holds the client's audio
    up to ``audio_bytes`` (send the rest from there); ``ack``: the latest ``audio.ack`` (or None)."""
    return {"type": "session.resumed", "session_id": session_id, "last_seq": last_seq, "audio_bytes": audio_bytes,
            "ack_time": ack["time"] if ack else 0.0, "ack_bytes": ack["bytes"] if ack else 0}


def warning(code: ErrorCode | str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "warning", "code": str(code), "message": message, **extra}


def segment(s: Segment, with_words: bool) -> dict[str, Any]:
    """One entry of ``session.end.segments``."""
    item: dict[str, Any] = {"id": s.id, "start": s.start, "end": s.end, "text": s.text, "confidence": s.confidence,
                            "language": s.language}
    if with_words:
        item["words"] = _words(s.words)
    return item


def session_end(
    session_id: str, total_duration: float, speech_duration: float, segments: list[Segment], with_words: bool,
    **extra: Any,
) -> dict[str, Any]:
    return session_end_of(session_id, total_duration, speech_duration, [segment(s, with_words) for s in segments],
                          **extra)


def languages_seen(segments: list[dict[str, Any]]) -> list[str]:
    """The languages of ``segments`` (wire form), most words first, for ``session.end.languages``."""
    words: dict[str, int] = {}
    for s in segments:
        if s.get("language"):
            words[s["language"]] = words.get(s["language"], 0) + len((s.get("text") or "").split())
    return sorted(words, key=lambda code: -words[code])


def session_end_of(session_id: str | None, total_duration: float, speech_duration: float,
                   segments: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """``session.end`` from segments already in their wire form (the router rebuilds one from the
    finals it relayed when a worker is lost)."""
    return {
        "type": "session.end",
        "session_id": session_id,
        "total_duration": round(total_duration, 3),
        "total_speech_duration": round(speech_duration, 3),
        "transcript": " ".join(s["text"] or "" for s in segments),
        "segments": segments,
        "languages": languages_seen(segments),
        **extra,
    }


# --- client -> server messages ----------------------------------------------------------------

MAX_JSON_DEPTH = 64
"""Control messages are flat; deeper JSON is refused before parsing, so the answer does not depend
on how much of Python's recursion limit the call stack has used."""


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit`` (a scan only when there are enough)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False
