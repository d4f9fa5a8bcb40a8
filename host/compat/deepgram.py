"""Deepgram live streaming (``/v1/listen``) on the native session.

Connect with the ``deepgram-sdk`` (``AsyncDeepgramClient(environment=DeepgramClientEnvironment(
production="ws://HOST:PORT", ...))`` then ``client.listen.v1.connect(...)``) or any client of
Deepgram's documented wire format. One connection is one native session: binary frames are the
audio, JSON text frames the control messages; this module translates both ways.

Query parameters (at connect time):

- ``encoding``: ``linear16``, ``linear32`` (32-bit float), ``mulaw``, ``alaw`` with
  ``sample_rate`` (default 16000, or 8000 for the G.711 codecs) and ``channels`` (1 or 2, mixed
  down). Omitted: the audio must be a WAV stream; its header (in the first binary frames) gives
  the format, and the session starts once it has been read.
- ``model``: a Deepgram model (``nova-3``, ``nova-2-meeting``, ``enhanced``, ``base``,
  ``whisper-large`` …) uses the engine's default model; any other value is the native ``model``.
- ``language``: ``en``, ``en-US`` → ``en``; ``multi`` → detected per utterance (``auto``);
  ``detect_language=true`` without ``language`` → ``auto`` too. A language the engine's default
  variant does not serve selects a variant that does (native ``language`` without ``model``).
- ``interim_results`` (default false): ``Results`` with ``is_final: false`` from the partials.
- ``punctuate``/``smart_format`` (default false): punctuated, cased ``transcript`` and
  ``punctuated_word``; without them the transcript is lower-case words, as Deepgram's.
- ``endpointing``: a number of milliseconds → native ``endpointing=silence`` with that
  ``silence_ms`` (held to 100-10000: the VAD's windows are 32 ms, and Deepgram's 10 ms default
  would cut every breath); absent or ``true`` → native ``endpointing=turn`` (the engine's turn
  detector); ``false`` → ``speech_final`` is never true.
- ``utterance_end_ms``: an ``UtteranceEnd`` after each utterance's final.
- ``vad_events``: ``SpeechStarted`` when an utterance opens.
- ``keyterm`` (repeatable) and ``keywords`` (repeatable, ``word`` or ``word:boost``; the boost is not
  applied) → native ``keyterms`` (comma-separated; at most 500 characters in all).
- ``engine``: an extension, the native engine id. ``multichannel=true`` is refused; other
  parameters (``diarize``, ``numerals``, ``redact`` …) are accepted and ignored.

Bad connect parameters are refused before the upgrade, as Deepgram does: HTTP 400 with a
``dg-error`` header and ``{err_code, err_msg, request_id}`` (the front door asks :meth:`preflight`,
then the worker's or router's own check of the native query). Every handshake answer, the 101
included, carries ``dg-request-id``: the ``request_id`` of every message of the connection.

Client messages: binary audio (an empty frame closes the stream, as in Deepgram's older API),
``KeepAlive``, ``Finalize`` (→ native ``flush``), ``CloseStream`` (→ native ``end``), ``Configure``
(``features.punctuate``/``smart_format`` applied; ``keyterms`` → native ``config`` ``keyterms`` for the
utterances decoded after it).

Server messages: ``Results`` (interim ones with word times spread over the partial's span:
estimates), ``SpeechStarted``, ``UtteranceEnd``, ``Metadata`` (last, after ``CloseStream``),
``ConfigureSuccess``/``ConfigureFailure`` and ``Error`` (``{type, variant, description}``, and
``message``, the client's text, for a ``SchemaError``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import host
from host.compat import BadMessage, Native, keyterms, parse_json_object, query_flag, query_values
from host.hookspecs import hookimpl
from host.protocol import ConfigError

log = logging.getLogger(__name__)

PATH = "/v1/listen"

ENCODINGS = {"linear16": ("pcm_s16le", 16000), "linear32": ("pcm_f32le", 16000), "mulaw": ("mulaw", 8000),
             "alaw": ("alaw", 8000)}
"""Deepgram encoding → (native encoding, default sample rate)."""
UNSUPPORTED = ("flac", "opus", "ogg-opus", "speex", "amr-nb", "amr-wb", "g729")
WAV_FORMATS = {(1, 16): "pcm_s16le", (3, 32): "pcm_f32le", (6, 8): "alaw", (7, 8): "mulaw"}
"""WAV (format tag, bits per sample) → native encoding."""
_BOOST = re.compile(r":-?\d+(\.\d+)?$")
"""The ``:boost`` Deepgram's ``keywords`` may end with (``Kowloon:2``); the boost itself is not applied."""
_DEEPGRAM_MODEL = re.compile(r"^(nova|enhanced|base|whisper|flux|general|phonecall|meeting|conversationalai)", re.I)
_PUNCTUATION = re.compile(r"[^\w'\-]+")
MAX_HEADER = 64 * 1024
"""A WAV header (everything before the ``data`` chunk) larger than this is refused."""
SCHEMA_ERROR = "SchemaError"
"""Deepgram's ``Error`` variant for a client text message it cannot read."""
MAX_ECHO = 4096
"""A ``SchemaError`` echoes the client's message in ``message``, cut to this many characters."""
HTTP_ERRORS = {400: "INVALID_QUERY_PARAMETER", 401: "INVALID_AUTH"}
"""Deepgram's ``err_code`` of a refused handshake, by HTTP status."""
INTERIM_CONFIDENCE = 0.9
"""The confidence interim results estimate before the connection's first final (see :meth:`DeepgramDialect._typical`)."""


class DeepgramDialect:
    """Deepgram live-streaming messages ⇄ the native protocol, for one connection."""

    def __init__(self) -> None:
        self.request_id = str(uuid.uuid4())
        self.model_info = {"name": "general", "version": host.__version__, "arch": "whisper-streaming"}
        self.model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, "engine-host/whisper-streaming"))
        self.channels = 1
        self.punctuate = False
        self.speech_final = True
        self.utterance_end = False
        self.vad_events = False
        self._skip = 0  # WAV header bytes still to drop from the audio stream
        self._audio = hashlib.sha256()
        self._span: dict[int, list[float]] = {}  # utterance id -> [speech start, speech end]
        self._started = 0
        self._last_end = 0.0  # session time of the last speech end or final seen
        self._finalizing = 0  # Finalize messages whose flush.done has not come back
        self._finalized = False  # a from_finalize Results went out for the oldest Finalize
        self._closed = False
        self._confidences: list[float] = []  # of the finals so far: what interim results estimate

    # --- before the upgrade (host.compat.PreUpgradeDialect) ----------------------------

    def preflight(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
        """The native parameters the connect query decides (without ``encoding`` all but the audio
        format, which the WAV header gives later); :class:`ConfigError` for a bad one."""
        native = self.configure(query, headers)
        return dict(self._native) if native is None else native

    def handshake_headers(self) -> dict[str, str]:
        return {"dg-request-id": self.request_id}

    def http_error(self, status: int, text: str) -> tuple[dict[str, str], dict[str, Any]]:
        """Deepgram's refusal: the error text in ``dg-error`` and in the body's ``err_msg``."""
        if status == 401:
            text = "Invalid credentials."  # Deepgram's words; the key is not echoed
        body = {"err_code": HTTP_ERRORS.get(status, "Bad Request"), "err_msg": text, "request_id": self.request_id}
        return {"dg-error": _header_text(text)}, body

    # --- connect ------------------------------------------------------------------

    def configure(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str] | None:
        """Deepgram query parameters → native ``/session`` parameters (``None``: WAV, read its header)."""
        if query_flag(query, "multichannel", False):
            raise ConfigError("multichannel", "separate transcripts per channel are not supported here; "
                              "stereo audio is mixed down (leave multichannel out)")
        self.punctuate = query_flag(query, "punctuate", False) or query_flag(query, "smart_format", False)
        interim = query_flag(query, "interim_results", False)
        self.vad_events = query_flag(query, "vad_events", False)
        endpointing = query.get("endpointing", "")
        if endpointing.lower() == "false":
            self.speech_final = False
        elif endpointing and endpointing.lower() != "true" and not endpointing.isdigit():
            raise ConfigError("endpointing", f"expected false or a number of milliseconds, got {endpointing!r}")
        utterance_end = query.get("utterance_end_ms", "")
        if utterance_end and not utterance_end.isdigit():
            raise ConfigError("utterance_end_ms", f"expected a number of milliseconds, got {utterance_end!r}")
        self.utterance_end = bool(utterance_end)
        self._native = {"enable_vad": "true", "word_timestamps": "true",
                        "interim_results": "true" if interim else "false"}
        if endpointing.isdigit():  # Deepgram's "this much silence ends an utterance"
            self._native.update(endpointing="silence", silence_ms=str(min(10000, max(100, int(endpointing)))))
        model = query.get("model") or "nova-3"
        if not _DEEPGRAM_MODEL.search(model):
            self._native["model"] = model
            self.model_info["name"] = model
        language = query.get("language", "")
        if language:
            self._native["language"] = "auto" if language == "multi" else language.split("-")[0].lower()
        elif query_flag(query, "detect_language", False):
            self._native["language"] = "auto"
        # keyterm (nova-3) and keywords (word or word:boost, older models) both name words to favour
        terms = query_values(query, "keyterm") + [_BOOST.sub("", k) for k in query_values(query, "keywords")]
        if terms:
            self._native["keyterms"] = keyterms(terms, "keyterm")
        if "engine" in query:
            self._native["engine"] = query["engine"]
            self.model_info["arch"] = query["engine"]
        self.model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"engine-host/{self.model_info['arch']}/"
                                                             f"{self.model_info['name']}"))
        encoding = query.get("encoding")
        if encoding is None:
            return None  # containerized audio: the WAV header decides (configure_early)
        if encoding in UNSUPPORTED:
            raise ConfigError("encoding", f"{encoding} is not supported here: send linear16, linear32, mulaw or "
                              "alaw, or a WAV stream without encoding")
        if encoding not in ENCODINGS:
            raise ConfigError("encoding", f"expected one of {', '.join(ENCODINGS)}, got {encoding!r}")
        native_encoding, default_rate = ENCODINGS[encoding]
        channels = query.get("channels", "1")
        self.channels = int(channels) if channels.isdigit() else 1
        return {**self._native, "encoding": native_encoding,
                "sample_rate": query.get("sample_rate", str(default_rate)), "channels": channels}

    def configure_early(self, messages: list[str | bytes]) -> dict[str, str] | None:
        """No ``encoding``: the native parameters from the WAV header in the first binary frames."""
        audio = b"".join(m for m in messages if isinstance(m, bytes))
        if not audio:
            if any(isinstance(m, str) and '"CloseStream"' in m for m in messages):
                return {**self._native, "encoding": "pcm_s16le", "sample_rate": "16000", "channels": "1"}
            return None  # KeepAlive or Configure before the audio: keep waiting
        header = _wav_header(audio)
        if header is None:
            return None  # not all of the header yet
        encoding, rate, channels, self._skip = header
        self.channels = channels
        return {**self._native, "encoding": encoding, "sample_rate": str(rate), "channels": str(channels)}

    # --- client → server ------------------------------------------------------------

    def incoming(self, raw: str | bytes) -> tuple[list[Native], list[dict[str, Any]]]:
        """One Deepgram client message → (native messages, messages to answer with at once)."""
        if self._closed:
            return [], []  # after CloseStream nothing more is read
        if isinstance(raw, bytes):
            if not raw:
                return self._close(), []
            if self._skip:
                skipped, self._skip = min(self._skip, len(raw)), max(0, self._skip - len(raw))
                raw = raw[skipped:]
            self._audio.update(raw)
            return ([raw] if raw else []), []
        try:
            message = parse_json_object(raw)
        except BadMessage as exc:
            return [], [self._schema_error(raw, str(exc))]
        kind = message.get("type")
        if kind == "KeepAlive":
            return [], []
        if kind == "Finalize":
            self._finalizing += 1
            return [{"type": "flush"}], []
        if kind == "CloseStream":
            return self._close(), []
        if kind == "Configure":
            natives, answer = self._configure(message, raw)
            return natives, [answer]
        return [], [self._schema_error(raw, f"unknown message type {str(kind)[:100]!r}: expected KeepAlive, "
                                       "Finalize, CloseStream or Configure (audio goes in binary frames)")]

    def _close(self) -> list[Native]:
        self._closed = True
        return [{"type": "end"}]

    def _configure(self, message: dict[str, Any], raw: str) -> tuple[list[Native], dict[str, Any]]:
        """A ``Configure``: (native messages, its answer). ``keyterms`` become the session's (native
        ``config``) for the utterances decoded after it; the whole message fails if any part is bad:
        a malformed one is a ``SchemaError``, as Deepgram answers a message it cannot read."""
        features = message.get("features") or {}
        if not isinstance(features, dict) or not all(isinstance(v, bool) for v in features.values()):
            return [], self._schema_error(raw, "features must map feature names to true or false")
        natives: list[Native] = []
        terms = message.get("keyterms")
        if terms is not None:
            if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                return [], self._schema_error(raw, "keyterms must be a list of strings")
            try:
                natives.append({"type": "config", "keyterms": keyterms(terms, "keyterms")})
            except ConfigError as exc:
                return [], self._configure_failure("CONFIGURE_KEYTERM_LIMIT_EXCEEDED", exc.reason)
        if "punctuate" in features or "smart_format" in features:
            self.punctuate = bool(features.get("punctuate") or features.get("smart_format"))
        return natives, {"type": "ConfigureSuccess", "request_id": self.request_id}

    def _configure_failure(self, code: str, description: str) -> dict[str, Any]:
        return {"type": "ConfigureFailure", "request_id": self.request_id, "code": code,
                "description": description}

    # --- server → client --------------------------------------------------------------

    def outgoing(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """One native server message → Deepgram server messages."""
        kind = message.get("type")
        if kind == "session.begin":
            # request_id stays the one the 101 announced; the log ties it to the native session
            log.info("Deepgram request %s is session %s", self.request_id, message.get("session_id"))
            config = message.get("config") or {}
            if "model" in config and "model" in self._native:
                self.model_info["name"] = config["model"]
            return []
        if kind == "vad.speech_start":
            uid, self._started = self._started, self._started + 1
            self._span[uid] = [float(message["timestamp"])] * 2
            if self.vad_events:
                return [{"type": "SpeechStarted", "channel": [0, 1], "timestamp": float(message["timestamp"])}]
            return []
        if kind == "vad.speech_end":
            self._last_end = max(self._last_end, float(message["timestamp"]))
            if self._started - 1 in self._span:
                self._span[self._started - 1][1] = float(message["timestamp"])
            return []
        if kind == "transcript.partial":
            return [self._interim(message)]
        if kind == "transcript.final":
            return self._final(message)
        if kind == "flush.done":
            return self._flush_done()
        if kind == "error":
            return [self._native_error(str(message.get("code", "")), str(message.get("message", "")))]
        if kind == "session.end":
            return [self._metadata(float(message.get("total_duration", 0.0)))]
        return []  # warning: Deepgram has no such message

    def _final(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        uid: Any = message.get("utterance_id")
        span = self._span.pop(uid, None)
        start = span[0] if span else float(message.get("start", 0.0))
        end = max(span[1] if span else 0.0, float(message.get("end", 0.0)))
        from_finalize = self._finalizing > 0
        self._last_end = max(self._last_end, end)
        if message.get("text"):
            self._confidences.append(round(float(message.get("confidence") or 0.0), 4))  # as the final says
        self._finalized |= from_finalize
        out = [self._results(message.get("text") or "", message.get("words") or [], start, end - start,
                             is_final=True, confidence=float(message.get("confidence") or 0.0),
                             from_finalize=from_finalize, language=message.get("language"))]
        if self.utterance_end:
            words = message.get("words") or []
            last = float(words[-1]["end"]) if words else float(message.get("end", end))
            out.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last})
        return out

    def _interim(self, message: dict[str, Any]) -> dict[str, Any]:
        """A partial as an interim ``Results``. Partials carry no word times or confidences (apps index
        ``words[0]`` all the same): the words share the partial's span in proportion to their letters,
        and each has the typical confidence."""
        start, end = float(message.get("start", 0.0)), float(message.get("end", 0.0))
        text = message.get("text") or ""
        tokens = [t for t in text.split() if _plain(t)]
        confidence = self._typical()
        words = [{"word": token, "start": t0, "end": t1, "confidence": confidence}
                 for token, (t0, t1) in zip(tokens, _spread(tokens, start, end))]
        return self._results(text, words, start, end - start, is_final=False, confidence=confidence)

    def _typical(self) -> float:
        """What an interim result's confidence is estimated as: the mean of this connection's finals
        so far (:data:`INTERIM_CONFIDENCE` before the first)."""
        if not self._confidences:
            return INTERIM_CONFIDENCE
        return round(sum(self._confidences) / len(self._confidences), 4)

    def _flush_done(self) -> list[dict[str, Any]]:
        if not self._finalizing:
            return []
        self._finalizing -= 1
        answered, self._finalized = self._finalized, False
        if answered:
            return []
        # Nothing was buffered: Deepgram still answers a Finalize with an (empty) final result.
        return [self._results("", [], self._last_end, 0.0, is_final=True, from_finalize=True)]

    def _results(self, text: str, words: list[dict[str, Any]], start: float, duration: float, *,
                 is_final: bool, confidence: float = 0.0, from_finalize: bool = False,
                 language: str | None = None) -> dict[str, Any]:
        out_words = []
        for w in words:
            word = {"word": _plain(w["word"]), "start": w["start"], "end": w["end"],
                    "confidence": w.get("confidence", 0.0)}
            if self.punctuate:
                word["punctuated_word"] = w["word"]
            if language:
                word["language"] = language
            out_words.append(word)
        transcript = text if self.punctuate else " ".join(p for p in (_plain(t) for t in text.split()) if p)
        alternative: dict[str, Any] = {"transcript": transcript, "confidence": round(confidence, 4),
                                       "words": out_words}
        if language:
            alternative["languages"] = [language]
        return {"type": "Results", "channel_index": [0, 1], "duration": round(max(duration, 0.0), 3),
                "start": round(start, 3), "is_final": is_final,
                "speech_final": is_final and self.speech_final and not from_finalize,
                "from_finalize": from_finalize, "channel": {"alternatives": [alternative]},
                "metadata": {"request_id": self.request_id, "model_info": dict(self.model_info),
                             "model_uuid": self.model_uuid}}

    def _metadata(self, duration: float) -> dict[str, Any]:
        return {"type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
                "sha256": self._audio.hexdigest(),
                "created": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "duration": duration, "channels": self.channels, "models": [self.model_uuid],
                "model_info": {self.model_uuid: dict(self.model_info)}}

    def _schema_error(self, raw: str, reason: str) -> dict[str, Any]:
        """Deepgram's answer to a client text message it cannot read: the message itself in ``message``."""
        return {"type": "Error", "variant": SCHEMA_ERROR,
                "description": f"Could not deserialize last text message: {reason}", "message": raw[:MAX_ECHO]}

    def _native_error(self, code: str, text: str) -> dict[str, Any]:
        """A native ``error``: Deepgram reports such failures in close frames only, so the variant is
        the native code in the CamelCase of Deepgram's own variants (``idle_timeout`` → ``IdleTimeout``)."""
        if code in ("invalid_json", "unknown_message"):
            return {"type": "Error", "variant": SCHEMA_ERROR, "description": text}
        variant = "".join(part.capitalize() for part in code.split("_")) or "Error"
        return {"type": "Error", "variant": variant, "description": text}


def _spread(tokens: list[str], start: float, end: float) -> list[tuple[float, float]]:
    """Estimated (start, end) of each word over ``start``-``end``: consecutive, each as long as its
    share of the letters (every token has some: see :func:`_plain`)."""
    letters = [len(_plain(t)) for t in tokens]
    total, span = sum(letters), max(end - start, 0.0)
    times, at = [], start
    for n in letters:
        after = at + span * n / total
        times.append((round(at, 3), round(after, 3)))
        at = after
    return times


def _header_text(text: str) -> str:
    """``text`` fit for an HTTP header: printable ASCII, anything else escaped; at most 1000 characters."""
    return re.sub(r"[^\x20-\x7e]", lambda m: m.group().encode("unicode_escape").decode("ascii"), text)[:1000]


def _plain(word: str) -> str:
    """A word as Deepgram writes it without punctuation: lower case, no punctuation marks."""
    return _PUNCTUATION.sub("", word).strip("-'").lower()


def _wav_header(data: bytes) -> tuple[str, int, int, int] | None:
    """(native encoding, sample rate, channels, header length) of a WAV stream's start.

    ``None`` when more bytes are needed; :class:`ConfigError` when it is not WAV or not a format
    the session decodes.
    """
    if (len(data) >= 4 and data[:4] != b"RIFF") or (len(data) >= 12 and data[8:12] != b"WAVE"):
        raise ConfigError("encoding", "no encoding was given, so the audio must be a WAV stream, and it is not: "
                          "for raw audio pass encoding=linear16 (or linear32, mulaw, alaw) and sample_rate")
    fmt, pos = None, 12
    while len(data) >= pos + 8:
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"data":
            if fmt is None:
                raise ConfigError("encoding", "the WAV stream has no fmt chunk before its data")
            return (*fmt, pos + 8)
        if chunk == b"fmt ":
            if len(data) < pos + 8 + 16:
                return None
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[pos + 8:pos + 24])
            if tag == 0xFFFE and size >= 40 and len(data) >= pos + 8 + 26:
                tag = struct.unpack("<H", data[pos + 32:pos + 34])[0]  # WAVE_FORMAT_EXTENSIBLE's sub-format
            encoding = WAV_FORMATS.get((tag, bits))
            if encoding is None:
                raise ConfigError("encoding", f"WAV format {tag} with {bits}-bit samples is not supported: send "
                                  "16-bit PCM, 32-bit float, A-law or μ-law")
            if not 1 <= channels <= 2 or not 8000 <= rate <= 48000:
                raise ConfigError("encoding", f"WAV audio of {channels} channels at {rate} Hz is not supported "
                                  "(1–2 channels, 8000–48000 Hz)")
            fmt = (encoding, rate, channels)
        pos += 8 + size + (size & 1)
        if pos > MAX_HEADER:
            raise ConfigError("encoding", f"the WAV header is larger than {MAX_HEADER} bytes")
    return None


@hookimpl
def register_dialect(register):
    """A built-in plugin: registered through the same hook as a third party's dialect."""
    register("deepgram", DeepgramDialect, path=PATH)
