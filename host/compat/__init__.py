"""Compatibility endpoints: other vendors' realtime speech-to-text protocols on the same pipeline.

A :class:`Dialect` translates one vendor's protocol to the native ``/session``
protocol and back; :class:`DialectConnection` wraps the client's WebSocket with
it, so :class:`host.session.Session` runs unchanged: it reads native messages
(binary audio, JSON ``config``/``flush``/``clear``/``end``) and sends native
JSON messages, which the dialect turns into the vendor's events. There is no
second pipeline.

A dialect is a plugin component: ``register_dialect`` registers its factory with the URL path it
serves (the bundled ones are built-in plugins, registered like a third party's), and
:func:`dialect_routes` gives the worker and the router the path → factory table.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from websockets.exceptions import ConnectionClosed

Native = bytes | dict[str, Any] | str
"""A message for the session: binary audio, or a native control message (``config``, ``flush``,
``clear``, ``end``) as a dict (JSON text is accepted too)."""


class Dialect(Protocol):
    """One vendor protocol, for one connection (dialects may keep per-session state)."""

    def configure(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
        """The native ``/session`` query parameters for this connection's vendor parameters.

        Raise :class:`host.protocol.ConfigError` for a bad vendor parameter.
        """
        ...

    def incoming(self, message: str | bytes) -> tuple[list[Native], list[dict[str, Any]]]:
        """A client message in the vendor's protocol → (native messages for the session,
        vendor messages to answer at once, e.g. an ack or the vendor's error shape)."""
        ...

    def outgoing(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """A native server message → the vendor messages to send (maybe none)."""
        ...


class DeferredDialect(Dialect, Protocol):
    """A dialect whose :meth:`configure` may return ``None``: it must see the client's first
    messages (a container header in the audio) before it knows the native parameters."""

    def configure_early(self, messages: list[str | bytes]) -> dict[str, str] | None:
        """The native query once ``messages`` (everything received so far) decide it, else ``None``.

        Raise :class:`host.protocol.ConfigError` when they show the audio cannot be served.
        """
        ...


@runtime_checkable
class PreUpgradeDialect(Dialect, Protocol):
    """A dialect whose vendor checks the connect query before the WebSocket upgrade and answers a bad
    one with an HTTP error instead of a 101 (Deepgram). The front door creates it while it answers the
    handshake, asks it these, and hands the same object to the session."""

    def preflight(self, query: Mapping[str, str], headers: Mapping[str, str]) -> dict[str, str]:
        """The native ``/session`` parameters the connect query decides (a deferred dialect's lack the
        audio format: the session's defaults stand in for it in the check).

        Raise :class:`host.protocol.ConfigError` for a bad vendor parameter.
        """
        ...

    def handshake_headers(self) -> dict[str, str]:
        """Headers every handshake response on the dialect's path carries, the 101 included."""
        ...

    def http_error(self, status: int, text: str) -> tuple[dict[str, str], dict[str, Any]]:
        """(extra headers, JSON body) of the HTTP ``status`` refusing the handshake because of ``text``."""
        ...


CHUNK_BYTES = 64 * 1024
"""Decoded audio is handed to the session in pieces of at most this size (below max_frame_bytes)."""


class BadMessage(Exception):
    """A client message a dialect refuses; the dialect answers it in its vendor's error shape.

    ``kind`` says what was wrong: ``binary`` (a binary frame where only JSON is expected),
    ``invalid_json``, ``not_object``.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def parse_json_object(raw: str | bytes, binary_hint: str = "") -> dict[str, Any]:
    """One JSON text frame as an object; :class:`BadMessage` for anything else.

    Lone surrogates in strings are replaced (they could not be echoed back as UTF-8), and
    the native nesting limit applies, so the answer never depends on the parser's recursion.
    ``binary_hint`` is the message for a binary frame that is not UTF-8 JSON (say where audio goes).
    """
    from host.protocol import MAX_JSON_DEPTH, nested_deeper_than

    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage("binary", binary_hint or "a binary frame that is not UTF-8 JSON") from None
    if nested_deeper_than(raw, MAX_JSON_DEPTH):
        raise BadMessage("invalid_json", f"the message is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadMessage("invalid_json", f"the message is not valid JSON: {str(exc)[:200]}") from None
    if "\\u" in raw:
        message = scrub(message)
    if not isinstance(message, dict):
        raise BadMessage("not_object", "a message must be a JSON object")
    return message


def decode_base64(value: str) -> bytes:
    """Standard base64 (whitespace ignored); ``ValueError`` when it is not."""
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def audio_frames(data: bytes) -> list[bytes]:
    """Decoded audio as native binary frames of at most :data:`CHUNK_BYTES`."""
    return [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]


class Query(dict):
    """A query string's parameters: the last value of each name (as the native protocol reads them),
    and in :attr:`lists` every value, for vendor parameters that repeat (Deepgram's ``keyterm``)."""

    def __init__(self, pairs: list[tuple[str, str]]):
        super().__init__(pairs)
        self.lists: dict[str, list[str]] = {}
        for name, value in pairs:
            self.lists.setdefault(name, []).append(value)


def query_values(query: Mapping[str, str], name: str) -> list[str]:
    """Every value of a repeatable parameter ``name`` (the last one alone where ``query`` kept no others)."""
    lists = getattr(query, "lists", None)
    if isinstance(lists, dict) and name in lists:
        return list(lists[name])
    return [query[name]] if name in query else []


MAX_KEYTERMS_CHARS = 500
"""The default engine's ``keyterms`` parameter holds at most this much (its ``maxLength``)."""


def keyterms(terms: list[str], param: str) -> str:
    """Vendor keyterms as the native comma-separated ``keyterms`` (commas inside a term become spaces);
    :class:`host.protocol.ConfigError` naming ``param`` when they are too long together."""
    from host.protocol import ConfigError

    cleaned = [" ".join(t.replace(",", " ").split()) for t in terms]
    joined = ",".join(t for t in cleaned if t)
    if len(joined) > MAX_KEYTERMS_CHARS:
        raise ConfigError(param, f"keyterms of {len(joined)} characters together; at most {MAX_KEYTERMS_CHARS}")
    return joined


def query_flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    """A vendor's boolean query parameter (``true``/``false``/``1``/``0``; absent or empty: ``default``)."""
    from host.protocol import ConfigError

    value = query.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise ConfigError(name, f"expected true or false, got {value!r}")


def scrub(value: Any) -> Any:
    """``value`` with lone surrogates in its strings replaced (they cannot be sent back as UTF-8)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    return value


def dialect_routes(plugins: Any) -> dict[str, Callable[[], Dialect]]:
    """URL path → the factory of that path's :class:`Dialect` (one per connection), from the
    dialect components of a :class:`host.plugins.PluginSet`."""
    return {path: component.factory for path, component in plugins.dialects().items()}


class DialectConnection:
    """The client's WebSocket as the session sees it: native messages in, native messages out."""

    def __init__(self, ws, dialect: Dialect):
        self.ws = ws
        self.dialect = dialect
        self.request = ws.request
        self.last_activity = time.monotonic()
        """Any client message counts (e.g. a vendor keep-alive that maps to no native message)."""
        self._early: list[str | bytes] = []  # read before the session started; replayed first

    async def open(self, query: Mapping[str, str], timeout: float = 30.0,
                   max_early: int = 64) -> dict[str, str] | None:
        """Configure the dialect: the native ``/session`` query, or ``None`` if the client left first.

        A deferred dialect gets the client's first messages until they decide the parameters (at
        most ``max_early`` messages, ``timeout`` seconds); they are replayed to the session after.
        Raises :class:`host.protocol.ConfigError` for bad vendor parameters.
        """
        from host.protocol import ConfigError

        native = self.dialect.configure(query, self.request.headers)
        while native is None:
            if len(self._early) >= max_early:
                raise ConfigError("", f"no audio in the first {max_early} messages to tell its format from")
            try:
                self._early.append(await asyncio.wait_for(self.ws.recv(), timeout))
            except TimeoutError:
                raise ConfigError("", f"no audio within {timeout:g} s to tell its format from") from None
            except ConnectionClosed:
                return None
            self.last_activity = time.monotonic()
            native = self.dialect.configure_early(list(self._early))
        return native

    async def __aiter__(self) -> AsyncIterator[Native]:
        early, self._early = self._early, []
        for raw in early:
            for native in await self._translate(raw):
                yield native
        async for raw in self.ws:
            self.last_activity = time.monotonic()
            for native in await self._translate(raw):
                yield native

    async def _translate(self, raw: str | bytes) -> list[Native]:
        """One client message: its immediate vendor replies are sent, its native messages returned."""
        natives, replies = self.dialect.incoming(raw)
        for reply in replies:
            await self._send_vendor(reply)
        return natives

    async def send_message(self, native: dict[str, Any]) -> None:
        """A native message from the session, translated into the vendor's."""
        for message in self.dialect.outgoing(native):
            await self._send_vendor(message)

    async def send(self, text: str) -> None:
        """A native message as JSON text (what the router relays from a worker)."""
        await self.send_message(json.loads(text))

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

    async def ping(self) -> Any:
        """A keepalive ping on the client's socket; the waiter of its pong."""
        return await self.ws.ping()

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


__all__ = [
    "CHUNK_BYTES",
    "BadMessage",
    "ConnectionClosed",
    "DeferredDialect",
    "Dialect",
    "DialectConnection",
    "Native",
    "PreUpgradeDialect",
    "audio_frames",
    "decode_base64",
    "dialect_routes",
    "parse_json_object",
    "query_flag",
    "scrub",
]
