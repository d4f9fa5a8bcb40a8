"""What a session needs from its worker: shared queues and batchers, limits, hooks (:class:`SessionServices`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from host.contracts import SessionInfo, SessionRecord
from host.metrics import Metrics
from host.recording import SessionRecorder
from host.scheduler import Scheduler
from host.turn import TurnBatcher
from host.vad import VadBatcher

if TYPE_CHECKING:
    from host.session import Session


@dataclass
class SessionServices:
    """What a session needs from its worker."""

    worker_id: str
    scheduler: Scheduler
    vad_batcher: Callable[[Any], VadBatcher]
    """The shared :class:`VadBatcher` of a VAD model."""
    turn_batcher: Callable[[Any, str], TurnBatcher]
    """The shared :class:`TurnBatcher` of a turn detector (and its component label)."""
    max_frame_bytes: int
    partial_interval_s: float
    """New audio (seconds) between two partial requests of an open utterance."""
    lag_warning_s: float
    """A final waiting this long after its endpoint triggers a processing_lag warning."""
    lag_limit_s: float
    """...and this long ends the session with a processing_lag error."""
    metrics: Metrics
    idle_timeout_s: float = 0.0
    """No client message for this long ends the session (0: never)."""
    max_session_s: float = 0.0
    """A session open this long is ended (0: no limit)."""
    max_control_per_s: float = 0.0
    """Sustained JSON control messages per second (0: unlimited); more are dropped with an error."""
    ping_interval_s: float = 0.0
    """Keepalive pings to the client (0: none); see :mod:`host.keepalive`."""
    max_pending_finals: int = 4
    """Final decodes one session may have queued or running; past this its messages wait (backpressure).
    Real-time speech rarely has two; a flush storm without it queued 645 and starved every other session."""
    recorder: Callable[[str], SessionRecorder] | None = None
    """Makes the recorder of a session id; None: recording is off."""
    on_started: Callable[[SessionInfo], None] = lambda info: None
    on_released: Callable[[Session], None] = lambda session: None
    """The session gives back its capacity slot: its client is gone, or has session.end."""
    on_ended: Callable[[SessionInfo, SessionRecord], Awaitable[None]] | None = None
