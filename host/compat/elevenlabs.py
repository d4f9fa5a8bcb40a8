"""ElevenLabs realtime speech-to-text (``/v1/speech-to-text/realtime``) on the native session.

Connect with the ``elevenlabs`` SDK (``AsyncElevenLabs(base_url="http://HOST:PORT")`` then
``client.speech_to_text.realtime.connect({...})``) or any client of the documented wire format.
One connection is one native session; this module translates the messages both ways.

Query parameters (at connect time):

- ``audio_format``: ``pcm_8000``, ``pcm_16000`` (default), ``pcm_22050``, ``pcm_24000``,
  ``pcm_44100``, ``pcm_48000`` (16-bit little-endian mono) or ``ulaw_8000``.
- ``commit_strategy``: ``manual`` (default: the client commits; everything since the last commit
  becomes one committed transcript) or ``vad`` (each utterance the server's VAD ends is committed).
- ``model_id``: an ElevenLabs model (``scribe_v2_realtime``, ``scribe_v1`` …) is accepted and the
  engine's default model is used; any other value is passed on as the native ``model``.
- ``language_code``: ISO 639-1 or 639-3 (``en``/``eng``); absent → detected (``auto``).
- ``include_timestamps``: also send ``committed_transcript_with_timestamps`` (words and spacing).
- ``keyterms`` (repeated, as the SDK sends them) → native ``keyterms`` (500 characters in all), echoed
  in ``session_started``.
- ``engine``: an extension, the native engine id.
- VAD commits (``commit_strategy=vad``) end where the native endpointing ends an utterance: by the
  engine's turn detector (native ``endpointing=turn``), or, when the client sets
  ``vad_silence_threshold_secs`` (0.3–3), after exactly that much silence (``endpointing=silence``,
  ``silence_ms``). Validated and echoed in ``session_started`` but not applied (the engine's own
  endpointing options apply): ``vad_threshold`` (0.1–0.9), ``min_speech_duration_ms`` and
  ``min_silence_duration_ms`` (50–2000). Accepted and ignored:
  ``enable_logging``, ``include_language_detection``, ``no_verbatim``, the entity
  and edit options, ``token`` (an API key here, checked by the server like ``xi-api-key``).

Client messages: ``input_audio_chunk`` ``{audio_base_64, commit, sample_rate, previous_text}``.
``sample_rate``, when given, must be the rate of ``audio_format``; ``previous_text`` is accepted
with the first chunk only and not used. ``commit: true`` ends the segment after the chunk's audio.

Server messages: ``session_started``, ``partial_transcript`` (the text of the uncommitted segment,
updated as it grows), ``committed_transcript``, ``committed_transcript_with_timestamps``, the error
messages (``input_error``, ``invalid_request``, ``chunk_size_exceeded``, ``rate_limited``,
``insufficient_audio_activity``, ``session_time_limit_exceeded``, ``queue_overflow``,
``transcriber_error``, ``error``) as ``{"message_type": ..., "error": "..."}``, and ``warning``.
"""

from __future__ import annotations

import math
import re
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from host.compat import (
    BadMessage,
    Native,
    audio_frames,
    decode_base64,
    keyterms,
    parse_json_object,
    query_flag,
    query_values,
)
from host.hookspecs import hookimpl
from host.protocol import ConfigError

PATH = "/v1/speech-to-text/realtime"

FORMATS = {f"pcm_{rate}": ("pcm_s16le", rate) for rate in (8000, 16000, 22050, 24000, 44100, 48000)}
FORMATS["ulaw_8000"] = ("mulaw", 8000)
"""ElevenLabs audio_format → (native encoding, sample rate)."""
NUMBER_OPTIONS = {"vad_silence_threshold_secs": (0.3, 3.0, 1.5, float), "vad_threshold": (0.1, 0.9, 0.4, float),
                  "min_speech_duration_ms": (50, 2000, 100, int), "min_silence_duration_ms": (50, 2000, 100, int)}
"""Echoed VAD options: (minimum, maximum, default, type)."""
_ELEVENLABS_MODEL = re.compile(r"^(scribe|eleven)", re.I)
ISO_639_3 = {"eng": "en", "spa": "es", "fra": "fr", "deu": "de", "ita": "it", "por": "pt", "nld": "nl",
             "rus": "ru", "zho": "zh", "cmn": "zh", "jpn": "ja", "kor": "ko", "ara": "ar", "hin": "hi",
             "tur": "tr", "pol": "pl", "ukr": "uk", "swe": "sv", "dan": "da", "fin": "fi", "nor": "no",
             "ces": "cs", "ell": "el", "heb": "he", "hun": "hu", "ind": "id", "ron": "ro", "tha": "th",
             "vie": "vi", "cat": "ca", "msa": "ms"}
"""The ISO 639-3 codes ElevenLabs clients send for Whisper's common languages → ISO 639-1."""
ERRORS = {"invalid_json": "input_error", "unknown_message": "input_error", "invalid_audio": "input_error",
          "invalid_config": "invalid_request", "frame_too_large": "chunk_size_exceeded",
          "rate_limited": "rate_limited", "idle_timeout": "insufficient_audio_activity",
          "max_duration": "session_time_limit_exceeded", "processing_lag": "queue_overflow",
          "internal_error": "transcriber_error"}
"""Native error code → ElevenLabs error message_type (anything else is a plain ``error``)."""


@dataclass
class _Segment:
    """What one commit covers: the finals since the previous commit."""

    finals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(f["text"] for f in self.finals if f.get("text"))


class ElevenLabsDialect:
    """ElevenLabs realtime speech-to-text messages ⇄ the native protocol, for one connection."""

    def __init__(self) -> None:
        self.session_id = uuid.uuid4().hex
        self.config: dict[str, Any] = {}
        self.manual = True
        self.rate = 16000
        self.timestamps = False
        self._chunks = 0  # audio chunks received (previous_text is allowed with the first only)
        self._started = 0  # native utterances started (the next utterance id)
        self._boundary = -1  # manual mode: utterances up to this id belong to earlier commits
        self._segment = _Segment()  # manual mode: the uncommitted segment
        self._pending: deque[_Segment] = deque()  # manual mode: commits awaiting their flush.done

    # --- connect ------------------------------------------------------------------

    def configure(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
        """ElevenLabs query parameters → native ``/session`` parameters."""
        fmt = query.get("audio_format", "pcm_16000")
        if fmt not in FORMATS:
            raise ConfigError("audio_format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
        encoding, self.rate = FORMATS[fmt]
        strategy = query.get("commit_strategy", "manual")
        if strategy not in ("manual", "vad"):
            raise ConfigError("commit_strategy", f"expected 'manual' or 'vad', got {strategy!r}")
        self.manual = strategy == "manual"
        self.timestamps = query_flag(query, "include_timestamps", False)
        native = {"encoding": encoding, "sample_rate": str(self.rate), "channels": "1", "enable_vad": "true",
                  "word_timestamps": "true" if self.timestamps else "false"}
        model = query.get("model_id") or "scribe_v2_realtime"
        if not _ELEVENLABS_MODEL.search(model):
            native["model"] = model
        language = (query.get("language_code") or "").lower()
        if language:
            native["language"] = ISO_639_3.get(language, language)
        if "engine" in query:
            native["engine"] = query["engine"]
        terms = query_values(query, "keyterms")  # repeated, as the SDK sends them
        if terms:
            native["keyterms"] = keyterms(terms, "keyterms")
        self.config = {"sample_rate": self.rate, "audio_format": fmt, "language_code": language or None,
                       "commit_strategy": strategy, "model_id": model,
                       "include_timestamps": self.timestamps,
                       "include_language_detection": query_flag(query, "include_language_detection", False),
                       "enable_logging": query_flag(query, "enable_logging", True)}
        if terms:
            self.config["keyterms"] = terms
        for name, (low, high, default, kind) in NUMBER_OPTIONS.items():
            self.config[name] = _number(query, name, low, high, default, kind)
        if not self.manual and "vad_silence_threshold_secs" in query:
            # An explicit silence: the VAD commits after exactly that much, as ElevenLabs' does.
            native["endpointing"] = "silence"
            native["silence_ms"] = str(round(self.config["vad_silence_threshold_secs"] * 1000))
        return native

    # --- client → server ------------------------------------------------------------

    def incoming(self, raw: str | bytes) -> tuple[list[Native], list[dict[str, Any]]]:
        """One ElevenLabs client message → (native messages, messages to answer with at once)."""
        try:
            message = parse_json_object(raw, binary_hint="binary frames are not part of this API: send audio "
                                        "as input_audio_chunk messages with base64 in 'audio_base_64'")
            kind = message.get("message_type")
            if kind != "input_audio_chunk":
                raise BadMessage("unknown", f"unknown message_type {str(kind)[:100]!r}: the client sends "
                                 "'input_audio_chunk' messages only")
            return self._chunk(message), []
        except BadMessage as exc:
            return [], [_error("input_error", str(exc))]

    def _chunk(self, message: dict[str, Any]) -> list[Native]:
        audio = message.get("audio_base_64", "")
        if not isinstance(audio, str):
            raise BadMessage("invalid", "'audio_base_64' must be a base64 string")
        commit = message.get("commit", False)
        if not isinstance(commit, bool):
            raise BadMessage("invalid", "'commit' must be true or false")
        rate = message.get("sample_rate")
        if rate is not None and rate != self.rate:
            raise BadMessage("invalid", f"sample_rate {rate!r} does not match the session's audio_format "
                             f"{self.config['audio_format']} ({self.rate} Hz); reconnect with the right audio_format")
        previous = message.get("previous_text")
        if previous is not None and (not isinstance(previous, str) or self._chunks):
            raise BadMessage("invalid", "'previous_text' can only be sent, as a string, with the first audio chunk")
        try:
            data = decode_base64(audio)
        except ValueError:
            raise BadMessage("invalid", "'audio_base_64' is not valid base64") from None
        if data:
            self._chunks += 1
        natives: list[Native] = list(audio_frames(data))
        if commit:
            natives.append({"type": "flush"})
            if self.manual:
                # The open utterance is finalized by this flush: it belongs to this commit.
                self._pending.append(self._segment)
                self._segment, self._boundary = _Segment(), self._started - 1
        return natives

    # --- server → client --------------------------------------------------------------

    def outgoing(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """One native server message → ElevenLabs server messages."""
        kind = message.get("type")
        if kind == "session.begin":
            self.session_id = message.get("session_id") or self.session_id
            return [{"message_type": "session_started", "session_id": self.session_id, "config": self.config}]
        if kind == "vad.speech_start":
            self._started += 1
            return []
        if kind == "transcript.partial":
            return self._partial(message)
        if kind == "transcript.final":
            return self._final(message)
        if kind == "flush.done":
            return self._committed(self._pending.popleft()) if self._pending else []
        if kind == "error":
            code: Any = message.get("code")
            return [_error(ERRORS.get(code, "error"), message.get("message", ""))]
        if kind == "warning":
            return [{"message_type": "warning", "warning": message.get("message", "")}]
        return []  # vad.speech_end, session.end: ElevenLabs has no such messages

    def _partial(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        text = message.get("text") or ""
        if not self.manual:
            return [{"message_type": "partial_transcript", "text": text}]
        uid = message.get("utterance_id")
        if not isinstance(uid, int) or uid <= self._boundary:
            return []  # an utterance a commit already took
        return [{"message_type": "partial_transcript", "text": _join(self._segment.text, text)}]

    def _final(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.manual:
            return self._committed(_Segment([message]))
        # Finals before a commit's flush.done are that commit's (native finals come in order).
        target = self._pending[0] if self._pending else self._segment
        target.finals.append(message)
        if target is self._segment:
            return [{"message_type": "partial_transcript", "text": self._segment.text}]
        return []

    def _committed(self, segment: _Segment) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"message_type": "committed_transcript", "text": segment.text}]
        if self.timestamps:
            language = next((f.get("language") for f in segment.finals if f.get("language")), None)
            out.append({"message_type": "committed_transcript_with_timestamps", "text": segment.text,
                        "language_code": language or self.config.get("language_code"),
                        "words": _words(segment.finals)})
        return out


def _words(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Native words as ElevenLabs words: each word, and a ``spacing`` entry where the text has a space.

    Concatenating the entries' texts gives the committed text (finals are joined by one space).
    """
    out: list[dict[str, Any]] = []
    for final in finals:
        text, pos = final.get("text") or "", 0
        for word in final.get("words") or []:
            found = text.find(word["word"], pos)
            spaced = text[pos:found].isspace() if found > pos else found < 0
            if out and (spaced or pos == 0):  # the first word of a later final: the join's space
                out.append({"text": " ", "start": out[-1]["end"], "end": word["start"], "type": "spacing",
                            "logprob": 0.0})
            if found >= 0:
                pos = found + len(word["word"])
            confidence = max(float(word.get("confidence") or 0.0), 1e-6)
            out.append({"text": word["word"], "start": word["start"], "end": word["end"], "type": "word",
                        "logprob": round(math.log(confidence), 4)})
    return out


def _join(*texts: str) -> str:
    return " ".join(t for t in texts if t)


def _error(kind: str, text: str) -> dict[str, Any]:
    return {"message_type": kind, "error": text}


def _number(query: Mapping[str, str], name: str, low: float, high: float, default: float, kind: type) -> Any:
    value = query.get(name)
    if value is None or value == "":
        return default
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {value}")
    return number


@hookimpl
def register_dialect(register):
    """A built-in plugin: registered through the same hook as a third party's dialect."""
    register("elevenlabs", ElevenLabsDialect, path=PATH)
