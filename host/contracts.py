"""Component contracts: what a plugin's factory returns, and the data passed between stages.

These are small Protocol classes: a plugin does not subclass anything from the
host, it only has to provide these methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from host import languages

SAMPLE_RATE = 16000
"""Every stage after the audio receiver sees float32 mono audio at this rate."""


# --- data -------------------------------------------------------------------


@dataclass
class Word:
    """One recognized word; times are seconds relative to the audio given to the ASR."""

    word: str
    start: float
    end: float
    probability: float


@dataclass
class AsrResult:
    """What an ASR model returns for one utterance."""

    text: str
    words: list[Word] = field(default_factory=list)
    language: str | None = None
    confidence: float = 0.0
    """Mean word probability, 0-1."""
    language_probability: float | None = None
    """How sure the language decision was, 0-1 (None: the language was given, not detected)."""
    sentence_end: float | None = None
    """The model's probability that the text ends a sentence where it stops: that the token after its
    last word is ``.``, ``?`` or ``!``. Set only when the request asked for it (``sentence_end``);
    None: not asked, or the model cannot say."""


@dataclass
class Utterance:
    """A stretch of the session's audio cut by the VAD (or by the client's flush)."""

    id: int
    start: float
    """Session time (seconds) of the first sample."""
    end: float
    """Session time (seconds) after the last sample."""
    speech_start: float | None = None
    """Where the VAD heard the speech begin (``start`` plus the pre-roll); None: at ``start``."""
    speech_end: float | None = None
    """Where the VAD last heard speech (``end`` less the post-roll); None: at ``end`` (a cut)."""


@dataclass
class Segment:
    """A finalized piece of the session transcript, in session time."""

    id: int
    utterance_id: int
    start: float
    end: float
    text: str
    confidence: float
    language: str | None
    words: list[Word]
    """Word times are session time."""
    language_probability: float | None = None


@dataclass(frozen=True)
class SessionOptions:
    """What one session asked for, as a stage sees it (contract v2).

    ``config`` is the session's configuration validated against the engine's ``config_schema``
    with defaults applied: the core parameters (``model``, ``language``, ...) and every parameter
    the engine declares for itself (a ``prompt``, ``keyterms``, a ``language_policy``...). It is
    exactly the ``config`` object ``session.begin`` echoes.
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    previous_text: str = ""
    """The text of the session's previous final (empty for the first), for models that take context."""
    session_id: str = ""
    previous_language: str | None = None
    """The language of the session's previous final (None before the first), for language decisions."""

    def get(self, name: str, default: Any = None) -> Any:
        """One parameter of the session's configuration."""
        return self.config.get(name, default)


@dataclass(frozen=True)
class TranscribeRequest:
    """One transcription, as :meth:`AsrModel.transcribe_many` receives it."""

    audio: np.ndarray
    """float32 16 kHz mono."""
    language: str | None
    """The language to transcribe in; None: decide it (see ``languages``)."""
    word_timestamps: bool
    partial: bool = False
    options: SessionOptions = field(default_factory=SessionOptions)
    languages: tuple[str, ...] = ()
    """With ``language`` None: the candidates to choose among (empty: any the model knows)."""
    sentence_end: bool = False
    """Fill :attr:`AsrResult.sentence_end` (the speculative decodes of ``endpointing=turn`` ask for it)."""


@dataclass
class LoadContext:
    """Passed to every factory at start-up."""

    shared: Callable[[tuple, Callable[[], Any]], Any]
    """``shared(key, loader)`` returns one object per key across all engines, so two
    variants (or engines) naming the same model load it once. Keys are kept per plugin:
    two plugins using the same key get two objects."""
    engine_id: str
    plugin: str = ""
    """The name of the plugin whose factory is called (its entry point name)."""


@dataclass
class SessionInfo:
    """Given to ``session_started``/``session_ended`` hooks."""

    session_id: str
    engine: str
    config: dict[str, Any]
    worker_id: str


@dataclass
class SessionRecord:
    """Summary of an ended session, for the registry and ``session_ended`` hooks."""

    session_id: str
    worker_id: str
    engine: str
    model: str
    status: str
    """``completed`` or ``error``."""
    started_at: float
    ended_at: float
    audio_seconds: float
    speech_seconds: float
    segments: int
    error: str | None = None


@dataclass
class WorkerInfo:
    """Static description of a worker, registered once at start-up."""

    worker_id: str
    endpoint: str
    capacity: int
    engines: list[str]
    models: list[str]
    languages: list[str]
    version: str
    started_at: float
    catalog: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per engine id: its public description (as ``GET /engines`` shows it), so a router can match
    a request exactly and describe the engines it offers."""

    def engine_catalog(self) -> dict[str, dict[str, Any]]:
        """The catalog, or one built from the flat lists when a worker registered none."""
        if self.catalog:
            return self.catalog
        caps = {"models": self.models, "languages": self.languages}
        return {e: {"id": e, "capabilities": caps} for e in self.engines}


@dataclass
class WorkerStatus:
    """Live state of a worker, sent on every heartbeat."""

    status: str
    """``starting``, ``ready`` or ``draining``."""
    active_sessions: int
    capacity: int
    memory: dict[str, Any]


@dataclass
class WorkerRecord:
    """A live worker as a router sees it in a shared registry."""

    info: WorkerInfo
    status: WorkerStatus
    last_heartbeat: float
    leases: int = 0
    """Sessions routers have reserved on this worker and not yet released."""

    @property
    def load(self) -> int:
        # A routed session is counted by its lease at once and by the worker's heartbeat later;
        # the larger of the two is the best estimate that never counts a session twice.
        return max(self.status.active_sessions, self.leases)

    @property
    def free(self) -> int:
        return max(0, self.status.capacity - self.load)

    def serves(self, engine: str | None, model: str | None, language: str | None) -> bool:
        """Whether some engine on this worker takes a session with these query parameters."""
        catalog = self.info.engine_catalog()
        if engine is not None:
            catalog = {engine: catalog[engine]} if engine in catalog else {}
        elif catalog:
            # Without ``engine`` the worker picks its first engine, so only that one counts.
            first = next(iter(catalog))
            catalog = {first: catalog[first]}
        try:
            codes = languages.parse(language) if language else ()
        except ValueError:
            codes = ()  # malformed: the worker answers invalid_config for it
        for description in catalog.values():
            caps = description.get("capabilities", {})
            models = caps.get("models", [])
            if model is not None and model not in models:
                continue
            # Without ``model`` the worker picks a variant that serves the languages asked for.
            variants = caps.get("variants") or {}
            for name in [model] if model is not None else models or [""]:
                langs = set((variants.get(name) or {}).get("languages") or caps.get("languages", []))
                # {"all", "*", "auto"} is engines.ANY_LANGUAGE: the engine takes any language.
                if langs & {"all", "*", "auto"} or all(code in langs for code in codes):
                    return True
        return False


# --- components ---------------------------------------------------------------


@runtime_checkable
class VadStream(Protocol):
    """Per-session VAD state.

    A stream may also have ``reset()``, which returns it to its initial state; the host calls it
    at endpoints (``reset_state_at_endpoint``). Without it the host opens a new stream instead.
    """

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        """Speech probability (0-1) for each row of ``windows`` (shape ``(n, window_samples)``)."""
        ...


@runtime_checkable
class VadModel(Protocol):
    """A loaded VAD, shared by all sessions of an engine."""

    window_samples: int
    """Window length in samples at 16 kHz (512 for Silero)."""

    def open_stream(self) -> VadStream:
        """A fresh per-session state."""
        ...


@runtime_checkable
class AsrModel(Protocol):
    """One model variant of an ASR engine, ready to transcribe.

    Optional, checked and used by the host when present (see docs/plugins.md):

    - ``languages: Sequence[str]``: the languages the model can transcribe (ISO codes, or
      ``["*"]`` for any). A variant serves the engine's ``capabilities.languages`` its model declares
      (all it declares where the engine names ``*``); an engine.yaml naming a language that no
      variant's model declares does not load, and a session asking a variant for a language it
      does not serve gets ``invalid_config``.
    - ``transcribe`` may take an ``options`` keyword: it then receives the session's
      :class:`SessionOptions` (per-session parameters such as a prompt).
    - ``transcribe`` may take a ``sentence_end`` keyword: when True, it fills
      :attr:`AsrResult.sentence_end`, the probability that the text ends a sentence. The turn policy
      reads it from the speculative decode at a pause (see docs/turn-detection.md).
    - ``transcribe_many(requests: list[TranscribeRequest]) -> list[AsrResult]`` (with an optional
      ``max_batch: int``, default 8): the scheduler then decodes several waiting utterances, of
      several sessions, in one call.
    - ``detect_language(audio) -> Mapping[str, float]``: the probability of each language the model
      knows for float32 16 kHz mono ``audio``. The host then decides the language of each utterance
      itself (restricted to the session's candidates, with :mod:`host.languages`' switching rule) and
      calls ``transcribe`` with it; without it, ``language=None`` leaves the decision to the model.
    - ``describe() -> dict``: what the variant is, for ``/engines`` (e.g. ``{"model": "whisper base"}``).
    - ``open_stream(*, language, word_timestamps, options) -> AsrStream``: a streaming recognizer.
      The host then feeds each utterance's audio as it arrives instead of decoding it whole, and
      asks the stream for the final when the utterance ends (see :class:`AsrStream`).
    """

    key: tuple
    """Identifies the loaded weights; variants with the same key share one inference queue."""
    parallelism: int
    """How many transcriptions this model can run at once (worker threads of its queue)."""

    def transcribe(
        self, audio: np.ndarray, *, language: str | None, word_timestamps: bool, partial: bool = False
    ) -> AsrResult:
        """Transcribe float32 16 kHz mono ``audio``. Blocking; the host calls it off the event loop.

        ``partial=True`` asks for a cheap interim hypothesis of an utterance still in progress
        (the text is all that is used); the final call uses the variant's own settings."""
        ...


@runtime_checkable
class AsrStream(Protocol):
    """One utterance in a streaming recognizer (``AsrModel.open_stream``): state kept between calls.

    The host calls it from its inference threads, one call at a time and in order: ``accept`` with
    each new piece of the utterance's audio, then ``finish`` once. The pieces follow each other
    without a gap from the utterance's first sample; the last ones may run past its end by up to
    the endpoint silence, since where speech ends is known only after that silence. A stream that
    is not finished (the utterance was cleared) is dropped; ``close()``, when it has one, is called then.
    """

    def accept(self, audio: np.ndarray) -> AsrResult | None:
        """The next float32 16 kHz mono piece of the utterance; a hypothesis of everything so far
        (shown as a partial), or None."""
        ...

    def finish(self) -> AsrResult:
        """The utterance ended: its final result, word times relative to the utterance's first sample."""
        ...


@runtime_checkable
class AsrEngine(Protocol):
    """What an ASR factory returns: the engine's model variants."""

    variants: dict[str, AsrModel]

    def memory(self) -> dict[str, Any]:
        """What the loaded models use, as a JSON object, e.g. ``{"devices": ["cuda:0"], "bytes": 1.5e9}``.

        Optional. The worker shows it per engine in ``/health`` (``engines.<id>.memory``)."""
        ...


@runtime_checkable
class TurnDetector(Protocol):
    """A loaded turn detector (``pipeline.turn``), shared by all sessions of an engine.

    It answers one question at a pause in speech: has the speaker finished their turn, or only
    paused mid-sentence? A semantic model (Smart Turn) hears intonation and an unfinished phrase,
    which silence length alone cannot.
    """

    def probability(self, audio: np.ndarray) -> float:
        """Probability (0-1) that the turn is complete, given float32 16 kHz mono ``audio`` of the
        open turn up to now (the host passes at most the last ``max_audio_s`` seconds when the
        detector has that attribute, 8 s when not). Blocking; the host calls it off the event loop.

        Optional: ``probabilities(audios) -> list[float]``, the same for several sessions' turns at
        once; the host's :class:`host.turn.TurnBatcher` then hands it every check that waits."""
        ...


@runtime_checkable
class TranscriptBuilder(Protocol):
    """Per-session assembler state."""

    def add(self, utterance: Utterance, result: AsrResult) -> Segment | None:
        """Turn an utterance's ASR result into a session-time segment (None when empty)."""
        ...

    @property
    def segments(self) -> list[Segment]:
        ...


@runtime_checkable
class Assembler(Protocol):
    def open_session(self) -> TranscriptBuilder:
        ...


@runtime_checkable
class Registry(Protocol):
    """Where a worker announces itself so routers can find it. All methods are async."""

    async def register(self, info: WorkerInfo) -> None:
        ...

    async def heartbeat(self, status: WorkerStatus) -> None:
        ...

    async def session_ended(self, record: SessionRecord) -> None:
        ...

    async def deregister(self) -> None:
        ...


@runtime_checkable
class WorkerDirectory(Protocol):
    """The router's side of a shared registry: list live workers and reserve capacity atomically.

    A registry component that only a worker uses (like the in-memory one) need not
    provide it; ``engine-host route`` refuses to start with such a registry.
    """

    async def workers(self) -> list[WorkerRecord]:
        ...

    async def reserve(self, worker_id: str, lease_id: str, ttl_s: float) -> bool:
        """Take one slot on the worker unless it is full, gone or not ready (atomic across routers)."""
        ...

    async def renew(self, worker_id: str, lease_id: str, ttl_s: float) -> None:
        ...

    async def release(self, worker_id: str, lease_id: str) -> None:
        ...

    async def close(self) -> None:
        ...
