"""Small real plugins for tests: an ASR that answers a fixed text (recording the options it gets)
and can fail on cue, and an energy VAD that breaks its contract on cue.

Register with ``load_plugins(env={"ENGINE_HOST_PLUGINS": ""}, extra=[fault_plugins])``.
"""

from __future__ import annotations

import numpy as np
import yaml

from host.contracts import AsrResult, SessionOptions, SessionRecord, Word
from host.hookspecs import hookimpl

RECORDS: list[SessionRecord] = []
"""The record of every session that ended, from the ``session_ended`` hook."""


class ScriptedAsr:
    """An :class:`host.contracts.AsrModel` answering ``text`` and the number of its final call (``hello
    world 2``: a repeated text would be dropped as a repeat across a flush cut); it raises for the calls ``fail`` names
    (``never``, ``finals``, ``first_final``, ``partials`` or ``all``) and remembers each call's options."""

    parallelism = 1

    def __init__(self, key: tuple, text: str = "hello world", fail: str = "never"):
        self.key = key
        self.languages = ["en"]
        self.text, self.fail = text, fail
        self.calls: list[tuple[bool, SessionOptions | None]] = []
        """(partial, options) of every call, in order."""

    def transcribe(self, audio: np.ndarray, *, language: str | None, word_timestamps: bool, partial: bool = False,
                   options: SessionOptions | None = None) -> AsrResult:
        self.calls.append((partial, options))
        first_final = not partial and not any(not p for p, _ in self.calls[:-1])
        if self.fail in ("all", "partials" if partial else "finals") or (self.fail == "first_final" and first_final):
            raise RuntimeError(f"scripted {'partial' if partial else 'final'} failure")
        text = f"{self.text} {sum(not p for p, _ in self.calls)}"
        n = len(text.split())
        duration = len(audio) / 16000
        words = [Word(" " + w, i * duration / n, (i + 1) * duration / n, 0.9) for i, w in enumerate(text.split())]
        return AsrResult(text, words if word_timestamps else [], language or "en", 0.9)


class ScriptedEngine:
    def __init__(self, options: dict, engine_id: str):
        self.variants = {name: ScriptedAsr(("scripted", engine_id, name), **opts)
                         for name, opts in options["models"].items()}


class CueVad:
    """RMS energy as a speech probability; after ``break_after_s`` of audio (windows counted across its
    streams: the host opens a new one at each endpoint) they answer as ``fault`` says: ``count`` (one
    probability short), ``nan``, ``raise``, or ``none`` (never break)."""

    window_samples = 480

    def __init__(self, floor_db: float = -50, break_after_s: float = 0.0, fault: str = "none"):
        self.floor_db, self.fault = floor_db, fault
        self.break_after = int(break_after_s * 16000 / self.window_samples)
        self.seen = 0

    def open_stream(self) -> CueVad._Stream:
        return CueVad._Stream(self)

    class _Stream:
        def __init__(self, vad: CueVad):
            self.vad = vad

        def probabilities(self, windows: np.ndarray) -> np.ndarray:
            self.vad.seen += len(windows)
            rms = np.sqrt(np.mean(np.square(windows), axis=1)) + 1e-9
            p = np.clip((20 * np.log10(rms) - self.vad.floor_db) / 10.0, 0.0, 1.0)
            if self.vad.fault == "none" or self.vad.seen <= self.vad.break_after:
                return p
            if self.vad.fault == "raise":
                raise ValueError("cue reached")
            if self.vad.fault == "nan":
                return np.full(len(windows), np.nan)
            return p[:-1]


_MODEL = {"type": "object", "properties": {"text": {"type": "string"},
                                           "fail": {"enum": ["never", "finals", "first_final", "partials", "all"]}},
          "additionalProperties": False}
ASR_SCHEMA = {"type": "object", "properties": {"models": {"type": "object", "additionalProperties": _MODEL}},
              "required": ["models"]}
VAD_SCHEMA = {"type": "object", "properties": {"floor_db": {"type": "number"}, "break_after_s": {"type": "number"},
                                               "fault": {"enum": ["none", "count", "nan", "raise"]}},
              "additionalProperties": False}


@hookimpl
def register_asr(register):
    register("scripted", lambda options, context: ScriptedEngine(options, context.engine_id), ASR_SCHEMA)


@hookimpl
def register_vad(register):
    register("cue", lambda options, context: CueVad(**options), VAD_SCHEMA)


@hookimpl
def session_ended(session, record):
    RECORDS.append(record)


def engine_yaml(engine_id: str, fail: str = "never", fault: str = "none", break_after_s: float = 0.0,
                text: str = "hello world") -> str:
    """An engine file serving the scripted ASR behind the cue VAD."""
    models = {name: {"text": text, "fail": fail} for name in ("fast", "accurate")}
    return yaml.safe_dump({
        "id": engine_id, "type": "realtime", "name": engine_id, "version": "1.0.0",
        "capabilities": {"languages": ["en"], "models": ["fast", "accurate"], "streaming": True,
                         "word_timestamps": True},
        "config_schema": {"type": "object", "properties": {
            "model": {"type": "string", "enum": ["fast", "accurate"], "default": "fast"},
            "language": {"type": "string", "enum": ["auto", "en"], "default": "auto"},
            "interim_results": {"type": "boolean", "default": True},
            "word_timestamps": {"type": "boolean", "default": False},
            "enable_vad": {"type": "boolean", "default": True},
            "prompt": {"type": "string", "maxLength": 500}}},
        "pipeline": {
            "vad": {"plugin": "cue", "options": {"floor_db": -50, "break_after_s": break_after_s, "fault": fault,
                                                 "threshold": 0.5, "endpoint_silence_s": 0.5,
                                                 "short_utterance_s": 0.0, "reset_state_at_endpoint": False}},
            "asr": {"plugin": "scripted", "options": {"models": models}},
            "assembler": {"plugin": "default"}},
    })
