"""Dalston's realtime protocol on ``/v1/audio/transcriptions/stream``, for Dalston's Python SDK.

Dalston's SDK (``dalston_sdk.AsyncRealtimeSession`` / ``RealtimeSession``) speaks almost the native
protocol: binary audio, ``{"type": "flush"}`` and ``{"type": "end"}``, and the same message types
back. What differs (docs/compat-dalston.md has the whole list):

- query: it always sends ``store_audio=true&store_transcript=true`` (and leaves them out when
  false), a ``vocabulary`` JSON array, and ``pii_*`` options only when set;
- ``session.begin``: it reads ``model``, ``language``, ``sample_rate`` and ``encoding`` at the top level;
- ``transcript.final``: it reads ``words[].text`` (a missing one raises and loses the session);
- ``session.end``: ``total_duration`` (native) or ``total_audio_seconds`` (Dalston's worker);
- any other message type (``flush.done``, ``warning``) becomes an ``unknown_message`` error.

So this path is the native session with a flag rather than a vendor dialect: every native query
parameter, client message and server field stays as on ``/session``; Dalston's parameters are added,
Dalston's field names are added next to the native ones (words carry ``word`` and ``text``), and
the two messages the SDK cannot parse, ``flush.done`` and ``warning``, are left out (the SDK has no
equivalent; a ``processing_lag`` that ends the session still comes as an ``error``).

It is a :class:`host.compat.Dialect` that the worker applies to the alias path itself
(:data:`PATH`, in ``Worker.serve_session``) instead of a registered dialect plugin: a router
relays this path and its query to a worker untouched (as for ``/session``), so ``store_audio`` and
``store_transcript`` reach the worker that records; a registered dialect is translated on the
router, which hands the worker a native ``/session`` query with no place for them. The dialect
says what to keep in :attr:`DalstonDialect.keep`, which the worker gives the session's recorder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from host.compat import Native, keyterms, query_flag
from host.protocol import ConfigError
from host.recording import Keep

PATH = "/v1/audio/transcriptions/stream"

MAX_VOCABULARY_TERMS = 100
MAX_TERM_CHARS = 50
"""Dalston's own limits on ``vocabulary`` (its gateway refuses more)."""

UNSUPPORTED = ("pii_detection", "redact_pii_audio")
"""Dalston options this server cannot honour: ``true`` is refused rather than silently dropped."""
IGNORED = ("pii_entity_types", "pii_redaction_mode")
"""Details of the options above: accepted, and meaningless while those are false."""
DROPPED = ("flush.done", "warning")
"""Native messages the SDK would report as ``unknown_message`` errors."""


class DalstonDialect:
    """The native session with Dalston's parameters and field names, for one connection."""

    def __init__(self) -> None:
        self.keep = Keep()
        """What of the session's recording to keep (only matters on a worker that records)."""

    # --- connect ------------------------------------------------------------------

    def configure(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
        """Dalston's query → the native query: its own parameters taken out, the rest as they are."""
        native = {name: value for name, value in query.items()
                  if name not in ("store_audio", "store_transcript", "retention", "vocabulary", *UNSUPPORTED, *IGNORED)}
        self.keep = _keep(query)
        for name in UNSUPPORTED:
            if query_flag(query, name, False):
                raise ConfigError(name, "PII detection and redaction are not supported by this server")
        terms = _vocabulary(query.get("vocabulary"))
        if terms:
            if "keyterms" in query:
                raise ConfigError("vocabulary", "give either vocabulary or keyterms, not both")
            native["keyterms"] = keyterms(terms, "vocabulary")
        return native

    # --- client → server ----------------------------------------------------------

    def incoming(self, raw: str | bytes) -> tuple[list[Native], list[dict[str, Any]]]:
        """Audio and control messages are native already: the session answers them as on ``/session``."""
        return [raw], []

    # --- server → client ----------------------------------------------------------

    def outgoing(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """One native message with Dalston's fields added (or none, for the two it cannot parse)."""
        kind = message.get("type")
        if kind in DROPPED:
            return []
        if kind == "session.begin":
            return [_begin(message)]
        if kind == "transcript.final":
            return [_with_word_text(message)]
        if kind == "session.end":
            return [_end(message)]
        return [message]


def _keep(query: Mapping[str, str]) -> Keep:
    """``store_audio``/``store_transcript`` (absent: kept, as Dalston's worker); ``retention=0``: neither."""
    retention = _retention(query.get("retention"))
    stored = retention != 0
    return Keep(audio=stored and query_flag(query, "store_audio", True),
                transcript=stored and query_flag(query, "store_transcript", True))


def _retention(value: str | None) -> int | None:
    """Dalston's ``retention`` days: 0 (transient), -1 (permanent) or 1–3650; None when absent."""
    if value is None or value == "":
        return None
    try:
        days = int(value)
    except ValueError:
        raise ConfigError("retention", f"expected an integer number of days, got {value!r}") from None
    if days != -1 and not 0 <= days <= 3650:
        raise ConfigError("retention", f"expected 0, -1 or 1-3650 days, got {days}")
    return days


def _vocabulary(value: str | None) -> list[str]:
    """Dalston's ``vocabulary``: a JSON array of at most 100 strings of at most 50 characters."""
    if value is None or value == "":
        return []
    try:
        terms = json.loads(value)
    except ValueError:
        raise ConfigError("vocabulary", "expected a JSON array of strings") from None
    if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
        raise ConfigError("vocabulary", "expected a JSON array of strings")
    if len(terms) > MAX_VOCABULARY_TERMS:
        raise ConfigError("vocabulary", f"{len(terms)} terms; at most {MAX_VOCABULARY_TERMS}")
    if any(len(t) > MAX_TERM_CHARS for t in terms):
        raise ConfigError("vocabulary", f"a term longer than {MAX_TERM_CHARS} characters")
    return terms


def _begin(message: dict[str, Any]) -> dict[str, Any]:
    """The SDK reads the session's model, language and audio format at the top level."""
    config = message.get("config") or {}
    top = {name: config[name] for name in ("model", "language", "sample_rate", "encoding") if name in config}
    return {**message, **top}


def _words(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Native words with Dalston's ``text`` beside ``word``."""
    return [{**w, "text": w.get("word", "")} for w in words]


def _with_word_text(message: dict[str, Any]) -> dict[str, Any]:
    if "words" not in message:
        return message
    return {**message, "words": _words(message["words"])}


def _end(message: dict[str, Any]) -> dict[str, Any]:
    """Dalston's worker names the duration ``total_audio_seconds``; a part not stored has no URI."""
    out = {name: value for name, value in message.items()
           if not (name in ("audio_uri", "transcript_uri") and value is None)}
    out["total_audio_seconds"] = message.get("total_duration")
    out["segments"] = [_with_word_text(s) for s in message.get("segments") or []]
    return out


__all__ = ["PATH", "DalstonDialect"]
