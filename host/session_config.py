"""Per-session configuration from the ``/session`` query string.

Three schemas apply: the host's audio parameters (``encoding``, ``sample_rate``,
``channels``, ``engine``), the host's core session parameters every engine
understands (``model``, ``language``, ``interim_results``, ``word_timestamps``,
``enable_vad``), and the engine's own ``config_schema``, which may narrow those
or add parameters of its own. Query values are strings; they are converted to
the type the schemas declare before validation, and defaults are applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from host import languages
from host.audio import ENCODINGS, MAX_RATE, MIN_RATE
from host.engines import EngineSpec
from host.protocol import ConfigError
from host.schemas import declared_types, problems, with_defaults

AUDIO_SCHEMA = {
    "type": "object",
    "properties": {
        "engine": {"type": "string"},
        "encoding": {"type": "string", "enum": list(ENCODINGS), "default": "pcm_s16le"},
        "sample_rate": {"type": "integer", "minimum": MIN_RATE, "maximum": MAX_RATE, "default": 16000},
        "channels": {"type": "integer", "enum": [1, 2], "default": 1},
        "api_key": {"type": "string"},
        "time_offset": {"type": "number", "minimum": 0, "maximum": 1e7, "default": 0},
        "segment_offset": {"type": "integer", "minimum": 0, "maximum": 1e9, "default": 0},
        "utterance_offset": {"type": "integer", "minimum": 0, "maximum": 1e9, "default": 0},
        "resumable": {"type": "boolean", "default": False},
    },
}
"""``time_offset``, ``segment_offset``, ``utterance_offset``: where this session's timeline starts, so
that it continues another's (the router's failover): every session time it reports is shifted by
``time_offset`` seconds, and its segment and utterance ids start at the offsets (host/sender.py).
``resumable``: a connection lost without a close frame parks the session for ``RESUME_WINDOW_S``, so
that the client can re-attach with its ``resume_token`` (docs/protocol.md, "Resume")."""

CORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "language": {"type": "string", "pattern": languages.PATTERN, "default": "auto"},
        "interim_results": {"type": "boolean", "default": True},
        "word_timestamps": {"type": "boolean", "default": False},
        "enable_vad": {"type": "boolean", "default": True},
        "endpointing": {"type": "string", "enum": ["turn", "silence"], "default": "turn"},
        "eagerness": {"type": "string", "enum": ["low", "medium", "high", "auto"], "default": "auto"},
        "silence_ms": {"type": ["integer", "null"], "minimum": 100, "maximum": 10000, "default": None},
        "turn_events": {"type": "boolean", "default": False},
    },
}
"""``endpointing``: ``turn`` asks the engine's turn detector at pauses (an engine without one uses
``silence``, and ``session.begin`` says so); ``silence`` ends an utterance after a fixed silence
(``silence_ms``, default the engine's). ``eagerness`` tunes ``turn``; ``turn_events`` sends
``turn.end``. See docs/protocol.md."""

CHANGEABLE = ("model", "language", "endpointing", "eagerness", "silence_ms", "turn_events")
"""Parameters a ``config`` message may change during a session (``model``: for the utterances that
start after it)."""

T = TypeVar("T")

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclass
class SessionConfig:
    engine: str
    model: str
    language: str
    interim_results: bool
    word_timestamps: bool
    enable_vad: bool
    encoding: str
    sample_rate: int
    channels: int
    endpointing: str = "silence"
    eagerness: str = "auto"
    silence_ms: int | None = None
    turn_events: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Engine-specific parameters declared by its config_schema."""
    time_offset: float = 0.0
    segment_offset: int = 0
    utterance_offset: int = 0
    resumable: bool = False
    model_named: bool = False
    """Whether the client chose ``model`` itself; if not, a language its variant does not serve moves
    the session to one that does (:func:`variant_for`)."""

    def public(self) -> dict[str, Any]:
        """The ``config`` object of ``session.begin``."""
        out = asdict(self)
        out.pop("engine")
        out.pop("model_named")
        for name in ("time_offset", "segment_offset", "utterance_offset", "resumable"):
            if not out[name]:  # echoed only when set: a session that continues no other's looks as before
                out.pop(name)
        out.update(out.pop("extra"))
        return out


def pick_engine(query: Mapping[str, str], engines: Mapping[str, T], failed: Mapping[str, Any] | None = None) -> T:
    """The engine the ``engine`` parameter names, else the first one (``failed``: engines that
    did not load, by id, each with a ``reason``)."""
    name = query.get("engine")
    if name is None:
        if not engines:
            raise ConfigError("engine", "no engine is loaded")
        return next(iter(engines.values()))
    if failed and name in failed:
        raise ConfigError("engine", f"engine {name!r} is not available: it failed to load "
                                    f"({getattr(failed[name], 'reason', '')})")
    if name not in engines:
        raise ConfigError("engine", f"unknown engine {name!r} (available: {', '.join(engines)})")
    return engines[name]


def parse_session_config(query: Mapping[str, str], engine: EngineSpec) -> SessionConfig:
    """Validate query parameters for ``engine``; raise :class:`ConfigError` naming the bad one."""
    schemas = (AUDIO_SCHEMA, CORE_SCHEMA, engine.config_schema)
    known = set()
    for schema in schemas:
        known |= set(schema.get("properties") or {})
    values: dict[str, Any] = {}
    for name, raw in query.items():
        if name not in known:
            raise ConfigError(name, f"unknown parameter (known: {', '.join(sorted(known))})")
        values[name] = _coerce(name, raw, schemas)

    audio = _checked(AUDIO_SCHEMA, {k: v for k, v in values.items() if k in AUDIO_SCHEMA["properties"]})
    if not math.isfinite(audio["time_offset"]):  # NaN passes the schema's bounds
        raise ConfigError("time_offset", f"expected a finite number of seconds, got {query['time_offset']!r}")
    session = {k: v for k, v in values.items() if k not in AUDIO_SCHEMA["properties"]}
    session = _checked(engine.config_schema, session)
    session = _checked(CORE_SCHEMA, session)

    model = session.get("model") or engine.models[0]
    if "model" not in values:  # the client named no variant: one that serves its languages
        model = variant_for(engine, model, session["language"])
    check_model(model, engine)
    language = check_language(session["language"], engine, model)
    core = set(CORE_SCHEMA["properties"])
    return SessionConfig(
        engine=engine.id,
        model=model,
        language=language,
        interim_results=session["interim_results"],
        word_timestamps=session["word_timestamps"],
        enable_vad=session["enable_vad"],
        encoding=audio["encoding"],
        sample_rate=audio["sample_rate"],
        channels=audio["channels"],
        time_offset=float(audio["time_offset"]),
        segment_offset=audio["segment_offset"],
        utterance_offset=audio["utterance_offset"],
        resumable=audio["resumable"],
        endpointing=effective_endpointing(session["endpointing"], engine),
        eagerness=session["eagerness"],
        silence_ms=session["silence_ms"],
        turn_events=session["turn_events"],
        extra={k: v for k, v in session.items() if k not in core},
        model_named="model" in values,
    )


def variant_for(engine: EngineSpec, default: str, language: Any) -> str:
    """``default``, or where it does not serve every language ``language`` names, the first variant
    that does (``language=de`` without ``model`` gets a German-speaking variant, not an error)."""
    try:
        codes = languages.parse(language) if isinstance(language, str) else ()
    except ValueError:
        return default  # reported by check_language
    if not engine.unserved_languages(codes, default):
        return default
    return next((m for m in engine.models if not engine.unserved_languages(codes, m)), default)


def effective_endpointing(asked: str, engine: EngineSpec) -> str:
    """``asked``, or ``silence`` where the engine has no turn detector to ask."""
    return asked if asked == "silence" or "turn" in engine.pipeline else "silence"


def changeable(engine: EngineSpec) -> tuple[str, ...]:
    """What a ``config`` message may change in a session of ``engine``: :data:`CHANGEABLE`, and the
    engine's own parameters that its ``config_schema`` marks ``changeable: true`` (a prompt, keyterms)."""
    own = (engine.config_schema.get("properties") or {}).items()
    return CHANGEABLE + tuple(name for name, prop in own
                              if isinstance(prop, dict) and prop.get("changeable") is True and name not in CHANGEABLE)


def check_change(name: str, value: Any, engine: EngineSpec, model: str | None = None) -> Any:
    """Validate ``name`` (one of :data:`CHANGEABLE`) given mid-session by a ``config`` message
    to a session of variant ``model``."""
    if name == "language":
        return check_language(value, engine, model)
    if name == "model":
        return check_model(value, engine)
    schema = CORE_SCHEMA["properties"].get(name) or engine.config_schema["properties"][name]
    found = problems({"type": "object", "properties": {name: schema}}, {name: value})
    if found:
        raise ConfigError(name, found[0].message)
    return effective_endpointing(value, engine) if name == "endpointing" else value


def check_model(model: Any, engine: EngineSpec) -> str:
    """``model`` if it is one of the engine's variants, else :class:`ConfigError` naming ``model``."""
    if not isinstance(model, str) or model not in engine.models:
        raise ConfigError("model", f"unknown model {model!r} (engine {engine.id!r} has {', '.join(engine.models)})")
    return model


def check_language(language: Any, engine: EngineSpec, model: str | None = None) -> str:
    """``language`` (``auto``, a code or a candidate set) as the session keeps it, if variant ``model``
    of ``engine`` serves every language it names; else :class:`ConfigError` naming ``language``."""
    if not isinstance(language, str):
        raise ConfigError("language", "must be a string")
    try:
        codes = languages.parse(language)
    except ValueError as exc:
        raise ConfigError("language", str(exc)) from None
    unserved = engine.unserved_languages(codes, model)
    if unserved:
        which = f"model {model!r} of engine {engine.id!r}" if model else f"engine {engine.id!r}"
        raise ConfigError("language", f"{which} does not support {', '.join(map(repr, unserved))} "
                                      f"(supports {languages.shown(engine.languages_of(model), 20)})")
    return languages.canonical(language)


def _checked(schema: dict, values: dict) -> dict:
    found = problems(schema, values)
    if found:
        first = found[0]
        raise ConfigError(first.path.split(".")[0] if first.path else "", first.message)
    return with_defaults(schema, values)


def _coerce(name: str, raw: str, schemas) -> Any:
    types = [t for schema in schemas for t in declared_types(schema, name)]
    text = raw.strip()
    if "boolean" in types:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        if types == ["boolean"] or set(types) == {"boolean"}:
            raise ConfigError(name, f"expected true/false/1/0, got {raw!r}")
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            if "number" not in types and "string" not in types:
                raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    if "number" in types:
        try:
            return float(text)
        except ValueError:
            if "string" not in types:
                raise ConfigError(name, f"expected a number, got {raw!r}") from None
    return raw
