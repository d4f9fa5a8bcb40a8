"""JSON sender: writes the server → client messages (built in :mod:`host.protocol`) to a socket.

:class:`Sender` never raises when the client has gone away, so a disconnect never interrupts
finalizing (and recording) a session.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from host.frontdoor import close_now
from host.protocol import INVALID_CONFIG, Close, ConfigError, ErrorCode, error

log = logging.getLogger(__name__)


class Sender:
    """Writes JSON messages to one WebSocket; counts what it sent."""

    def __init__(self, ws):
        self.ws = ws
        self.gone = False
        self.sent: dict[str, int] = {}

    async def send(self, message: dict[str, Any]) -> bool:
        """Send ``message``; False (and nothing raised) when the client is gone."""
        if self.gone:
            return False
        if self.ws.state is not State.OPEN:
            # The client has closed (or we have). websockets would make this send wait up to the
            # close timeout for the TCP connection to end, which it cannot while the socket's reading
            # is paused behind the messages this session has yet to read: a 10 s stall that held the
            # slot. The session reads on and finalizes; nothing more is sent.
            self.gone = True
            return False
        try:
            await send_message(self.ws, message)
        except ConnectionClosed:
            self.gone = True
            return False
        kind = message["type"]
        self.sent[kind] = self.sent.get(kind, 0) + 1
        return True

    async def close(self, close: Close, linger: bool = True) -> None:
        """Close the connection; ``linger=False`` does not wait for the peer's close frame."""
        if linger:
            try:
                await self.ws.close(*close)
            except ConnectionClosed:
                pass
        else:
            await close_now(self.ws, *close)
        self.gone = True


async def send_message(ws: Any, message: dict[str, Any]) -> None:
    """Write one native message: a compatibility dialect's connection takes the dict (and translates
    it), a socket its JSON text."""
    native = getattr(ws, "send_message", None)
    if native is not None:
        await native(message)
        return
    try:
        await ws.send(json.dumps(message, ensure_ascii=False))
    except UnicodeEncodeError:  # lone surrogates echoed from client input: send them escaped
        await ws.send(json.dumps(message))


async def refuse_config(conn: Any, exc: ConfigError) -> None:
    """Turn a session away for a bad connect-time parameter: a non-recoverable ``invalid_config``
    naming it, then close 1008 (worker and router alike)."""
    try:
        await send_message(conn, error(ErrorCode.INVALID_CONFIG, str(exc), recoverable=False, param=exc.param))
    except ConnectionClosed:
        pass  # the close below finds the connection gone
    await close_now(conn, *INVALID_CONFIG)
