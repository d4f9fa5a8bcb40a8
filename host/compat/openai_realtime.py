"""OpenAI Realtime transcription (``/v1/realtime?intent=transcription``) on the native session.

Connect with the ``openai`` SDK (``client.realtime.connect(extra_query={"intent": "transcription"})``
or the beta ``client.beta.realtime.connect(...)``) pointed at this server. One connection is one
native session with VAD always on; this module translates the events both ways.

The connect query and ``session.update`` are translated in :mod:`host.compat.openai_session`.

Client events: ``transcription_session.update``/``session.update``, ``input_audio_buffer.append``,
``input_audio_buffer.commit``, ``input_audio_buffer.clear``; each type has one handler registered
with :func:`_on` in :data:`_CLIENT`, as each native server message type has in :data:`_SERVER`.
``turn_detection`` ``server_vad``/``semantic_vad`` → one item per native VAD utterance; ``null`` →
manual mode: the client commits; native VAD still cuts the audio and the finals since the last
commit are joined into the committed item (commit → native ``flush``).

Server events: ``session.created`` (GA) or ``transcription_session.created`` (with the
``OpenAI-Beta: realtime=v1`` header) from native ``session.begin``; ``session.updated`` /
``transcription_session.updated``; ``input_audio_buffer.speech_started``/``speech_stopped``
(server VAD only), ``input_audio_buffer.committed``, ``input_audio_buffer.cleared``,
``conversation.item.input_audio_transcription.delta`` (from the partials' ``stable`` words, the
prefix later partials keep, so a server-VAD item's deltas grow while its speaker talks, before the
commit; in manual mode they start at the commit, which names the item), ``…completed``, ``…failed``,
``error``. A delta cannot be taken back, so an item's deltas always add up to a prefix of its
``completed`` transcript: where the final revised words already sent (it hears the whole turn;
21 of 80 dev-set utterances), the transcript keeps the sent words and takes the final's words
after them (:func:`keep_sent`). That costs accuracy (WER 14.2 % → 16.6 % on the dev set, tiny.en),
so ``?deltas=final`` sends deltas from the finals only, as OpenAI's own models do, and the
transcript is the final exactly.
Not sent: ``conversation.item.created/added/done``, ``rate_limits.updated``, and anything of
responses (there is no model answering).
"""

from __future__ import annotations

import difflib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from host.compat import BadMessage, Native, audio_frames, decode_base64, parse_json_object
from host.compat.openai_session import DEFAULT_VAD, FORMATS, MISSING, BadEvent, SessionConfig, native_endpointing, new_id
from host.hookspecs import hookimpl
from host.partials import word_key
from host.protocol import CLIENT_ERRORS, ErrorCode

PATH = "/v1/realtime"

MIN_COMMIT_S = 0.1
"""OpenAI refuses to commit less than 100 ms of audio."""
CONVERSATION_EVENTS = {"conversation.item.create", "conversation.item.delete", "conversation.item.retrieve",
                       "conversation.item.truncate", "response.create", "response.cancel",
                       "output_audio_buffer.clear"}
_Reply = tuple[list[Native], list[dict[str, Any]]]
_CLIENT: dict[str, Callable[[OpenAIRealtimeDialect, dict], _Reply]] = {}
"""Client event type → its handler: (native messages, events to answer with at once)."""
_SERVER: dict[str, Callable[[OpenAIRealtimeDialect, dict], list[dict[str, Any]]]] = {}
"""Native server message type → its handler: the OpenAI events it becomes."""


def _on(table: dict[str, Any], *kinds: str) -> Callable[[Any], Any]:
    """Register the decorated method in ``table`` as the handler of these message types."""
    def register(handler: Any) -> Any:
        table.update(dict.fromkeys(kinds, handler))
        return handler
    return register


@dataclass
class _Item:
    """One OpenAI conversation item: a VAD turn, or what one manual commit covered."""

    id: str
    uid: int = -1  # native utterance id (server VAD items only)
    finals: list[str] = field(default_factory=list)
    sent: str = ""  # the text the deltas sent so far add up to
    live: str = ""  # manual mode: the stable text so far, sent at the commit
    seconds: float = 0.0  # audio the item covers (usage.seconds)
    start: float = 0.0  # session time of its speech_start (server VAD items)
    committed: bool = False
    done: bool = False

    @property
    def text(self) -> str:
        return " ".join(t for t in self.finals if t)


class OpenAIRealtimeDialect(SessionConfig):
    """OpenAI Realtime transcription events ⇄ the native protocol, for one connection.

    The session configuration (``configure``, ``session.update`` validation, the session object)
    is :class:`SessionConfig`'s; this class follows the audio buffer, the items and the events."""

    def __init__(self) -> None:
        super().__init__()
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

    # --- client → server ------------------------------------------------------------

    def incoming(self, raw: str | bytes) -> _Reply:
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
            handler = _CLIENT.get(kind)
            if handler is not None:
                return handler(self, event)
            if kind in CONVERSATION_EVENTS:
                raise BadEvent("invalid_value", f"{kind!r} is not supported in a transcription session", "type")
            raise BadEvent("invalid_value", f"Invalid value: {kind[:100]!r}. Supported values are: "
                           + ", ".join(repr(k) for k in CLIENT_EVENTS) + ".", "type")
        except BadEvent as exc:
            return [], [self._error(exc.type, exc.code, str(exc), exc.param, event_id)]

    @_on(_CLIENT, "transcription_session.update", "session.update")
    def _update(self, event: dict) -> _Reply:
        """Validate the whole update first (an error applies none of it), then apply it."""
        kind = event["type"]
        update = self.parse_update(event.get("session", MISSING))
        natives: list[Native] = []
        if update.transcription is not None:
            change: dict[str, Any] = {}
            prompt = update.transcription.get("prompt", MISSING)
            if isinstance(prompt, str) and prompt != self.transcription.get("prompt"):
                change["prompt"] = prompt  # the decoder's prompt (faster-whisper's initial_prompt)
            for key in ("model", "prompt"):
                if key in update.transcription:
                    self.transcription[key] = update.transcription[key]
            if update.language is not MISSING and update.language != self.transcription["language"]:
                self.transcription["language"] = update.language
                change["language"] = update.language or "auto"
            if change:
                natives.append({"type": "config", **change})
                self._cause = (kind, self._cause[1] if self._cause else None,
                               update.transcription_param + (".language" if "language" in change else ".prompt"))
        if update.turn_detection is not MISSING:
            self._switch(None if update.turn_detection is None else {**DEFAULT_VAD, **update.turn_detection})
            if self.turn_detection is not None:
                natives.append({"type": "config", **native_endpointing(self.turn_detection)})
        if update.include is not MISSING:
            self.include = update.include
        if update.noise_reduction is not MISSING:
            self.noise_reduction = update.noise_reduction
        updated = "transcription_session.updated" if kind == "transcription_session.update" else "session.updated"
        beta_shape = kind == "transcription_session.update" or self.beta
        return natives, [self._event(updated, session=self.describe(beta_shape))]

    @_on(_CLIENT, "input_audio_buffer.append")
    def _append(self, event: dict) -> _Reply:
        audio = event.get("audio", MISSING)
        if audio is MISSING:
            raise BadEvent("missing_required_parameter", "Missing required parameter: 'audio'.", "audio")
        if not isinstance(audio, str):
            raise BadEvent("invalid_type", "Invalid type for 'audio': expected a base64 string.", "audio")
        try:
            data = decode_base64(audio)
        except ValueError:
            raise BadEvent("invalid_value", "Invalid 'audio': not valid base64-encoded audio.", "audio") from None
        self._buffered += len(data)
        return [*audio_frames(data)], []

    @_on(_CLIENT, "input_audio_buffer.commit")
    def _commit(self, event: dict) -> _Reply:
        bps = FORMATS[self.format][2]
        if self.turn_detection is not None:
            # Server VAD: a manual commit ends the current speech turn now (its speech_end commits it).
            if self._open_uid is None:
                raise self._empty(self._buffered if self._buffered < bps * MIN_COMMIT_S else None)
            self._pending.append(("vad", self._open_uid))
            return [{"type": "flush"}], []
        if self._buffered < bps * MIN_COMMIT_S:
            raise self._empty(self._buffered)
        item = self._open or _Item(new_id("item"))
        item.seconds, item.committed = self._buffered / bps, True
        self._open, self._buffered, self._boundary = None, 0, self._started - 1
        self._pending.append(("commit", item))
        # The deltas held back until the commit named the item, then the stable text so far.
        return [{"type": "flush"}], [self._committed_event(item), *self._delta(item, item.live)]

    def _empty(self, buffered: int | None) -> BadEvent:
        if buffered is None:
            return BadEvent("input_audio_buffer_commit_empty", "Error committing input audio buffer: no speech "
                            "is in progress (server VAD commits each turn itself).")
        ms = buffered / FORMATS[self.format][2] * 1000
        return BadEvent("input_audio_buffer_commit_empty", "Error committing input audio buffer: buffer too "
                        f"small. Expected at least 100ms of audio, but buffer only has {ms:.2f}ms of audio.")

    @_on(_CLIENT, "input_audio_buffer.clear")
    def _clear(self, event: dict) -> _Reply:
        self._buffered = 0
        reply = [self._event("input_audio_buffer.cleared")]
        if self.turn_detection is not None:
            return [{"type": "clear"}], reply  # its speech_end (if any) is dropped in outgoing
        # Manual mode: drop the uncommitted item, including finals of utterances that already ended:
        # the flush marks where they stop (everything before its flush.done is theirs).
        self._open, self._boundary = None, self._started - 1
        self._pending.append(("clear", None))
        return [{"type": "clear"}, {"type": "flush"}], reply

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
        handler = _SERVER.get(str(message.get("type")))
        return handler(self, message) if handler is not None else []  # warning (processing_lag): none in OpenAI

    @_on(_SERVER, "session.begin")
    def _begin(self, message: dict) -> list[dict[str, Any]]:
        self.session_id = message.get("session_id") or self.session_id
        created = "transcription_session.created" if self.beta and not self.conversation else "session.created"
        return [self._event(created, session=self.describe(self.beta))]

    @_on(_SERVER, "session.end")
    def _end(self, message: dict) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _, item in [p for p in self._pending if p[0] == "commit"]:
            out += self._complete(item)
        self._pending.clear()
        return out + self._complete_empty(upto=None)

    @_on(_SERVER, "vad.speech_start")
    def _speech_start(self, message: dict) -> list[dict[str, Any]]:
        uid = self._started
        self._started += 1
        self._open_uid = uid
        if self.turn_detection is None:
            if self._cause and self._cause[0] in ("input_audio_buffer.commit", "input_audio_buffer.clear"):
                self._boundary = uid  # opened by the commit's flush itself: part of the committed item
            return []
        item = _Item(new_id("item"), uid=uid, start=float(message["timestamp"]))
        self._vad_items[uid] = item
        return [self._event("input_audio_buffer.speech_started", audio_start_ms=_ms(message["timestamp"]),
                            item_id=item.id)]

    @_on(_SERVER, "vad.speech_end")
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

    @_on(_SERVER, "transcript.partial")
    def _partial(self, message: dict) -> list[dict[str, Any]]:
        uid: Any = message.get("utterance_id")
        # Only the stable words: the rest of a partial may still change, and a delta cannot be taken back.
        text = (message.get("stable") or "") if self.live_deltas else ""
        item = self._vad_items.get(uid)
        if item is not None:
            return self._delta(item, text)
        if self.turn_detection is not None or not isinstance(uid, int) or uid <= self._boundary:
            return []
        if self._open is None:
            self._open = _Item(new_id("item"))
        return self._delta(self._open, " ".join(t for t in [*self._open.finals, text] if t))

    @_on(_SERVER, "transcript.final")
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
                self._open = _Item(new_id("item"))
            target = self._open
        else:
            return []
        target.finals.append(text)
        return self._delta(target, target.text)

    @_on(_SERVER, "flush.done")
    def _flush_done(self, message: dict) -> list[dict[str, Any]]:
        if not self._pending:
            return []
        kind, what = self._pending.popleft()
        if kind == "commit":
            return self._complete(what)
        if kind == "vad":
            return self._complete_empty(upto=what + 1)
        return []

    @_on(_SERVER, "error")
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
        """The text ``text`` adds to what was sent for ``item``; none when it revises sent text.
        A manual-mode item holds its text until its commit (``input_audio_buffer.committed``
        comes first: apps key items on it)."""
        if self.turn_detection is None and not item.committed:
            item.live = text
            return []
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
        transcript = keep_sent(item.sent, item.text)
        out = self._delta(item, transcript)
        item.done = True
        if item in self._committed:
            self._committed.remove(item)
        return out + [self._event("conversation.item.input_audio_transcription.completed", item_id=item.id,
                                  content_index=0, transcript=transcript,
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

    @staticmethod
    def _event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": new_id("event"), **fields}

    def _error(self, type_: str, code: str | None, message: str, param: str | None,
               event_id: str | None) -> dict[str, Any]:
        return self._event("error", error={"type": type_, "code": code, "message": message, "param": param,
                                           "event_id": event_id})


def keep_sent(sent: str, final: str) -> str:
    """``final``, or where it does not start with the text ``sent`` as deltas: ``sent`` followed by
    the words of ``final`` after the point that matches the end of ``sent`` (words aligned by
    :func:`host.partials.word_key`; an unmatched tail of ``sent`` stands for as many words)."""
    if final.startswith(sent):
        return final
    sent_words, final_words = sent.split(), final.split()
    matcher = difflib.SequenceMatcher(None, [word_key(w) for w in sent_words], [word_key(w) for w in final_words],
                                      autojunk=False)
    cut = len(sent_words)  # nothing matches: the sent words stand for as many of the final's
    for a, b, size in matcher.get_matching_blocks():
        if size:
            cut = b + size + len(sent_words) - (a + size)
    rest = final_words[cut:]
    return " ".join([sent, *rest]) if rest else sent


def _ms(seconds: Any) -> int:
    return round(float(seconds) * 1000)


CLIENT_EVENTS = tuple(_CLIENT)
"""The client event types served, in the order the error for an unknown type lists them."""


@hookimpl
def register_dialect(register):
    """A built-in plugin: registered through the same hook as a third party's dialect."""
    register("openai", OpenAIRealtimeDialect, path=PATH)
