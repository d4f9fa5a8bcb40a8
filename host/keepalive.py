"""A session's WebSocket keepalive, which knows when a late pong is the server's own doing.

websockets' built-in keepalive drops a peer whose pong is not back within the timeout. But a pong
travels in the same TCP stream as the client's audio and control frames, behind them; while a
session withholds reading (backpressure: its finals are behind), the pong waits behind frames the
server chose not to read. The built-in keepalive then dropped live clients, with 1011 and no
``session.end``: a flush storm under load, and as well an upload whose decodes waited behind
real-time sessions. Here the wait for a pong restarts while the session is backlogged, so only a
peer that stays silent while the server reads it is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.exceptions import ConnectionClosed

log = logging.getLogger(__name__)

POLL_S = 0.25
"""How often a missing pong is checked against the backlog."""


class Keepalive:
    """Pings ``ws`` every ``interval_s``; calls ``on_dead`` once a pong is ``interval_s`` late while
    the session is not ``backlogged()``."""

    def __init__(self, ws: Any, interval_s: float, backlogged: Callable[[], bool],
                 on_dead: Callable[[], Awaitable[None]]):
        self.ws = ws
        self.interval_s = interval_s
        self.backlogged = backlogged
        self.on_dead = on_dead
        self.pings = 0
        """Pings sent so far."""
        self.excused = 0
        """Intervals a pong was overdue while the session was backlogged (each one waited out, not fatal)."""

    async def run(self) -> None:
        """Until the connection closes, or the peer is found dead."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                waiter = await self.ws.ping()
            except ConnectionClosed:
                return
            self.pings += 1
            if not await self._answered(waiter):
                await self.on_dead()
                return
            if waiter.cancelled() or waiter.exception() is not None:
                return  # the connection closed while waiting

    async def _answered(self, waiter: asyncio.Future) -> bool:
        """Wait for the pong; False when it is ``interval_s`` late without a backlog to excuse it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.interval_s
        while not waiter.done():
            await asyncio.wait([waiter], timeout=POLL_S)
            if waiter.done() or loop.time() < deadline:
                continue
            if not self.backlogged():
                return False
            self.excused += 1  # the pong may be queued behind frames the session does not read yet
            deadline = loop.time() + self.interval_s
        return True
