"""OpenAI Realtime transcription (``/v1/realtime?intent=transcription``) on the native session.

Connect with the ``openai`` SDK (``client.realtime.connect(extra_query={"intent": "transcription"})``
or the beta ``client.beta.realtime.connect(...)``) pointed at this server. One connection is one
native session with VAD always on; this module translates the events both ways.

Query parameters (at connect time; all optional):

- ``intent``: ``transcription`` (anything else is refused: there is no conversation model here).
- ``model``: an OpenAI model name (``gpt-4o-transcribe``, ``gpt-realtime``, ``whisper-1`` …) is
  accepted and ignored (the engine's default model is used); any other value is passed on as the
  native ``model`` (an engine variant such as ``fast``/``accurate``).
- extensions: ``input_audio_format`` (``pcm16`` (24 kHz), ``g711_ulaw``, ``g711_alaw`` (8 kHz), or
  ``audio/pcm``, ``audio/pcmu``, ``audio/pcma``), ``language``, ``engine``. The audio format must be
  chosen here: the native decoder is fixed when the session starts.
- ``api_key`` is accepted (auth is the server's); other parameters are ignored.

Client events: ``transcription_session.update`` and ``session.update`` (beta fields
``input_audio_format``/``input_audio_transcription``/``turn_detection`` or GA fields
``session.audio.input.{format,transcription,turn_detection}``), ``input_audio_buffer.append``,
``input_audio_buffer.commit``, ``input_audio_buffer.clear``.

- ``transcription.language`` → native ``{"type": "config", "language": ...}`` (null/"" → ``auto``).
- ``turn_detection`` ``server_vad``/``semantic_vad`` → one item per native VAD utterance;
  ``null`` → manual mode: the client commits; native VAD still cuts the audio and the finals since
  the last commit are joined into the committed item (commit → native ``flush``).
- Not applied (echoed back only): ``transcription.model``/``prompt``, the VAD tuning
  (``threshold``, ``prefix_padding_ms``, ``silence_duration_ms``, ``eagerness`` …: the engine's
  endpointing options apply), ``noise_reduction``, ``include`` (no logprobs), all conversation fields.
- A format other than the connection's gets an ``error`` (it cannot change mid-session).

Server events: ``session.created`` (GA) or ``transcription_session.created`` (with the
``OpenAI-Beta: realtime=v1`` header) from native ``session.begin``; ``session.updated`` /
``transcription_session.updated``; ``input_audio_buffer.speech_started``/``speech_stopped``
(server VAD only), ``input_audio_buffer.committed``, ``input_audio_buffer.cleared``,
``conversation.item.input_audio_transcription.delta`` (from partials, so already before the commit:
the text appended to what was already sent for the item; a partial that revises sent text sends
nothing, and the ``completed`` transcript is authoritative), ``…completed``, ``…failed``, ``error``.
Not sent: ``conversation.item.created/added/done``, ``rate_limits.updated``, and anything of
responses (there is no model answering).
"""

from __future__ import annotations

import json
import re
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from host.compat import DIALECTS, BadMessage, audio_frames, decode_base64, parse_json_object
from host.protocol import CLIENT_ERRORS, ConfigError, ErrorCode

PATH = "/v1/realtime"

FORMATS = {"pcm16": ("pcm_s16le", 24000, 48000), "g711_ulaw": ("mulaw", 8000, 8000),
           "g711_alaw": ("alaw", 8000, 8000)}
"""OpenAI format → (native encoding, sample rate, bytes per second)."""
GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
GA_NAMES = {v: k for k, v in GA_FORMATS.items()}
_OPENAI_MODEL = re.compile(r"^(gpt-|whisper-|chatgpt-|o\d)|realtime|transcribe", re.I)
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
MIN_COMMIT_S = 0.1
"""OpenAI refuses to commit less than 100 ms of audio."""
CONVERSATION_EVENTS = {"conversation.item.create", "conversation.item.delete", "conversation.item.retrieve",
                       "conversation.item.truncate", "response.create", "response.cancel",
                       "output_audio_buffer.clear"}
CLIENT_EVENTS = ("transcription_session.update", "session.update", "input_audio_buffer.append",
                 "input_audio_buffer.commit", "input_audio_buffer.clear")
DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
_MISSING = object()


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class _Item:
    """One OpenAI conversation item: a VAD turn, or what one manual commit covered."""

    id: str
    uid: int = -1  # native utterance id (server VAD items only)
    finals: list[str] = field(default_factory=list)
    sent: str = ""  # the text the deltas sent so far add up to
    seconds: float = 0.0  # audio the item covers (usage.seconds)
    start: float = 0.0  # session time of its speech_start (server VAD items)
    committed: bool = False
    done: bool = False

    @property
    def text(self) -> str:
        return " ".join(t for t in self.finals if t)


class BadEvent(Exception):
    """A client event the dialect refuses; becomes an OpenAI ``error`` event."""

    def __init__(self, code: str | None, message: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.param, self.type = code, param, type_


class OpenAIRealtimeDialect:
    """OpenAI Realtime transcription events ⇄ the native protocol, for one connection."""

    def __init__(self) -> None:
        self.beta = False
        self.format = "pcm16"
        self.session_id = _id("sess")
        self.transcription: dict[str, Any] = {"model": "gpt-4o-transcribe", "language": None, "prompt": ""}
        self.turn_detection: dict[str, Any] | None = dict(DEFAULT_VAD)
        self.noise_reduction: Any = None
        self.include: Any = None
        self._cause: tuple[str, str | None, str | None] | None = None  # (event type, event_id, param)
        self._started = 0  # native utterances started (the next utterance id)
        self._open_uid: int | None = None  # the utterance between speech_start and speech_end
        self._vad_items: dict[int, _Item] = {}  # utterance id -> server-VAD item
        self._committed: list[_Item] = []  # server-VAD items committed, awaiting their transcript
        self._open: _Item | None = None  # manual mode: the item the next commit will cover
        self._pending: deque[tuple[str, Any]] = deque()  # what each native flush in flight is for
        self._boundary = -1  # manual mode: utterances up to this id belong to earlier commits
        self._buffered = 0  # bytes appended since the last commit or clear
        self._last_item: str | None = None  # previous_item_id of the next committed item

    # --- connect ------------------------------------------------------------------

    def configure(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
        """OpenAI query parameters → native ``/session`` parameters."""
        self.beta = "realtime=v1" in (headers.get("OpenAI-Beta") or "").replace(" ", "")
        intent = query.get("intent", "transcription")
        if intent != "transcription":
            raise ConfigError("intent", f"only intent=transcription is supported here, got {intent!r}")
        fmt = query.get("input_audio_format", "pcm16")
        fmt = GA_FORMATS.get(fmt, fmt)
        if fmt not in FORMATS:
            raise ConfigError("input_audio_format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
        self.format = fmt
        encoding, rate, _ = FORMATS[fmt]
        native = {"encoding": encoding, "sample_rate": str(rate), "channels": "1", "enable_vad": "true"}
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

    # --- client → server ------------------------------------------------------------

    def incoming(self, raw: str | bytes) -> tuple[list[str | bytes], list[dict[str, Any]]]:
        """One OpenAI client event → (native messages, events to answer with at once)."""
        self._cause = None
        event_id = None
        try:
            try:
                event = parse_json_object(raw, binary_hint="binary frames are not part of this API: send audio "
                                          "as input_audio_buffer.append events with base64 in 'audio'")
            except BadMessage as exc:
                message = str(exc) if exc.kind == "binary" else str(exc).replace("message", "event")
                raise BadEvent("invalid_type" if exc.kind == "not_object" else "invalid_json", message) from None
            if isinstance(event.get("event_id"), str):
                event_id = event["event_id"]
            kind = event.get("type")
            if kind is None:
                raise BadEvent("missing_required_parameter", "Missing required parameter: 'type'.", "type")
            if not isinstance(kind, str):
                raise BadEvent("invalid_type", "Invalid type for 'type': expected a string.", "type")
            self._cause = (kind, event_id, None)
            if kind == "input_audio_buffer.append":
                return self._append(event), []
            if kind == "input_audio_buffer.commit":
                return self._commit()
            if kind == "input_audio_buffer.clear":
                return self._clear()
            if kind in ("transcription_session.update", "session.update"):
                return self._update(kind, event.get("session", _MISSING))
            if kind in CONVERSATION_EVENTS:
                raise BadEvent("invalid_value", f"{kind!r} is not supported in a transcription session", "type")
            raise BadEvent("invalid_value", f"Invalid value: {kind[:100]!r}. Supported values are: "
                           + ", ".join(repr(k) for k in CLIENT_EVENTS) + ".", "type")
        except BadEvent as exc:
            return [], [self._error(exc.type, exc.code, str(exc), exc.param, event_id)]

    def _append(self, event: dict) -> list[str | bytes]:
        audio = event.get("audio", _MISSING)
        if audio is _MISSING:
            raise BadEvent("missing_required_parameter", "Missing required parameter: 'audio'.", "audio")
        if not isinstance(audio, str):
            raise BadEvent("invalid_type", "Invalid type for 'audio': expected a base64 string.", "audio")
        try:
            data = decode_base64(audio)
        except ValueError:
            raise BadEvent("invalid_value", "Invalid 'audio': not valid base64-encoded audio.", "audio") from None
        self._buffered += len(data)
        return [*audio_frames(data)]

    def _commit(self) -> tuple[list[str | bytes], list[dict[str, Any]]]:
        bps = FORMATS[self.format][2]
        if self.turn_detection is not None:
            # Server VAD: a manual commit ends the current speech turn now (its speech_end commits it).
            if self._open_uid is None:
                raise self._empty(self._buffered if self._buffered < bps * MIN_COMMIT_S else None)
            self._pending.append(("vad", self._open_uid))
            return ['{"type": "flush"}'], []
        if self._buffered < bps * MIN_COMMIT_S:
            raise self._empty(self._buffered)
        item = self._open or _Item(_id("item"))
        item.seconds, item.committed = self._buffered / bps, True
        self._open, self._buffered, self._boundary = None, 0, self._started - 1
        self._pending.append(("commit", item))
        return ['{"type": "flush"}'], [self._committed_event(item)]

    def _empty(self, buffered: int | None) -> BadEvent:
        if buffered is None:
            return BadEvent("input_audio_buffer_commit_empty", "Error committing input audio buffer: no speech "
                            "is in progress (server VAD commits each turn itself).")
        ms = buffered / FORMATS[self.format][2] * 1000
        return BadEvent("input_audio_buffer_commit_empty", "Error committing input audio buffer: buffer too "
                        f"small. Expected at least 100ms of audio, but buffer only has {ms:.2f}ms of audio.")

    def _clear(self) -> tuple[list[str | bytes], list[dict[str, Any]]]:
        self._buffered = 0
        reply = [self._event("input_audio_buffer.cleared")]
        if self.turn_detection is not None:
            return ['{"type": "clear"}'], reply  # its speech_end (if any) is dropped in outgoing
        # Manual mode: drop the uncommitted item, including finals of utterances that already ended:
        # the flush marks where they stop (everything before its flush.done is theirs).
        self._open, self._boundary = None, self._started - 1
        self._pending.append(("clear", None))
        return ['{"type": "clear"}', '{"type": "flush"}'], reply

    def _update(self, kind: str, session: Any) -> tuple[list[str | bytes], list[dict[str, Any]]]:
        """Validate the whole update first (an error applies none of it), then apply it."""
        if session is _MISSING:
            raise BadEvent("missing_required_parameter", "Missing required parameter: 'session'.", "session")
        if not isinstance(session, dict):
            raise BadEvent("invalid_type", "Invalid type for 'session': expected an object.", "session")
        if session.get("type") not in (None, "transcription"):
            raise BadEvent("invalid_value", f"only transcription sessions are served here, got session.type "
                           f"{session.get('type')!r}", "session.type")
        audio_in = _object(_object(session.get("audio"), "session.audio").get("input"), "session.audio.input")
        fmt, fmt_param = session.get("input_audio_format", _MISSING), "session.input_audio_format"
        if "format" in audio_in:
            fmt, fmt_param = audio_in["format"], "session.audio.input.format"
            if isinstance(fmt, dict):
                if fmt.get("type") == "audio/pcm" and fmt.get("rate", 24000) != 24000:
                    raise BadEvent("invalid_value", "audio/pcm is 24000 Hz only", fmt_param + ".rate")
                fmt = fmt.get("type")
            if isinstance(fmt, str):
                fmt = GA_FORMATS.get(fmt, fmt)
        if fmt is not _MISSING:
            if not isinstance(fmt, str) or fmt not in FORMATS:
                raise BadEvent("invalid_value", f"Invalid value: {fmt!r}. Supported values are: 'pcm16', "
                               "'g711_ulaw' and 'g711_alaw'.", fmt_param)
            if fmt != self.format:
                raise BadEvent("unsupported_format_change", f"the audio format cannot change during a session "
                               f"(this one takes {self.format}); reconnect with ?input_audio_format={fmt}",
                               fmt_param)
        tr_param = "session.input_audio_transcription"
        tr = session.get("input_audio_transcription", _MISSING)
        if "transcription" in audio_in:
            tr, tr_param = audio_in["transcription"], "session.audio.input.transcription"
        language = _MISSING
        if tr is not _MISSING and tr is not None:
            tr = _object(tr, tr_param)
            if "language" in tr:
                language = tr["language"]
                if language in (None, "", "auto"):
                    language = None
                elif not isinstance(language, str) or not _LANGUAGE.match(language.lower()):
                    raise BadEvent("invalid_value", f"Invalid value: {language!r}: expected an ISO-639-1 "
                                   "language code such as 'en'.", tr_param + ".language")
                else:
                    language = language.lower()
        td_param = "session.turn_detection"
        td = session.get("turn_detection", _MISSING)
        if "turn_detection" in audio_in:
            td, td_param = audio_in["turn_detection"], "session.audio.input.turn_detection"
        if td is not _MISSING and td is not None:
            td = _object(td, td_param)
            if td.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
                raise BadEvent("invalid_value", f"Invalid value: {td.get('type')!r}. Supported values are: "
                               "'server_vad' and 'semantic_vad'.", td_param + ".type")
        # Apply.
        natives: list[str | bytes] = []
        if isinstance(tr, dict):
            for key in ("model", "prompt"):
                if key in tr:
                    self.transcription[key] = tr[key]
            if language is not _MISSING and language != self.transcription["language"]:
                self.transcription["language"] = language
                natives.append(json.dumps({"type": "config", "language": language or "auto"}))
                self._cause = (kind, self._cause[1] if self._cause else None, tr_param + ".language")
        if td is not _MISSING:
            self._switch(None if td is None else {**DEFAULT_VAD, **td})
        if "include" in session:
            self.include = session["include"]
        if "input_audio_noise_reduction" in session:
            self.noise_reduction = session["input_audio_noise_reduction"]
        if "noise_reduction" in audio_in:
            self.noise_reduction = audio_in["noise_reduction"]
        updated = "transcription_session.updated" if kind == "transcription_session.update" else "session.updated"
        beta_shape = kind == "transcription_session.update" or self.beta
        return natives, [self._event(updated, session=self._session(beta_shape))]

    def _switch(self, turn_detection: dict | None) -> None:
        """Change the turn detection; it applies to utterances that start afterwards."""
        was_manual = self.turn_detection is None
        self.turn_detection = turn_detection
        if turn_detection is None and not was_manual:
            self._boundary = self._started - 1 if self._open_uid is None else self._open_uid
        elif turn_detection is not None and was_manual:
            self._open = None  # uncommitted manual-mode text is dropped

    # --- server → client --------------------------------------------------------------

    def outgoing(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """One native server message → OpenAI server events."""
        kind = message.get("type")
        if kind == "session.begin":
            self.session_id = message.get("session_id") or self.session_id
            created = "transcription_session.created" if self.beta else "session.created"
            return [self._event(created, session=self._session(self.beta))]
        if kind == "vad.speech_start":
            return self._speech_start(message)
        if kind == "vad.speech_end":
            return self._speech_end(message)
        if kind == "transcript.partial":
            return self._partial(message)
        if kind == "transcript.final":
            return self._final(message)
        if kind == "flush.done":
            return self._flush_done()
        if kind == "error":
            return self._native_error(message)
        if kind == "session.end":
            out: list[dict[str, Any]] = []
            for _, item in [p for p in self._pending if p[0] == "commit"]:
                out += self._complete(item)
            self._pending.clear()
            return out + self._complete_empty(upto=None)
        return []  # warning (processing_lag): OpenAI has no such event

    def _speech_start(self, message: dict) -> list[dict[str, Any]]:
        uid = self._started
        self._started += 1
        self._open_uid = uid
        if self.turn_detection is None:
            if self._cause and self._cause[0] in ("input_audio_buffer.commit", "input_audio_buffer.clear"):
                self._boundary = uid  # opened by the commit's flush itself: part of the committed item
            return []
        item = _Item(_id("item"), uid=uid, start=float(message["timestamp"]))
        self._vad_items[uid] = item
        return [self._event("input_audio_buffer.speech_started", audio_start_ms=_ms(message["timestamp"]),
                            item_id=item.id)]

    def _speech_end(self, message: dict) -> list[dict[str, Any]]:
        uid, self._open_uid = self._open_uid, None
        item = self._vad_items.get(uid) if uid is not None else None
        if item is None:
            return []
        cause = self._cause[0] if self._cause else None
        if cause == "input_audio_buffer.clear":
            self._vad_items.pop(item.uid, None)  # cleared: never committed, never transcribed
            return []
        item.committed = True
        self._buffered = 0
        self._committed.append(item)
        out = []
        if cause != "input_audio_buffer.commit":
            out.append(self._event("input_audio_buffer.speech_stopped", audio_end_ms=_ms(message["timestamp"]),
                                   item_id=item.id))
        item.seconds = max(0.0, float(message["timestamp"]) - item.start)
        return out + [self._committed_event(item)]

    def _partial(self, message: dict) -> list[dict[str, Any]]:
        uid: Any = message.get("utterance_id")
        text = message.get("text") or ""
        item = self._vad_items.get(uid)
        if item is not None:
            return self._delta(item, text)
        if self.turn_detection is not None or not isinstance(uid, int) or uid <= self._boundary:
            return []
        if self._open is None:
            self._open = _Item(_id("item"))
        return self._delta(self._open, " ".join(t for t in [*self._open.finals, text] if t))

    def _final(self, message: dict) -> list[dict[str, Any]]:
        uid: Any = message.get("utterance_id")
        text = message.get("text") or ""
        item = self._vad_items.pop(uid, None)
        if item is not None:
            out = self._complete_empty(upto=uid)
            item.finals.append(text)
            return out + self._complete(item)
        head = self._pending[0] if self._pending else None
        if head is not None and head[0] == "commit":
            target = head[1]
        elif head is not None and head[0] == "clear":
            return []
        elif self.turn_detection is None:
            if self._open is None:
                self._open = _Item(_id("item"))
            target = self._open
        else:
            return []
        target.finals.append(text)
        return self._delta(target, target.text)

    def _flush_done(self) -> list[dict[str, Any]]:
        if not self._pending:
            return []
        kind, what = self._pending.popleft()
        if kind == "commit":
            return self._complete(what)
        if kind == "vad":
            return self._complete_empty(upto=what + 1)
        return []

    def _native_error(self, message: dict) -> list[dict[str, Any]]:
        code, text = message.get("code"), message.get("message", "")
        uid = message.get("utterance_id")
        if code == ErrorCode.INTERNAL_ERROR and uid in self._vad_items:
            item = self._vad_items.pop(uid)
            item.done = True
            out = self._complete_empty(upto=uid)
            if item in self._committed:
                self._committed.remove(item)
            return out + [self._event("conversation.item.input_audio_transcription.failed", item_id=item.id,
                                      content_index=0, error={"type": "server_error", "code": code,
                                                              "message": text, "param": None})]
        client_side = code in CLIENT_ERRORS
        param, event_id = None, None
        if code in (ErrorCode.INVALID_CONFIG, ErrorCode.INVALID_AUDIO, ErrorCode.FRAME_TOO_LARGE) and self._cause is not None:
            event_id, param = self._cause[1], self._cause[2]
        if param is None:
            param = message.get("param")
        return [self._error("invalid_request_error" if client_side else "server_error", code, text, param, event_id)]

    # --- helpers ----------------------------------------------------------------------

    def _delta(self, item: _Item, text: str) -> list[dict[str, Any]]:
        """The text ``text`` adds to what was sent for ``item``; none when it revises sent text."""
        sent = item.sent
        if item.done or not text or len(text) <= len(sent) or not text.startswith(sent):
            return []
        if sent and sent[-1].isalnum() and text[len(sent)].isalnum():
            return []  # it would continue a word that was already sent as complete
        item.sent = text
        return [self._event("conversation.item.input_audio_transcription.delta", item_id=item.id,
                            content_index=0, delta=text[len(sent):])]

    def _complete(self, item: _Item) -> list[dict[str, Any]]:
        if item.done:
            return []
        out = self._delta(item, item.text)
        item.done = True
        if item in self._committed:
            self._committed.remove(item)
        return out + [self._event("conversation.item.input_audio_transcription.completed", item_id=item.id,
                                  content_index=0, transcript=item.text,
                                  usage={"type": "duration", "seconds": round(item.seconds, 3)})]

    def _complete_empty(self, upto: int | None) -> list[dict[str, Any]]:
        """Committed VAD items before utterance ``upto`` whose final never came: empty transcripts."""
        out: list[dict[str, Any]] = []
        for item in list(self._committed):
            if upto is None or item.uid < upto:
                self._vad_items.pop(item.uid, None)
                out += self._complete(item)
        return out

    def _committed_event(self, item: _Item) -> dict[str, Any]:
        previous, self._last_item = self._last_item, item.id
        return self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id)

    def _session(self, beta: bool) -> dict[str, Any]:
        transcription = dict(self.transcription)
        if beta:
            return {"id": self.session_id, "object": "realtime.transcription_session", "modalities": ["text"],
                    "input_audio_format": self.format, "input_audio_transcription": transcription,
                    "turn_detection": self.turn_detection, "input_audio_noise_reduction": self.noise_reduction,
                    "include": self.include}
        fmt: dict[str, Any] = {"type": GA_NAMES[self.format]}
        if self.format == "pcm16":
            fmt["rate"] = 24000
        return {"type": "transcription", "id": self.session_id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": fmt, "transcription": transcription,
                                    "turn_detection": self.turn_detection, "noise_reduction": self.noise_reduction}},
                "include": self.include}

    @staticmethod
    def _event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": _id("event"), **fields}

    def _error(self, type_: str, code: str | None, message: str, param: str | None,
               event_id: str | None) -> dict[str, Any]:
        return self._event("error", error={"type": type_, "code": code, "message": message, "param": param,
                                           "event_id": event_id})


def _object(value: Any, param: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadEvent("invalid_type", f"Invalid type for '{param}': expected an object.", param)
    return value


def _ms(seconds: Any) -> int:
    return round(float(seconds) * 1000)


DIALECTS[PATH] = OpenAIRealtimeDialect
