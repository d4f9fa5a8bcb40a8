"""OpenAI Realtime transcription: the session configuration (connect query, ``session.update``).

Query parameters (at connect time; all optional):

- ``intent``: ``transcription`` (anything else is refused: there is no conversation model here).
  A beta client (``OpenAI-Beta: realtime=v1``) that leaves it out is a conversation-style client:
  it gets ``session.created``/``session.updated`` with a beta ``Session`` object (and still only
  input transcription); with it, ``transcription_session.created`` as OpenAI's beta sends.
- ``model``: an OpenAI model name (``gpt-4o-transcribe``, ``gpt-realtime``, ``whisper-1`` …) is
  accepted and ignored (the engine's default model is used); any other value is passed on as the
  native ``model`` (an engine variant such as ``fast``/``accurate``).
- extensions: ``input_audio_format`` (``pcm16`` (24 kHz), ``g711_ulaw``, ``g711_alaw`` (8 kHz), or
  ``audio/pcm``, ``audio/pcmu``, ``audio/pcma``), ``language``, ``engine``. The audio format must be
  chosen here: the native decoder is fixed when the session starts.
- ``deltas`` (an extension): ``live`` (default) sends a server-VAD item's transcript deltas while
  its speaker talks, from the partials' stable words, and its ``completed`` transcript always starts
  with them; ``final`` sends them only from the final, as OpenAI's own models do, and the
  ``completed`` transcript is the final exactly (see :mod:`host.compat.openai_realtime`).
- ``api_key`` is accepted (auth is the server's); other parameters are ignored.

``transcription_session.update`` and ``session.update`` take the beta fields
``input_audio_format``/``input_audio_transcription``/``turn_detection`` or the GA fields
``session.audio.input.{format,transcription,turn_detection}``; :meth:`SessionConfig.parse_update`
validates one whole (an error applies none of it) and the dialect applies the result.

- ``transcription.language`` → native ``{"type": "config", "language": ...}`` (null/"" → ``auto``).
- ``turn_detection`` → native endpointing (``config`` mid-session): ``semantic_vad`` with
  ``eagerness`` → ``endpointing=turn`` with that eagerness (the engine's turn detector);
  ``server_vad`` (OpenAI's default, so also at connect) → ``endpointing=silence`` with
  ``silence_ms`` = ``silence_duration_ms`` (default 500, held to 100-10000).
- ``transcription.prompt`` → native ``{"type": "config", "prompt": ...}`` (the decoder's prompt, for
  the utterances decoded after it; an engine that declares no changeable ``prompt`` refuses it).
- A language the session's variant does not serve (``de`` on ``fast``) moves it to one that does,
  unless the connect query named a native ``model``.
- Not applied (echoed back only): ``transcription.model``, the other VAD tuning
  (``threshold``, ``prefix_padding_ms``: the engine's endpointing options apply),
  ``noise_reduction``, ``include`` (no logprobs), all conversation fields.
- A format other than the connection's gets an ``error`` (it cannot change mid-session).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from host.protocol import ConfigError

FORMATS = {"pcm16": ("pcm_s16le", 24000, 48000), "g711_ulaw": ("mulaw", 8000, 8000),
           "g711_alaw": ("alaw", 8000, 8000)}
"""OpenAI format → (native encoding, sample rate, bytes per second)."""
GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
GA_NAMES = {v: k for k, v in GA_FORMATS.items()}
_OPENAI_MODEL = re.compile(r"^(gpt-|whisper-|chatgpt-|o\d)|realtime|transcribe", re.I)
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
EAGERNESS = ("low", "medium", "high", "auto")
MISSING: Any = object()
"""A field the event does not have (unlike one set to null)."""


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as ``item_…``."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class BadEvent(Exception):
    """A client event the dialect refuses; becomes an OpenAI ``error`` event."""

    def __init__(self, code: str | None, message: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.param, self.type = code, param, type_


@dataclass
class SessionUpdate:
    """A validated ``session.update``: each field is :data:`MISSING` where the update leaves it."""

    transcription: dict | None
    """The transcription object (None where absent or null)."""
    transcription_param: str
    language: Any
    """None for auto, a lower-case code, or MISSING."""
    turn_detection: Any
    """None for manual commits, an object, or MISSING."""
    include: Any
    noise_reduction: Any


class SessionConfig:
    """The OpenAI session's configuration: what ``session.created``/``updated`` describe."""

    def __init__(self) -> None:
        self.beta = False
        self.conversation = False  # a beta client that connected without intent=transcription
        self.live_deltas = True  # deltas from the partials' stable words (?deltas=live), else from finals
        self.format = "pcm16"
        self.session_id = new_id("sess")
        self.transcription: dict[str, Any] = {"model": "gpt-4o-transcribe", "language": None, "prompt": ""}
        self.turn_detection: dict[str, Any] | None = dict(DEFAULT_VAD)
        self.noise_reduction: Any = None
        self.include: Any = None

    def configure(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
        """OpenAI query parameters → native ``/session`` parameters."""
        self.beta = "realtime=v1" in (headers.get("OpenAI-Beta") or "").replace(" ", "")
        self.conversation = self.beta and "intent" not in query
        intent = query.get("intent", "transcription")
        if intent != "transcription":
            raise ConfigError("intent", f"only intent=transcription is supported here, got {intent!r}")
        fmt = query.get("input_audio_format", "pcm16")
        fmt = GA_FORMATS.get(fmt, fmt)
        if fmt not in FORMATS:
            raise ConfigError("input_audio_format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
        self.format = fmt
        deltas = query.get("deltas", "live")
        if deltas not in ("live", "final"):
            raise ConfigError("deltas", f"expected live or final, got {deltas!r}")
        self.live_deltas = deltas == "live"
        encoding, rate, _ = FORMATS[fmt]
        native = {"encoding": encoding, "sample_rate": str(rate), "channels": "1", "enable_vad": "true",
                  **{k: str(v) for k, v in native_endpointing(DEFAULT_VAD).items()}}
        model = query.get("model")
        if model:
            if _OPENAI_MODEL.search(model):
                if "transcribe" in model or model.startswith("whisper"):
                    self.transcription["model"] = model
            else:
                native["model"] = model
        for name in ("language", "engine", "api_key"):
            if name in query:
                native[name] = query[name]
        if query.get("language") not in (None, "", "auto"):
            self.transcription["language"] = query["language"]
        return native

    def parse_update(self, session: Any) -> SessionUpdate:
        """Validate a whole ``session`` object of an update; :class:`BadEvent` for the first problem."""
        if session is MISSING:
            raise BadEvent("missing_required_parameter", "Missing required parameter: 'session'.", "session")
        if not isinstance(session, dict):
            raise BadEvent("invalid_type", "Invalid type for 'session': expected an object.", "session")
        if session.get("type") not in (None, "transcription"):
            raise BadEvent("invalid_value", f"only transcription sessions are served here, got session.type "
                           f"{session.get('type')!r}", "session.type")
        audio_in = _object(_object(session.get("audio"), "session.audio").get("input"), "session.audio.input")
        self._check_format(session, audio_in)
        tr, tr_param, language = _transcription(session, audio_in)
        noise_reduction = session.get("input_audio_noise_reduction", MISSING)
        if "noise_reduction" in audio_in:
            noise_reduction = audio_in["noise_reduction"]
        return SessionUpdate(tr, tr_param, language, _turn_detection(session, audio_in),
                             session.get("include", MISSING), noise_reduction)

    def _check_format(self, session: dict, audio_in: dict) -> None:
        """The update's audio format, if any, must be the connection's (it cannot change)."""
        fmt, fmt_param = session.get("input_audio_format", MISSING), "session.input_audio_format"
        if "format" in audio_in:
            fmt, fmt_param = audio_in["format"], "session.audio.input.format"
            if isinstance(fmt, dict):
                if fmt.get("type") == "audio/pcm" and fmt.get("rate", 24000) != 24000:
                    raise BadEvent("invalid_value", "audio/pcm is 24000 Hz only", fmt_param + ".rate")
                fmt = fmt.get("type")
            if isinstance(fmt, str):
                fmt = GA_FORMATS.get(fmt, fmt)
        if fmt is MISSING:
            return
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise BadEvent("invalid_value", f"Invalid value: {fmt!r}. Supported values are: 'pcm16', "
                           "'g711_ulaw' and 'g711_alaw'.", fmt_param)
        if fmt != self.format:
            raise BadEvent("unsupported_format_change", f"the audio format cannot change during a session "
                           f"(this one takes {self.format}); reconnect with ?input_audio_format={fmt}",
                           fmt_param)

    def describe(self, beta: bool) -> dict[str, Any]:
        """The ``session`` object of ``session.created``/``updated``, in the beta or the GA shape."""
        transcription = dict(self.transcription)
        if beta:
            session = {"id": self.session_id, "object": "realtime.transcription_session", "modalities": ["text"],
                       "input_audio_format": self.format, "input_audio_transcription": transcription,
                       "turn_detection": self.turn_detection, "input_audio_noise_reduction": self.noise_reduction,
                       "include": self.include}
            if self.conversation:  # openai-python's beta Session: no client secret, no include
                return {k: v for k, v in session.items() if k != "include"} | {"object": "realtime.session"}
            # Required by openai-python's beta TranscriptionSession; this server issues no ephemeral
            # keys (clients authenticate with the server's own key), so the secret is empty.
            return {**session, "client_secret": {"value": "", "expires_at": 0}}
        fmt: dict[str, Any] = {"type": GA_NAMES[self.format]}
        if self.format == "pcm16":
            fmt["rate"] = 24000
        return {"type": "transcription", "id": self.session_id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": fmt, "transcription": transcription,
                                    "turn_detection": self.turn_detection, "noise_reduction": self.noise_reduction}},
                "include": self.include}


def _transcription(session: dict, audio_in: dict) -> tuple[dict | None, str, Any]:
    """The update's transcription object, its parameter path and its language (MISSING if unset)."""
    tr_param = "session.input_audio_transcription"
    tr = session.get("input_audio_transcription", MISSING)
    if "transcription" in audio_in:
        tr, tr_param = audio_in["transcription"], "session.audio.input.transcription"
    if tr is MISSING or tr is None:
        return None, tr_param, MISSING
    tr = _object(tr, tr_param)
    if "language" not in tr:
        return tr, tr_param, MISSING
    language = tr["language"]
    if language in (None, "", "auto"):
        return tr, tr_param, None
    if not isinstance(language, str) or not _LANGUAGE.match(language.lower()):
        raise BadEvent("invalid_value", f"Invalid value: {language!r}: expected an ISO-639-1 "
                       "language code such as 'en'.", tr_param + ".language")
    return tr, tr_param, language.lower()


def _turn_detection(session: dict, audio_in: dict) -> Any:
    """The update's turn detection: an object, None (manual commits) or MISSING."""
    td_param = "session.turn_detection"
    td = session.get("turn_detection", MISSING)
    if "turn_detection" in audio_in:
        td, td_param = audio_in["turn_detection"], "session.audio.input.turn_detection"
    if td is MISSING or td is None:
        return td
    td = _object(td, td_param)
    if td.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
        raise BadEvent("invalid_value", f"Invalid value: {td.get('type')!r}. Supported values are: "
                       "'server_vad' and 'semantic_vad'.", td_param + ".type")
    if td.get("eagerness", "auto") not in EAGERNESS:
        raise BadEvent("invalid_value", f"Invalid value: {td.get('eagerness')!r}. Supported values are: "
                       + ", ".join(repr(e) for e in EAGERNESS) + ".", td_param + ".eagerness")
    silence = td.get("silence_duration_ms", 500)
    if isinstance(silence, bool) or not isinstance(silence, (int, float)):
        raise BadEvent("invalid_type", f"Invalid type for '{td_param}.silence_duration_ms': expected an integer.",
                       td_param + ".silence_duration_ms")
    return td


def native_endpointing(td: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI ``turn_detection`` object → the native endpointing parameters it selects."""
    if td.get("type", "server_vad") == "semantic_vad":
        return {"endpointing": "turn", "eagerness": td.get("eagerness") or "auto"}
    return {"endpointing": "silence", "silence_ms": min(10000, max(100, round(td.get("silence_duration_ms", 500))))}


def _object(value: Any, param: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadEvent("invalid_type", f"Invalid type for '{param}': expected an object.", param)
    return value
