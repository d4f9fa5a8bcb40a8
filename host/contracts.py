"""Component contracts: what a plugin's factory returns, and the data passed between stages.

These are small Protocol classes: a plugin does not subclass anything from the
host, it only has to provide these methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

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


@dataclass
class Utterance:
    """A stretch of the session's audio cut by the VAD (or by the client's flush)."""

    id: int
    start: float
    """Session time (seconds) of the first sample."""
    end: float
    """Session time (seconds) after the last sample."""


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


@dataclass
class LoadContext:
    """Passed to every factory at start-up."""

    shared: Callable[[tuple, Callable[[], Any]], Any]
    """``shared(key, loader)`` returns one object per key across all engines, so two
    variants (or engines) naming the same model load it once."""
    engine_id: str


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


@dataclass
class WorkerStatus:
    """Live state of a worker, sent on every heartbeat."""

    status: str
    """``starting``, ``ready`` or ``draining``."""
    active_sessions: int
    capacity: int
    memory: dict[str, Any]


# --- components ---------------------------------------------------------------


@runtime_checkable
class VadStream(Protocol):
    """Per-session VAD state."""

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
    """One model variant of an ASR engine, ready to transcribe."""

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
class AsrEngine(Protocol):
    """What an ASR factory returns: the engine's model variants."""

    variants: dict[str, AsrModel]

    def memory(self) -> dict[str, Any]:
        """Memory the loaded models use, e.g. ``{"device": "cpu"}`` or GPU figures."""
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
