"""Per-session limits that are not about audio content: control-message rate, idle time, session
length, finals falling behind (processing lag) and backpressure on pending finals."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from host import protocol as msg
from host.protocol import Close, ErrorCode

if TYPE_CHECKING:
    from host.decoding import UtteranceDecoder
    from host.sender import Sender
    from host.services import SessionServices


@dataclass
class TokenBucket:
    """Allows ``rate`` events per second on average and bursts of ``burst``; 0 rate: unlimited."""

    rate: float
    burst: float
    _tokens: float = field(init=False)
    _at: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._tokens = self.burst

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty (the event is over the rate)."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class SessionLimits:
    """The limit checks of a :class:`host.session.Session` (a mixin: they act on its state).

    They run between frames (a watchdog task) as well as after each, because a client may stop
    sending while its finals fall behind, and after ``end`` the lag budget holds until session.end.
    """

    services: SessionServices
    decoding: UtteranceDecoder
    out: Sender
    _ws: Any
    _finished: bool
    _abandoned: bool
    _opened: float
    _last_message: float
    _lag_warned: set[int]

    async def _give_up(self, code: ErrorCode, error: str, message: str, close: Close | None = None,
                       linger: bool = True) -> None:
        raise NotImplementedError

    async def _watch(self, every_s: float = 0.25) -> None:
        """Check limits between frames too: a client may stop sending while finals fall behind,
        and after `end` while the last finals are decoded (the lag budget holds until session.end)."""
        while not self._finished or self.decoding.awaiting:
            await asyncio.sleep(every_s)
            if self._finished:
                await self._check_lag_after_end()
            else:
                await self._check_lag()
                await self._check_time_limits()

    async def _check_time_limits(self) -> None:
        now, s = time.monotonic(), self.services
        if self._finished:
            return
        # A compat dialect's connection also counts vendor messages that map to no native one.
        last = max(self._last_message, getattr(self._ws, "last_activity", 0.0))
        if s.idle_timeout_s and now - last >= s.idle_timeout_s and not self.decoding.held_back:
            await self._give_up(ErrorCode.IDLE_TIMEOUT, "idle_timeout", f"no audio or message for {s.idle_timeout_s:g} s; "
                                "ending the session", msg.IDLE_TIMEOUT, linger=False)
        elif s.max_session_s and now - self._opened >= s.max_session_s:
            await self._give_up(ErrorCode.MAX_DURATION, "max_duration", f"the session reached the {s.max_session_s:g} s "
                                "limit; ending it", msg.SESSION_TOO_LONG)

    async def _check_lag(self) -> None:
        """Warn when finals fall behind; past the hard limit end the session rather than drift."""
        oldest = self.decoding.oldest_awaiting()
        if oldest is None or self._finished:
            return
        uid, since = oldest
        lag = time.monotonic() - since
        if lag >= self.services.lag_limit_s:
            await self._give_up(ErrorCode.PROCESSING_LAG, f"processing_lag {lag:.1f} s", f"transcription is {lag:.1f} s "
                                f"behind the audio (limit {self.services.lag_limit_s:g} s); ending the session",
                                msg.PROCESSING_LAG)
        elif lag >= self.services.lag_warning_s and uid not in self._lag_warned:
            self._lag_warned.add(uid)
            await self.out.send(msg.warning(ErrorCode.PROCESSING_LAG, f"the final of utterance {uid} is "
                                            f"{lag:.1f} s late", lag_s=round(lag, 2)))

    async def _check_lag_after_end(self) -> None:
        """After `end` the session is finishing; past the lag limit its queued finals are withdrawn
        (those already decoding still arrive), so a session that has left cannot keep the decoders."""
        oldest = self.decoding.oldest_awaiting()
        if self._abandoned or oldest is None:
            return
        lag = time.monotonic() - oldest[1]
        if lag < self.services.lag_limit_s:
            return
        self._abandoned = True
        withdrawn = self.decoding.withdraw_queued()
        await self._give_up(ErrorCode.PROCESSING_LAG, f"processing_lag {lag:.1f} s", f"transcription is {lag:.1f} s "
                            f"behind the audio (limit {self.services.lag_limit_s:g} s) after end; {len(withdrawn)} "
                            f"queued utterance(s) withdrawn: {withdrawn[:20]}")

    async def _room_for_finals(self) -> None:
        """Backpressure: while this session has ``max_pending_finals`` final decodes unsettled, stop reading
        its messages (TCP then slows the client) instead of queueing more decodes. A flush storm or a
        fast upload so holds at most that many jobs in the shared queue."""
        if await self.decoding.room_for_finals(max(1, self.services.max_pending_finals), lambda: self._finished):
            self._last_message = time.monotonic()  # waiting on us is not the client idling
