"""The front door shared by the worker and the router: the HTTP checks every request passes
before any handler sees it, the limits on what one connection may buffer, and closing a
connection without waiting on its peer.

Why this module exists: a request that carries two ``Authorization`` headers made the
handlers' ``headers.get`` raise, which answered HTTP 500 with a 15-line traceback per request
(an unauthenticated log flood), and on the router leaked a capacity lease. Requests are now
checked once, here, before either the worker or the router reads a header.

The server both roles share, which applies these pieces to every request, is
:class:`host.door.FrontDoor` (a module of its own: :mod:`host.sender` imports this one).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

log = logging.getLogger(__name__)

SESSION_PATHS = ("/session", "/v1/audio/transcriptions/stream")
"""Native session paths; the worker gives the second Dalston's SDK field names (host/compat/dalston.py)."""

SINGLE_VALUED = ("Authorization", "Upgrade", "Host", "xi-api-key", "Sec-WebSocket-Key", "Sec-WebSocket-Version")
"""Headers a request may carry at most once; a second copy is refused with 400 (the handlers
read each of them as one value)."""

EARLY_BYTES_LIMIT = 64 * 1024
"""Bytes a client may send after its handshake request and before the server answered it
(RFC 6455 §4.1 says none); past this the connection is dropped."""

MAX_QUEUE = 4
"""Received messages a connection buffers before the server stops reading from its socket.
websockets' default of 16, times the 4 MiB largest message, let one connection that the server
was closing pin 64-72 MiB (measured: 20 such connections took a worker from 568 to 1238 MB RSS)."""

REFUSAL_CLOSE_TIMEOUT_S = 2.0
"""A connection turned away (bad path, at capacity, draining, invalid config) or presumed gone (idle
timeout) gets its close frame and the server's FIN at once; whatever it sends afterwards is read and
dropped unbuffered, and the socket is cut this long after if the peer never closes its side."""


def check_request(request: Request, peer: str) -> Response | None:
    """A response refusing a malformed request (405 for methods other than GET, 400 for a
    duplicated single-valued header), or ``None`` when the request may go on. One log line each."""
    if request.method != "GET":
        log.info("refused %s %s from %s: method not allowed", request.method[:16], request.path[:100], peer)
        response = json_response(405, {"error": "method_not_allowed",
                                       "message": f"{request.method[:16]} is not supported; use GET"})
        response.headers["Allow"] = "GET"
        return response
    for name in SINGLE_VALUED:
        if len(request.headers.get_all(name)) > 1:
            log.info("refused a request for %s from %s: duplicate %s header", request.path[:100], peer, name)
            return json_response(400, {"error": "bad_request", "message": f"duplicate {name} header"})
    return None


def peer_of(connection: Any) -> str:
    """The client's address as a string, or ``""`` when the socket has none."""
    address = getattr(connection, "remote_address", None)
    return str(address[0]) if address else ""


def is_upgrade(request: Request) -> bool:
    """Whether the request asks for a WebSocket (call after :func:`check_request`)."""
    return request.headers.get("Upgrade", "").lower() == "websocket"


class FrontDoorConnection(ServerConnection):
    """A server connection that holds the bytes following its handshake request until the
    request has been answered.

    websockets parses such bytes as frames at once; for a pipelined second HTTP request that
    fails the frame parser, which half-closes the socket before the response is written and
    ends in an AssertionError traceback. Held bytes are replayed once the upgrade succeeded and
    dropped when the request was refused; more than :data:`EARLY_BYTES_LIMIT` drops the connection.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_tail = b""  # the last bytes of the head so far: a terminator may span two reads
        self._held: bytearray | None = bytearray()

    def data_received(self, data: bytes) -> None:
        if self._held is None:
            super().data_received(data)
            return
        if self._in_head:
            window = self._head_tail + data
            end = window.find(b"\r\n\r\n")
            if end < 0:
                self._head_tail = window[-3:]
                super().data_received(data)
                return
            cut = end + 4 - len(self._head_tail)
            self._in_head = False
            super().data_received(data[:cut])
            data = data[cut:]
        if not data:
            return
        if len(self._held) + len(data) > EARLY_BYTES_LIMIT:
            self._held = None
            self.transport.abort()
            return
        self._held += data

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            held, self._held = self._held, None
            if held and self.protocol.state is State.OPEN:
                super().data_received(bytes(held))


def lost_without_close(ws: Any) -> bool:
    """Whether ``ws`` was lost rather than closed by its peer: no close frame came from it (a TCP reset,
    a network gone, a keepalive timeout). A dialect's connection (no ``protocol``) never counts as lost."""
    protocol = getattr(ws, "protocol", None)
    return protocol is not None and getattr(protocol, "close_rcvd", None) is None


async def close_now(ws: Any, code: int, reason: str = "") -> None:
    """Close without waiting on the peer: send the close frame and FIN, then discard what it sends.

    This is websockets' "fail the connection" (RFC 6455 §7.1.7), with a close code the client sees.
    Waiting for the peer's close frame instead kept a capacity slot, or up to 72 MiB of frames the
    peer pushed meanwhile, for the 10 s close timeout. Aborting the socket instead (the first
    version) made the kernel answer a client that was still sending audio with a reset, which can
    destroy the close frame and the error before it: a legitimate client then saw 1006 and no
    ``invalid_config``."""
    inner = getattr(ws, "ws", ws)  # a dialect connection wraps the socket
    inner.close_timeout = REFUSAL_CLOSE_TIMEOUT_S
    try:
        async with inner.send_context():
            inner.protocol.fail(code, reason)
    except Exception:  # noqa: BLE001 - ConnectionClosed is the goal; after anything else it is gone too
        pass


def serve_options(max_frame_bytes: int, ping_interval_s: float | None) -> dict[str, Any]:
    """Keyword arguments for websockets' ``serve`` shared by the worker and the router."""
    return {
        "create_connection": FrontDoorConnection,
        # Frames above max_frame_bytes get a recoverable error; only absurd ones are cut off.
        "max_size": max(4 * max_frame_bytes, 1 << 20),
        "max_queue": MAX_QUEUE,
        "ping_interval": ping_interval_s or None,
        "ping_timeout": ping_interval_s or None,
        "compression": None,
    }


def bound_port(server: Server | None, configured: int) -> int:
    """The port a server listens on (the real one when ``configured`` was 0)."""
    return configured if server is None else server.sockets[0].getsockname()[1]


def static_response(content_type: str, body: bytes) -> Response:
    """A static file (the demo page)."""
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache")])
    return Response(200, "OK", headers, body)


def unauthorized() -> Response:
    """401 with the ways to present a key."""
    response = json_response(401, {"error": "unauthorized",
                                   "message": "an API key is required: Authorization: Bearer KEY or ?api_key=KEY"})
    response.headers["WWW-Authenticate"] = 'Bearer realm="engine-host"'
    return response


def json_response(status: int, body: Any) -> Response:
    """A JSON body; the connection closes after it (no keep-alive, so nothing is pipelined)."""
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-store"), ("Connection", "close")])
    return Response(status, HTTPStatus(status).phrase, headers, data)


async def registry_call(call: Any) -> tuple[Any, Response | None]:
    """Await a registry read for an HTTP answer: (result, None), or (None, a 503 saying why)."""
    try:
        return await call, None
    except Exception as exc:  # noqa: BLE001 - the registry is down: say so
        return None, json_response(503, {"error": f"registry unavailable: {type(exc).__name__}: {exc}"})


__all__ = [
    "EARLY_BYTES_LIMIT",
    "MAX_QUEUE",
    "SESSION_PATHS",
    "FrontDoorConnection",
    "bound_port",
    "check_request",
    "close_now",
    "is_upgrade",
    "json_response",
    "peer_of",
    "serve_options",
    "static_response",
    "unauthorized",
]
