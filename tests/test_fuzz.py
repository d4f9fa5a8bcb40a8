"""Protocol fuzzing against a real worker: thousands of random and malformed frames over many sessions.

Every session is planned up front from one seeded ``random.Random`` (the seed is printed; set
``FUZZ_SEED`` to replay a run), so a failure reproduces with the same frames in the same sessions.
Only the interleaving of the few concurrent sessions varies between runs.

For every frame and message the plan also predicts what the documented protocol says must happen
(docs/protocol.md): which ``error`` code it draws (none, ``invalid_json``, ``unknown_message``,
``invalid_config``, ``invalid_audio``, ``frame_too_large``), whether it answers ``flush.done``, and
how many audio bytes the session accepts. The checks then compare what the worker sent with that:

* every ``error`` has ``code``, ``message`` and ``recoverable``, with a documented code;
* the error codes a session received are exactly the predicted ones, in order (a prefix of them when
  the client went away first), and all are recoverable: nothing ended a session but the client;
* a session closed with ``end`` gets ``session.end`` last and close 1000; its ``segments`` equal the
  ``transcript.final`` messages received (texts, ids, times, order), its ``transcript`` is their texts
  joined by single spaces, it has one ``flush.done`` per ``flush``, its ``total_duration`` is the
  audio of the accepted frames (dropped frames really are dropped, nothing else is lost), and its
  ``vad.*`` events alternate;
* sessions streaming real speech with garbage interleaved still get a non-empty transcript;
* bad query strings get ``invalid_config`` (non-recoverable), no ``session.begin``, close 1008;
* afterwards the worker is healthy, has no open session, logged every session's end, and its log
  holds no Traceback.

Four bugs the fuzzer found (now fixed) keep one minimal regression test each, ``test_found_*`` at
the end, and their triggers stay in the random mix.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from host.client import read_wav, silence

from .support import ROOT, WorkerProcess, http_get

MAX_FRAME = 65536
"""The worker's max_frame_bytes here: small, so frame_too_large is cheap to trigger."""
WS_LIMIT = max(4 * MAX_FRAME, 1 << 20)
"""Frames above this are cut off by the WebSocket layer (close 1009)."""
CAPACITY = 6
CONCURRENCY = 3
"""Sessions the fuzzer runs at once; below CAPACITY because aborted sessions linger while finalizing."""
MIN_CASES = 2000
CRASHING_TEXTS = {
    # A config field named by a lone surrogate: echoing it in invalid_config cannot be encoded as UTF-8.
    "surrogate_config_key": '{"type": "config", "\\ud800": "en"}',
    # Valid JSON nested 1000 deep: json.loads raises RecursionError, which is not a ValueError.
    "deep_nesting": "[" * 1000 + "]" * 1000,
}
BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
CONTROL_TYPES = ("config", "flush", "clear", "end")
SERVER_TYPES = {"session.begin", "vad.speech_start", "vad.speech_end", "transcript.partial", "transcript.final",
                "flush.done", "warning", "error", "session.end"}
NAN_FILL = b"\xff"
"""0xFF bytes decode as NaN (or, at an odd alignment, beyond +-64) whatever bytes are pending before them."""


def documented_error_codes() -> set[str]:
    """The codes of the error-code table in docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    table = text.split("### Error codes", 1)[1].split("\n### ", 1)[0]
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    assert {"invalid_json", "unknown_message", "invalid_config", "invalid_audio", "frame_too_large"} <= codes, codes
    return codes


# --- the plan: what each session sends, and what the protocol says must come back ---------------------


@dataclass
class Act:
    kind: str
    """A label for the tally of case kinds."""
    op: str
    """text | binary | text_fragments | binary_fragments"""
    data: Any
    expect: str | None = None
    """The error code this message must draw; None: none."""
    flush: bool = False
    """A valid flush: one flush.done must answer it."""


@dataclass
class Plan:
    index: int
    kind: str
    """fuzz | speech | bad_query"""
    query: str
    ending: str = "end"
    """end | abort | abort_mid | fin | close | bad_utf8 | too_big | abort_early (bad_query: none)"""
    config: dict[str, Any] = field(default_factory=dict)
    """The effective configuration session.begin must echo (bad_query: the bad parameter's name)."""
    actions: list[Act] = field(default_factory=list)
    end_text: Any = '{"type": "end"}'
    after_end: list[Act] = field(default_factory=list)
    """Sent after end: the protocol says these are ignored."""
    mid_frame: bytes = b""
    """abort_mid: the start of a frame whose rest never comes."""
    accepted_samples: int = 0
    """Input samples (per channel) of all accepted frames: session.end.total_duration is their length."""
    speech: bool = False


class DecoderModel:
    """What the worker's audio receiver does with each binary frame, per docs/protocol.md."""

    def __init__(self, encoding: str, channels: int):
        self.f32 = encoding == "pcm_f32le"
        self.frame_bytes = BYTES_PER_SAMPLE[encoding] * channels
        self.pending = b""
        self.accepted = 0

    def feed(self, data: bytes) -> str | None:
        if len(data) > MAX_FRAME:
            return "frame_too_large"
        if self.f32:
            buf = self.pending + data
            usable = len(buf) - len(buf) % self.frame_bytes
            x = np.frombuffer(buf[:usable], dtype="<f4")
            if x.size and (not np.isfinite(x).all() or float(np.abs(x).max()) > 64.0):
                return "invalid_audio"  # dropped: the trailing partial sample stays as it was
            self.pending = buf[usable:]
        self.accepted += len(data)
        return None

    @property
    def samples(self) -> int:
        return self.accepted // self.frame_bytes


def json_depth(text: str) -> int:
    """Deepest bracket nesting outside JSON strings (an independent check of the server's limit)."""
    deepest = depth = 0
    in_string = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif in_string and ch == "\\":
            escaped = True
        elif ch == '"':
            in_string = not in_string
        elif not in_string and ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif not in_string and ch in "]}":
            depth -= 1
    return deepest


class Oracle:
    """Predicts the server's answer to a text message."""

    def __init__(self, languages: list[str]):
        assert not set(languages) & {"all", "*", "auto"}, "wildcard languages: extend the oracle"
        self.languages = {"auto", *languages}

    def text(self, text: str) -> tuple[str | None, str | None]:
        """(expected error code, control type) of a text frame."""
        if json_depth(text) > 64:  # docs/protocol.md: deeper control messages are invalid_json
            return "invalid_json", None
        try:
            m = json.loads(text)
        except ValueError:
            return "invalid_json", None
        kind = m.get("type") if isinstance(m, dict) else None
        if not isinstance(kind, str) or kind not in CONTROL_TYPES:
            return "unknown_message", None
        if kind == "config":
            if set(m) - {"type", "language"}:
                return "invalid_config", kind
            if "language" in m and not (isinstance(m["language"], str) and m["language"] in self.languages):
                return "invalid_config", kind
        return None, kind


UNICODE = "aé€𝄞\u00a0\u200b\ufeff\u202e\x00\x1f\x7f\ufffd日本語🙂\\\"'{}[]:,"
BROKEN_JSON = [
    "", " ", "\n", "{", "}", "[", "]", '{"type": "flush"', "{'type': 'flush'}", '{"type": flush}', "flush",
    "undefined", '{"type":"end",}', "[1,2,,3]", '{"type":"flush"} trailing', '\ufeff{"type":"flush"}',
    '{"type":"\\x41"}', '"unterminated', '{"a":1 "b":2}', "nul\x00", '{"type":"end"}{"type":"end"}', "1 2",
    "--1", "0x10", "{\"type\":\"config\",\"language\":'en'}", "tru", "nulll", '{"type":"flush"', "[" * 50,
    '{"type":"clear"]', "{\"type\"\x00:\"flush\"}", '{"\\ud800": 1', "{\"type\":\"flush\",\"x\":1e}", "01",
    "{\"type\":\"end\"\n", "\u00a0{}",
]
UNKNOWN_TYPES = ["dance", "FLUSH", "Flush", "flush ", " end", "", "end\u0000", "session.end", "transcript.final",
                 "config.", "ｆｌｕｓｈ", "clear\n", "flush.done", "session.begin", "error", "ping", "END", "x" * 300]
BAD_LANGUAGES = [5, None, [], {}, True, 1.5, ["en"], {"code": "en"}, "qq", "EN", "english", "e", "en\n", "",
                 "auto ", " en", "fra", "zz", "en-US", "en_US", "\u00e9n", "a" * 40]
EXTRA_FIELDS = ["model", "interim_results", "word_timestamps", "enable_vad", "encoding", "sample_rate", "channels",
                "x", "", "Language", "type2", "lang", "languages"]

TURN_DEFAULTS = {"endpointing": "turn", "eagerness": "auto", "silence_ms": None, "turn_events": False}
"""What session.begin echoes of the endpointing parameters when a query leaves them out."""


def rand_text(r: random.Random, n: int) -> str:
    return "".join(r.choice(UNICODE) if r.random() < 0.3 else chr(r.randint(32, 126)) for _ in range(n))


def rand_value(r: random.Random, depth: int = 0) -> Any:
    """A random JSON value."""
    k = r.randint(0, 9 if depth < 3 else 5)
    if k == 0:
        return None
    if k == 1:
        return r.choice([True, False])
    if k == 2:
        return r.choice([0, -1, 1, 2**31, -(2**63), 2**70, r.randint(-10**6, 10**6)])
    if k == 3:
        return r.choice([0.0, -0.0, 1.5, 1e308, -1e-308, r.uniform(-1e6, 1e6)])
    if k in (4, 5):
        return rand_text(r, r.randint(0, 20))
    if k in (6, 7):
        return [rand_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    return {rand_text(r, r.randint(0, 8)): rand_value(r, depth + 1) for _ in range(r.randint(0, 4))}


def text_case(r: random.Random, allow_clear: bool = True) -> tuple[str, str]:
    """(kind, text) of a random malformed or control text message (never an `end`)."""
    k = r.random()
    if k < 0.16:
        return "invalid_json", (r.choice(BROKEN_JSON) if r.random() < 0.6 else rand_text(r, r.randint(1, 60)))
    if k < 0.28:
        value = r.choice([rand_value(r), [], [1, "flush"], ["type", "end"], 0, -1.5, "flush", "end", None, True,
                          [{"type": "flush"}], [[[[]]]]])
        if isinstance(value, dict):
            value = [value]
        return "non_object", (json.dumps(value) if r.random() < 0.9 else r.choice(["NaN", "-Infinity", "Infinity"]))
    if k < 0.36:
        obj = r.choice([{}, {"typ": "flush"}, {"TYPE": "flush"}, {"language": "en"}, {"Type": "end"}, {"types": ["end"]}])
        obj = dict(obj, **{rand_text(r, 3): rand_value(r)}) if r.random() < 0.3 else obj
        return "no_type", json.dumps(obj)
    if k < 0.46:
        t = r.choice(UNKNOWN_TYPES) if r.random() < 0.7 else r.choice([5, None, [], {}, True, ["flush"], {"flush": 1}])
        return "unknown_type", json.dumps({"type": t, **({"language": "en"} if r.random() < 0.3 else {})})
    if k < 0.64:
        c = r.random()
        if c < 0.35:
            msg = {"type": "config", "language": r.choice(BAD_LANGUAGES)}
        elif c < 0.6:
            msg = {"type": "config", r.choice(EXTRA_FIELDS): rand_value(r)}
            if r.random() < 0.5:
                msg["language"] = "en"  # rejected as a whole all the same
        elif c < 0.7:
            msg = {"type": "config"}
        else:
            msg = {"type": "config", "language": r.choice(["en", "auto"])}
        text = json.dumps(msg, ensure_ascii=r.random() < 0.5)
        if r.random() < 0.1:  # duplicate keys: the last one wins
            text = text[:-1] + ', "language": "en"}'
        return "config", text
    if k < 0.78:
        msg = {"type": "flush"}
        if r.random() < 0.6:
            msg[r.choice(["x", "language", "force", "", "type2"])] = r.choice([[1, 2, {"a": None}], rand_value(r)])
        return "flush", json.dumps(msg)
    if k < 0.86 and allow_clear:
        msg = {"type": "clear", **({"x": rand_value(r)} if r.random() < 0.4 else {})}
        return "clear", json.dumps(msg)
    if k < 0.93:
        # Lone surrogates: valid JSON escapes a server cannot echo back as UTF-8 unless it escapes them.
        return "surrogate", r.choice([
            '{"type": "\\ud800"}',
            '{"type": "config", "language": "\\udfff"}',
            '{"type": "flush", "\\ud83d": 1}',
            '{"\\ud800": "flush"}',
            '["\\ud800"]',
            CRASHING_TEXTS["surrogate_config_key"],
        ])
    if k < 0.96:
        # Nested JSON, but not so deep that Python's recursion limit is near (see CRASHING_TEXTS).
        depth = r.randint(1, 400)
        inner = r.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
        return "nested", r.choice([inner, json.dumps({"type": "flush"})[:-1] + ', "x": ' + inner + "}"])
    return "control_chars", json.dumps({"type": r.choice(CONTROL_TYPES[:3]) + r.choice(["\u0000", "\u202e", "\ufeff"])})


def huge_text(r: random.Random) -> tuple[str, str]:
    """A ~200 KB text frame."""
    n = 200_000
    return r.choice([
        ("huge_junk", rand_text(r, 2000) * (n // 2000)),
        ("huge_flush", json.dumps({"type": "flush", "pad": "x" * n})),
        ("huge_config", json.dumps({"type": "config", "language": "a" * n})),
        ("huge_unknown", json.dumps({"type": "y" * n})),
        ("huge_list", json.dumps([0] * (n // 3))),
        ("huge_invalid", '{"type": "flush", "pad": "' + "z" * n),
        ("deep_nesting", "[" * (n // 2) + "]" * (n // 2)),
    ])


def fragments(r: random.Random, data):
    """Split a message into 2-5 WebSocket fragments (a fragmented message is still one message)."""
    if len(data) < 2:
        return None
    cuts = sorted(r.sample(range(1, len(data)), min(r.randint(1, 4), len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def f32_bytes(samples: np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<f4").tobytes()


def speech_stream(audio_pcm: bytes, encoding: str) -> bytes:
    if encoding == "pcm_f32le":
        return f32_bytes(np.frombuffer(audio_pcm, dtype="<i2").astype(np.float32) / 32768.0)
    return audio_pcm


def binary_case(r: random.Random, encoding: str, speech: list[bytes]) -> tuple[str, bytes]:
    k = r.random()
    if k < 0.28:
        n = r.choice([r.randint(1, 9), r.randint(10, 2000), r.randint(2000, 8000)])
        if r.random() < 0.5:
            return "garbage", r.randbytes(n)
        quiet = np.array([r.randint(-300, 300) for _ in range(8)], dtype="<i2").tobytes()
        return "quiet_noise", (quiet * (n // len(quiet) + 1))[:n]
    if k < 0.36:
        return "odd_length", r.randbytes(r.choice([1, 3, 5, 7, 33, 1001, 4095]))
    if k < 0.46:
        return "empty", b""
    if k < 0.55:
        return "too_large", bytes(r.randint(MAX_FRAME + 1, 3 * MAX_FRAME))
    if k < 0.59:
        return "max_frame", r.randbytes(MAX_FRAME) if encoding != "pcm_f32le" else f32_bytes(
            np.zeros(MAX_FRAME // 4))
    if k < 0.62:
        return "max_frame_plus_1", bytes(MAX_FRAME + 1)
    if encoding == "pcm_f32le" and k < 0.85:
        n = r.randint(1, 600)
        x = np.array([r.uniform(-1.5, 1.5) for _ in range(n)], dtype=np.float32)
        bad = r.choice(["nan", "inf", "-inf", "big", "nan_fill", "clean", "clean_misaligned"])
        if bad == "nan_fill":
            return "f32_nan_bytes", NAN_FILL * r.randint(4, 999)
        if bad in ("nan", "inf", "-inf", "big"):
            x[r.randrange(n)] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "big": 65.0}[bad]
        data = f32_bytes(x)
        if bad == "clean_misaligned":
            data = data[r.randint(0, 3):]
        return f"f32_{bad}", data
    if speech and k > 0.8:
        pcm = speech_stream(r.choice(speech), encoding)
        length = r.randint(3200, 32000) * BYTES_PER_SAMPLE[encoding] // 2
        start = r.randrange(max(1, len(pcm) - length))
        return "speech_chunk", pcm[start:start + length]
    return "garbage", r.randbytes(r.randint(1, 3000))


def fuzz_query(r: random.Random) -> tuple[str, dict[str, Any]]:
    """A valid query string with noise (repeated params, odd spellings) and the config it means."""
    config = {"model": "fast", "language": "auto", "interim_results": True, "word_timestamps": False,
              "enable_vad": True, "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1, **TURN_DEFAULTS}
    params: list[tuple[str, str]] = []
    if r.random() < 0.5:
        enc = r.choice(list(BYTES_PER_SAMPLE))
        if r.random() < 0.2:
            params.append(("encoding", r.choice(["mp3", "", "PCM_S16LE"])))  # overridden below: the last one wins
        params.append(("encoding", enc))
        config["encoding"] = enc
    if r.random() < 0.4:
        rate = r.choice([8000, 11025, 16000, 22050, 44100, 48000])
        params.append(("sample_rate", r.choice([str(rate), f" {rate} ", f"{rate}"])))
        config["sample_rate"] = rate
    if r.random() < 0.25:
        params.append(("channels", "2"))
        config["channels"] = 2
    for name in ("interim_results", "word_timestamps", "enable_vad"):
        if r.random() < (0.6 if name == "interim_results" else 0.35):  # fewer partial decodes: 2 cores
            value = r.random() < (0.35 if name == "interim_results" else 0.5 if name == "word_timestamps" else 0.85)
            spelled = r.choice(["true", "TRUE", "1", "yes", "On"] if value else ["false", "False", "0", "no", "OFF"])
            params.append((name, spelled))
            config[name] = value
    if r.random() < 0.3:
        lang = r.choice(["en", "auto"])
        params.append(("language", lang))
        config["language"] = lang
    if r.random() < 0.15:
        params.append(("api_key", rand_text(r, 10)))
    if r.random() < 0.15:
        params.append(("model", "fast"))
    if r.random() < 0.1:
        params.append(("engine", "whisper-streaming"))
    r.shuffle(params)
    # Repeated parameters keep their last value: shuffle must not reorder a name's occurrences.
    ordered: dict[str, list[str]] = {}
    for name, value in params:
        ordered.setdefault(name, []).append(value)
    if "encoding" in ordered:
        ordered["encoding"] = [v for v in ordered["encoding"] if v != config["encoding"]] + [config["encoding"]]
    flat = [(n, v) for n, vs in ordered.items() for v in vs]
    return "&".join(f"{quote(n)}={quote(v)}" for n, v in flat), config


BAD_PARAMS = [
    ("encoding", ["mp3", "", "PCM_S16LE", "pcm", "pcm_s16le ", "opus", "%ZZ"]),
    ("sample_rate", ["abc", "", "7999", "48001", "1e4", "-16000", "16000.5", "0x3e80", "9" * 30, "%ZZ"]),
    ("channels", ["0", "3", "abc", "", "1.0", "-1"]),
    ("interim_results", ["maybe", "", "2", "truee", "%00"]),
    ("word_timestamps", ["maybe", "null", "-1"]),
    ("enable_vad", ["nope", "yes please"]),
    # "de" or "fr" would be valid without model=fast (a variant that serves them is chosen): codes no variant has
    ("language", ["xx", "EN", "", "english", "en\n", "en,qq", "%E9n", "en,", "auto,en"]),
    ("model", ["huge", "", "FAST", "accurate "]),
    ("engine", ["nope", "", "whisper"]),
]
UNKNOWN_PARAMS = ["colour", "Sample_Rate", "samplerate", "lang", "token", "a%00b", "%ZZ", "x" * 200, "%F0%9F%99%82"]


def bad_query(r: random.Random) -> tuple[str, str]:
    """A query string with exactly one bad parameter (given last among its name) and the parameter's name."""
    good, _ = fuzz_query(r) if r.random() < 0.5 else ("", None)
    if r.random() < 0.3:
        raw = r.choice(UNKNOWN_PARAMS)
        return "&".join(p for p in (good, f"{raw}={quote(rand_text(r, 5))}") if p), "unknown parameter"
    name, values = r.choice(BAD_PARAMS)
    value = r.choice(values)
    encoded = value if "%" in value else quote(value)
    good = "&".join(p for p in good.split("&") if p and not p.startswith(name + "="))
    return "&".join(p for p in (good, f"{name}={encoded}") if p), name


def make_plans(r: random.Random, speech: list[bytes], oracle: Oracle) -> list[Plan]:
    endings = (["end"] * 17 + ["abort"] * 16 + ["abort_mid"] * 8 + ["fin"] * 5 + ["close"] * 7
               + ["bad_utf8"] * 2 + ["too_big"] * 2 + ["abort_early"] * 2)
    kinds = ["fuzz"] * len(endings) + ["speech"] * 12 + ["bad_query"] * 12
    r.shuffle(endings)
    r.shuffle(kinds)
    plans = []
    for i, kind in enumerate(kinds):
        if kind == "bad_query":
            query, param = bad_query(r)
            plans.append(Plan(i, kind, query, ending="none", config={"param": param}))
        elif kind == "speech":
            plans.append(speech_plan(r, i, speech, oracle))
        else:
            plans.append(fuzz_plan(r, i, endings.pop(), speech, oracle))
    return plans


def add_text(plan: Plan, oracle: Oracle, kind: str, text: str, r: random.Random) -> None:
    expect, control = oracle.text(text)
    assert control != "end", text
    pieces = fragments(r, text) if r.random() < 0.08 else None
    plan.actions.append(Act(kind, "text_fragments" if pieces else "text", pieces or text, expect,
                            flush=control == "flush" and expect is None))


def add_binary(plan: Plan, model: DecoderModel, kind: str, data: bytes, r: random.Random) -> None:
    expect = model.feed(data)
    pieces = fragments(r, data) if len(data) < WS_LIMIT and r.random() < 0.05 else None
    plan.actions.append(Act(kind, "binary_fragments" if pieces else "binary", pieces or data, expect))


def end_variant(r: random.Random) -> Any:
    return r.choice(['{"type": "end"}', '{"type":"end","reason":[1,{"x":null}]}', ' {"type": "end"} ',
                     '{"language": 5, "type": "end"}', ["{\"type\"", ": \"end\"}"]])


def fuzz_plan(r: random.Random, index: int, ending: str, speech: list[bytes], oracle: Oracle) -> Plan:
    query, config = fuzz_query(r)
    plan = Plan(index, "fuzz", query, ending, config)
    model = DecoderModel(config["encoding"], config["channels"])
    n = 0 if ending == "abort_early" else (r.randint(0, 4) if r.random() < 0.1 else r.randint(18, 52))
    texts = 0
    for _ in range(n):
        if r.random() < 0.55 and texts < 60:  # well under the per-session control message rate limit's burst
            texts += 1
            kind, text = huge_text(r) if r.random() < 0.03 else text_case(r)
            add_text(plan, oracle, kind, text, r)
        else:
            kind, data = binary_case(r, config["encoding"], speech)
            add_binary(plan, model, kind, data, r)
    plan.accepted_samples = model.samples
    if ending == "end":
        plan.end_text = end_variant(r)
        plan.after_end = [Act("after_end", "text", text_case(r)[1]) for _ in range(r.randint(0, 3))]
        plan.after_end += [Act("after_end", "binary", r.randbytes(r.randint(0, 999))) for _ in range(r.randint(0, 2))]
    if ending == "abort_mid":
        payload = r.randbytes(r.randint(2, 3 * MAX_FRAME)) if r.random() < 0.7 else json.dumps(
            {"type": "flush", "pad": "p" * r.randint(2, 5000)}).encode()
        opcode = Opcode.BINARY if r.random() < 0.7 else Opcode.TEXT
        frame = Frame(opcode, payload).serialize(mask=True)
        plan.mid_frame = frame[:r.randint(1, len(frame) - 1)]
    return plan


def speech_plan(r: random.Random, index: int, speech: list[bytes], oracle: Oracle) -> Plan:
    """Real speech split anywhere, with garbage that must not change it: bad text, dropped frames, flushes."""
    encoding = "pcm_f32le" if r.random() < 0.4 else "pcm_s16le"
    interim = r.random() < 0.5
    params = [f"encoding={encoding}"] if encoding != "pcm_s16le" or r.random() < 0.5 else []
    params.append(f"interim_results={str(interim).lower()}")
    config = {"model": "fast", "language": "auto", "interim_results": interim, "word_timestamps": False,
              "enable_vad": True, "encoding": encoding, "sample_rate": 16000, "channels": 1, **TURN_DEFAULTS}
    plan = Plan(index, "speech", "&".join(params), "end", config, speech=True)
    model = DecoderModel(encoding, 1)
    stream = speech_stream(r.choice(speech) + silence(0.6).pcm, encoding)
    pos = 0
    texts = 0
    while pos < len(stream):
        n = r.choice([1, 2, 3, 5, 331, 1001, 3200, 4097, 6400, 12345])
        add_binary(plan, model, "speech_frame", stream[pos:pos + n], r)
        pos += n
        while r.random() < 0.35 and texts < 50:
            texts += 1
            g = r.random()
            if g < 0.55:
                kind, text = text_case(r, allow_clear=False)
                add_text(plan, oracle, kind, text, r)
            elif g < 0.62:
                kind, text = huge_text(r)
                add_text(plan, oracle, kind, text, r)
            elif g < 0.72:
                add_binary(plan, model, "empty", b"", r)
            elif g < 0.82:
                add_binary(plan, model, "too_large", bytes(r.randint(MAX_FRAME + 1, 2 * MAX_FRAME)), r)
            elif encoding == "pcm_f32le":
                add_binary(plan, model, "f32_nan_bytes", NAN_FILL * r.randint(4, 4001), r)
                assert plan.actions[-1].expect == "invalid_audio"
            else:
                add_text(plan, oracle, "config", json.dumps({"type": "config", "language": "en"}), r)
    assert model.pending == b"" and model.samples * model.frame_bytes == len(stream), "speech must survive intact"
    plan.accepted_samples = model.samples
    plan.end_text = end_variant(r)
    return plan


# --- running a plan ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    plan: Plan
    messages: list[dict] = field(default_factory=list)
    raw_binary: int = 0
    """Binary frames the server sent (it must send none)."""
    close_code: int | None = None
    close_reason: str = ""
    sent: int = 0
    """Actions sent (excluding after-end messages)."""
    cases: Counter = field(default_factory=Counter)
    send_failed: str | None = None
    capacity_retries: int = 0


async def send_act(ws, act: Act) -> None:
    await ws.send(act.data)  # *_fragments: a list, sent as one fragmented message


async def run_plan(url: str, plan: Plan, sem: asyncio.Semaphore) -> Outcome:
    out = Outcome(plan)
    async with sem:
        while True:
            ws = await connect(f"{url}/session?{plan.query}" if plan.query else f"{url}/session",
                               max_size=None, open_timeout=30, ping_interval=None, close_timeout=10)
            if plan.ending == "abort_early":
                ws.transport.abort()  # before session.begin could even arrive
                out.cases["handshake_then_abort"] += 1
                return out
            try:
                first = await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed:
                if ws.close_code == 1013 and ws.close_reason == "Server at capacity" and out.capacity_retries < 100:
                    out.capacity_retries += 1  # sessions aborted earlier are still finalizing
                    await asyncio.sleep(0.2)
                    continue
                out.close_code, out.close_reason = ws.close_code, ws.close_reason or ""
                return out
            break
        out.messages.append(json.loads(first))
        out.cases["handshake"] += 1

        async def receive() -> None:
            try:
                async for raw in ws:
                    if isinstance(raw, bytes):
                        out.raw_binary += 1
                    else:
                        out.messages.append(json.loads(raw))
            except ConnectionClosed:
                pass  # the close code below tells how it ended
            finally:
                out.close_code, out.close_reason = ws.close_code, ws.close_reason or ""

        receiver = asyncio.create_task(receive())
        try:
            for act in plan.actions:
                if receiver.done():
                    out.send_failed = f"the server closed before {act.kind}"
                    break  # the checks report it: only the client ends a session here
                try:
                    await send_act(ws, act)
                except ConnectionClosed as exc:
                    out.send_failed = f"{act.kind}: {exc!r}"
                    break
                out.sent += 1
                out.cases[act.kind] += 1
                if out.sent % 7 == 0:
                    await asyncio.sleep(0)  # let the other sessions in

            ending = plan.ending if out.send_failed is None else "none"
            if ending == "end":
                try:
                    await ws.send(plan.end_text)
                except ConnectionClosed as exc:
                    out.send_failed = f"end: {exc!r}"
                out.cases["end"] += 1
                for act in plan.after_end if out.send_failed is None else []:
                    try:
                        await send_act(ws, act)
                    except ConnectionClosed:
                        break  # the server may already have closed after session.end: fine
                    out.cases[act.kind] += 1
            elif ending == "abort":
                ws.transport.abort()
            elif ending == "abort_mid":
                ws.transport.write(plan.mid_frame)  # a frame cut short, then the connection is gone
                out.cases["partial_frame"] += 1
                await asyncio.sleep(0.01)
                if len(plan.mid_frame) % 2:
                    ws.transport.abort()
                else:
                    ws.transport.close()
            elif ending == "fin":
                ws.transport.close()  # TCP FIN without a WebSocket close frame
            elif ending == "close":
                await ws.close()  # a clean close, but without `end`
            elif ending == "bad_utf8":
                try:
                    await ws.send(b'{"type": "flush", "x": "\xff\xfe\xc0\xaf"}', text=True)
                except ConnectionClosed as exc:
                    out.send_failed = f"bad_utf8: {exc!r}"
                out.cases["bad_utf8_text"] += 1
            elif ending == "too_big":
                try:
                    await ws.send(bytes(WS_LIMIT + 1))
                    out.cases["over_ws_limit"] += 1
                except ConnectionClosed:
                    out.cases["over_ws_limit"] += 1  # cut off while still sending it: expected
            await asyncio.wait_for(receiver, 90)
        finally:
            receiver.cancel()
            if ws.transport is not None and not ws.transport.is_closing() and plan.ending not in ("end", "close"):
                ws.transport.abort()
    return out


# --- checks ----------------------------------------------------------------------------------------------


def check_error_shape(m: dict, codes: set[str], where: str) -> None:
    assert {"type", "code", "message", "recoverable"} <= set(m), f"{where}: error lacks fields: {m}"
    assert isinstance(m["code"], str) and m["code"] in codes, f"{where}: undocumented error code: {m}"
    assert isinstance(m["message"], str) and m["message"], f"{where}: error without message: {m}"
    assert isinstance(m["recoverable"], bool), f"{where}: recoverable is not a boolean: {m}"


def check_outcome(o: Outcome, codes: set[str]) -> None:
    """Check one session against the protocol."""
    p = o.plan
    where = f"session #{p.index} ({p.kind}, ending {p.ending}, query {p.query!r})"
    assert o.raw_binary == 0, f"{where}: the server sent binary frames"
    for m in o.messages:
        assert isinstance(m, dict) and m.get("type") in SERVER_TYPES, f"{where}: unknown server message {m!r}"
        if m["type"] == "error":
            check_error_shape(m, codes, where)
        if m["type"] == "warning":
            assert isinstance(m.get("code"), str) and isinstance(m.get("message"), str), f"{where}: {m}"
    types = [m["type"] for m in o.messages]
    assert o.messages or p.ending == "abort_early", (
        f"{where}: no session after {o.capacity_retries} retries (last close {o.close_code} {o.close_reason!r})")

    if p.kind == "bad_query":
        assert types == ["error"], f"{where}: expected one invalid_config error, got {o.messages}"
        (error,) = o.messages
        assert error["code"] == "invalid_config" and error["recoverable"] is False, f"{where}: {error}"
        assert p.config["param"] in error["message"], f"{where}: the error does not name the parameter: {error}"
        assert (o.close_code, o.close_reason) == (1008, "Invalid config"), f"{where}: closed {o.close_code}"
        return
    if p.ending == "abort_early":
        return
    assert o.send_failed is None, f"{where}: the server ended the session first ({o.send_failed}); last {o.messages[-3:]}"

    assert types and types[0] == "session.begin", f"{where}: first message {o.messages[:1]}"
    assert types.count("session.begin") == 1, f"{where}: session.begin repeated"
    assert o.messages[0]["config"] == p.config, f"{where}: session.begin config {o.messages[0]['config']} != {p.config}"
    errors = [m for m in o.messages if m["type"] == "error"]
    received = [e["code"] for e in errors]
    expected = [a.expect for a in p.actions[:o.sent] if a.expect]
    non_recoverable = [e for e in errors if not e["recoverable"]]
    assert not non_recoverable, f"{where}: a non-recoverable error ended the session: {non_recoverable}"
    assert received == expected[:len(received)], (
        f"{where}: error codes differ from the protocol's\n received {received}\n expected {expected}")
    finals = [m for m in o.messages if m["type"] == "transcript.final"]
    partials = [m for m in o.messages if m["type"] == "transcript.partial"]
    vad = [m for m in o.messages if m["type"].startswith("vad.")]
    if not p.config["interim_results"]:
        assert not partials, f"{where}: partials with interim_results=false"
    if not p.config["enable_vad"]:
        assert not vad, f"{where}: vad events with enable_vad=false"
    kinds = [m["type"] for m in vad]
    assert kinds == ["vad.speech_start", "vad.speech_end"] * (len(kinds) // 2) + ["vad.speech_start"] * (len(kinds) % 2), (
        f"{where}: vad events do not alternate: {kinds}")
    stamps = [m["timestamp"] for m in vad]
    assert stamps == sorted(stamps), f"{where}: vad timestamps go backwards: {stamps}"
    assert [f["segment_id"] for f in finals] == list(range(len(finals))), f"{where}: segment ids {finals}"
    finished_utterances = set()
    for m in o.messages:
        if m["type"] == "transcript.final":
            finished_utterances.add(m["utterance_id"])
        elif m["type"] == "transcript.partial":
            assert m["utterance_id"] not in finished_utterances, f"{where}: partial after its final: {m}"
    if p.ending == "end":
        assert o.sent == len(p.actions)
        assert types[-1] == "session.end" and types.count("session.end") == 1, f"{where}: ends with {o.messages[-2:]}"
        assert o.close_code == 1000, f"{where}: closed {o.close_code} {o.close_reason!r}"
        assert received == expected, f"{where}: error codes\n received {received}\n expected {expected}"
        flushes = sum(a.flush for a in p.actions)
        assert types.count("flush.done") == flushes, f"{where}: {types.count('flush.done')} flush.done for {flushes} flushes"
        end = o.messages[-1]
        segments = end["segments"]
        assert [(s["id"], s["text"], s["start"], s["end"], s["confidence"]) for s in segments] == [
            (f["segment_id"], f["text"], f["start"], f["end"], f["confidence"]) for f in finals], (
            f"{where}: session.end segments differ from the finals\n{segments}\n{finals}")
        assert end["transcript"] == " ".join(f["text"] for f in finals), f"{where}: transcript {end['transcript']!r}"
        rate = p.config["sample_rate"]
        want = p.accepted_samples / rate
        tolerance = 0.0011 if rate == 16000 else 0.02
        assert abs(end["total_duration"] - want) <= tolerance, (
            f"{where}: total_duration {end['total_duration']} s, but the accepted frames hold {want:.3f} s")
        if p.config["enable_vad"]:
            assert kinds.count("vad.speech_start") == kinds.count("vad.speech_end"), f"{where}: utterance left open"
            assert all(0 <= t <= end["total_duration"] + 1e-3 for t in stamps), f"{where}: vad stamps {stamps}"
        assert end["total_speech_duration"] <= end["total_duration"] + 2e-3, (
            f"{where}: more speech ({end['total_speech_duration']} s) than audio ({end['total_duration']} s)")
        if p.speech:
            assert end["transcript"].strip(), f"{where}: real speech with garbage interleaved lost its transcript"
    else:
        assert "session.end" not in types, f"{where}: session.end without end: {o.messages[-1]}"
        if p.ending == "bad_utf8":
            assert o.close_code == 1007, f"{where}: invalid UTF-8 text closed {o.close_code}"
        if p.ending == "too_big":
            # 1009 from the server; 1006 when the reset of the half-read frame overtakes its close frame.
            assert o.close_code in (1009, 1006), f"{where}: an over-limit frame closed {o.close_code}"
        if p.ending == "close":
            assert o.close_code == 1000, f"{where}: clean close answered {o.close_code}; last {o.messages[-3:]}"


def traceback_blocks(log: str) -> list[str]:
    """Each logged exception: its log record line, then the lines up to the next log record."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log)
    return [r for r in records if "Traceback" in r]


# --- the test ------------------------------------------------------------------------------------------------


def test_fuzz_protocol(tmp_path, speech):
    seed = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nFUZZ_SEED={seed}")
    r = random.Random(seed)
    codes = documented_error_codes()
    clips = [read_wav(u.path).pcm for u in sorted(speech, key=lambda u: u.id)
             if 2.5 <= u.duration <= 4.0 and not u.id.startswith("librivox")][:6]
    assert clips, "no short speech clip in the speech set"
    for pcm in clips:
        assert len(pcm) % 2 == 0

    worker = WorkerProcess(tmp_path, max_sessions=CAPACITY, max_frame_bytes=MAX_FRAME)
    try:
        worker.wait_healthy()
        status, engines = http_get(worker.http + "/engines")
        assert status == 200
        # Every session is of the default variant (fast, English only): its languages, not the engine's.
        oracle = Oracle(engines[0]["capabilities"]["variants"]["fast"]["languages"])
        plans = make_plans(r, clips, oracle)

        async def main() -> list[Outcome]:
            sem = asyncio.Semaphore(CONCURRENCY)
            return await asyncio.wait_for(asyncio.gather(*(run_plan(worker.url, p, sem) for p in plans)), 300)

        t0 = time.monotonic()
        outcomes = asyncio.run(main())
        elapsed = time.monotonic() - t0

        cases, errors, closes, endings = Counter(), Counter(), Counter(), Counter()
        for o in outcomes:
            cases.update(o.cases)
            errors.update(m["code"] for m in o.messages if m.get("type") == "error")
            closes[o.close_code] += 1
            endings[f"{o.plan.kind}/{o.plan.ending}"] += 1
        frames = sum(n for k, n in cases.items() if not k.startswith("handshake"))
        print(f"{len(plans)} sessions, {frames} frames/messages sent (+{cases['handshake'] + cases['handshake_then_abort']}"
              f" handshakes) in {elapsed:.1f} s; capacity retries {sum(o.capacity_retries for o in outcomes)}")
        print("sessions:", dict(sorted(endings.items())))
        print("error codes:", dict(errors.most_common()))
        print("close codes:", dict(closes.most_common()))
        print("cases:", dict(cases.most_common()))
        speech_ends = [o.messages[-1].get("transcript") for o in outcomes if o.plan.speech and o.messages]
        print("speech transcripts:", speech_ends)

        for o in outcomes:
            check_outcome(o, codes)
        assert frames >= MIN_CASES, f"only {frames} cases sent"

        worker.wait_idle(timeout=60)
        status, health = http_get(worker.http + "/health")
        assert status == 200 and health["status"] == "healthy" and health["active_sessions"] == 0, health
        assert worker.proc.poll() is None
        log = worker.log()
        begun = [o.messages[0]["session_id"] for o in outcomes if o.messages and o.messages[0]["type"] == "session.begin"]
        unrecorded = [sid for sid in begun if f"session {sid} ended" not in log]
        assert not unrecorded, f"sessions never recorded as ended: {unrecorded}"
        blocks = traceback_blocks(log)
        assert not blocks, f"FUZZ_SEED={seed}: the worker logged a Traceback:\n" + "\n...\n".join(blocks[:5])
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def plain_worker(tmp_path_factory):
    w = WorkerProcess(tmp_path_factory.mktemp("fuzz-findings"), max_sessions=2)
    w.wait_healthy()
    yield w
    w.stop()


async def one_session(worker, frames: list, query: str = "") -> tuple[list[dict], int | None]:
    """Send ``frames`` then end; every message until the close, and the close code."""
    messages = []
    async with connect(f"{worker.url}/session?{query}", max_size=None, ping_interval=None) as ws:
        messages.append(json.loads(await ws.recv()))
        try:
            for frame in [*frames, '{"type": "end"}']:
                await ws.send(frame)
            async for raw in ws:
                messages.append(json.loads(raw))
        except ConnectionClosed:
            pass
    worker.wait_idle()
    return messages, ws.close_code


# The fuzzer's findings, one minimal reproduction each, kept as regression tests.


@pytest.mark.parametrize("name", sorted(CRASHING_TEXTS))
async def test_found_crashing_text(plain_worker, name):
    """Was: surrogate_config_key dropped the connection (1006) with no error and no session.end, and the worker
    logs a UnicodeEncodeError Traceback. deep_nesting: internal_error (not recoverable), close 1011 and a
    RecursionError Traceback. Either must draw a recoverable error like any other bad message."""
    before = len(plain_worker.log())
    messages, close_code = await one_session(plain_worker, [CRASHING_TEXTS[name], '{"type": "flush"}'])
    types = [m["type"] for m in messages]
    errors = [m for m in messages if m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["recoverable"] is True, messages
    assert errors[0]["code"] in {"invalid_json", "unknown_message", "invalid_config"}, messages
    assert types[-2:] == ["flush.done", "session.end"] and close_code == 1000, (messages, close_code)
    assert "Traceback" not in plain_worker.log()[before:]


def jfk_at_4s(speech_by_id, seconds: float) -> bytes:
    pcm = read_wav(speech_by_id["jfk"].path).pcm
    start = 4 * 16000 * 2
    return pcm[start:start + int(seconds * 16000) * 2]


async def test_found_tiny_utterance_final(plain_worker, speech_by_id):
    """Was: 0.31 s of speech, flush, then 17 ms of loud noise and end: the end finalized a 17 ms utterance
    (0.31-0.327 s), faster-whisper's word alignment raises IndexError on it (finals are always decoded
    with word timestamps), and the session gets internal_error (recoverable) and a Traceback is logged."""
    noise = np.random.default_rng(4).integers(-32768, 32767, 270, dtype=np.int16).astype("<i2").tobytes()
    before = len(plain_worker.log())
    messages, close_code = await one_session(plain_worker, [jfk_at_4s(speech_by_id, 0.31), '{"type": "flush"}', noise])
    assert close_code == 1000 and messages[-1]["type"] == "session.end"
    assert not [m for m in messages if m["type"] == "error"], messages
    assert "Traceback" not in plain_worker.log()[before:]


async def test_found_clear_after_flush_overlap(plain_worker, speech_by_id):
    """Was: flush ends the utterance at 0.31 s (beyond the last whole VAD window, 0.288 s); clear then set the
    endpointer's floor back to 0.288 s, so the next utterance starts at 0.288 s, before the previous
    vad.speech_end, and total_speech_duration (0.349 s) exceeds total_duration (0.327 s)."""
    speech = jfk_at_4s(speech_by_id, 0.327)
    cut = 4960 * 2  # 0.31 s
    frames = [speech[:cut], '{"type": "flush"}', '{"type": "clear"}', speech[cut:]]
    messages, close_code = await one_session(plain_worker, frames)
    vad = [(m["type"], m["timestamp"]) for m in messages if m["type"].startswith("vad.")]
    assert close_code == 1000 and len(vad) == 4, messages
    assert vad[2][1] >= vad[1][1], f"the second utterance starts before the first ended: {vad}"
    end = messages[-1]
    assert end["total_speech_duration"] <= end["total_duration"], end
