"""Compatibility endpoints: other vendors' realtime speech-to-text protocols on the same pipeline.

A :class:`Dialect` translates one vendor's protocol to the native ``/session``
protocol and back; :class:`DialectConnection` wraps the client's WebSocket with
it, so :class:`host.session.Session` runs unchanged: it reads native messages
(binary audio, JSON ``config``/``flush``/``clear``/``end``) and sends native
JSON messages, which the dialect turns into the vendor's events. There is no
second pipeline.

A dialect module registers itself in :data:`DIALECTS` by path.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Callable, Mapping, Protocol

from websockets.exceptions import ConnectionClosed


class Dialect(Protocol):
    """One vendor protocol, for one connection (dialects may keep per-session state)."""

    def configure(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
        """The native ``/session`` query parameters for this connection's vendor parameters.

        Raise :class:`host.session_config.ConfigError` for a bad vendor parameter.
        """
        ...

    def incoming(self, message: str | bytes) -> tuple[list[str | bytes], list[dict[str, Any]]]:
        """A client message in the vendor's protocol → (native messages for the session,
        vendor messages to answer at once, e.g. an ack or the vendor's error shape)."""
        ...

    def outgoing(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """A native server message → the vendor messages to send (maybe none)."""
        ...


DIALECTS: dict[str, Callable[[], Dialect]] = {}
"""Path → dialect factory. Filled by :func:`load_dialects`."""


def load_dialects() -> dict[str, Callable[[], Dialect]]:
    """Import the bundled dialect modules (each adds itself to :data:`DIALECTS`)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return DIALECTS


class DialectConnection:
    """The client's WebSocket as the session sees it: native messages in, native messages out."""

    def __init__(self, ws, dialect: Dialect):
        self.ws = ws
        self.dialect = dialect
        self.request = ws.request
        self.last_activity = time.monotonic()
        """Any client message counts (e.g. a vendor keep-alive that maps to no native message)."""

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        async for raw in self.ws:
            self.last_activity = time.monotonic()
            natives, replies = self.dialect.incoming(raw)
            for reply in replies:
                await self._send_vendor(reply)
            for native in natives:
                yield native

    async def send(self, text: str) -> None:
        """A native JSON message from the session (``Sender`` serializes it)."""
        for message in self.dialect.outgoing(json.loads(text)):
            await self._send_vendor(message)

    async def _send_vendor(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, (str, bytes)):
            await self.ws.send(message)
            return
        try:
            await self.ws.send(json.dumps(message, ensure_ascii=False))
        except UnicodeEncodeError:  # lone surrogates echoed from client input: send them escaped
            await self.ws.send(json.dumps(message))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    @property
    def close_code(self):
        return self.ws.close_code

    @property
    def close_reason(self):
        return self.ws.close_reason

    @property
    def state(self):
        return self.ws.state

    @property
    def remote_address(self):
        return self.ws.remote_address


__all__ = ["ConnectionClosed", "DIALECTS", "Dialect", "DialectConnection", "load_dialects"]
