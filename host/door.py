"""The one front door the worker and the router both are: a websockets server whose HTTP requests
and WebSocket handshakes go through the same checks before either role sees them.

:class:`FrontDoor` owns what used to be two copies: the API keys, ``serve()``'s setup, the request
routing (malformed requests, the key check on session handshakes, static files, 404) and the
handshake preamble (``/health`` over WebSocket, the path and dialect lookup, query parsing). A role
adds its HTTP paths (:meth:`FrontDoor.answer_http`), its health, when it turns sessions away
(:meth:`FrontDoor.refusal`) and what a session is (:meth:`FrontDoor.serve_session`).

The low-level pieces (request checks, connection class, close_now, responses) are in
:mod:`host.frontdoor`; this module is separate because :mod:`host.sender` imports that one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from typing import Any, Generic, TypeVar
from urllib.parse import SplitResult, parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from host import protocol as msg
from host.auth import ApiKeyError, ApiKeys
from host.compat import DialectConnection, PreUpgradeDialect, Query, dialect_routes
from host.contracts import LoadContext
from host.frontdoor import (
    SESSION_PATHS,
    bound_port,
    check_request,
    close_now,
    is_upgrade,
    json_response,
    peer_of,
    serve_options,
    static_response,
    unauthorized,
)
from host.plugins import PluginSet, load_plugins
from host.protocol import Close, ConfigError
from host.registry import RegistryConfigError
from host.registry_config import open_registry
from host.sender import refuse_config
from host.settings import ServerSettings
from host.static import load_static

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServerSettings)


class FrontDoor(Generic[S]):
    """A worker's or a router's server: settings, plugins, API keys and the listening socket."""

    start_error: type[Exception] = RuntimeError
    """What the role raises when it cannot start (bad API key file, registry misconfigured)."""

    def __init__(self, settings: S, plugins: PluginSet | None = None):
        self.settings = settings
        self.plugins = plugins if plugins is not None else load_plugins()
        self.dialects = dialect_routes(self.plugins)
        """URL path → dialect factory: /v1/realtime (OpenAI), /v1/speech-to-text/realtime (ElevenLabs),
        /v1/listen (Deepgram), and any a plugin registers."""
        self.static: dict[str, tuple[str, bytes]] = {}
        self._server: Server | None = None
        self._vendors: weakref.WeakKeyDictionary[ServerConnection, PreUpgradeDialect] = weakref.WeakKeyDictionary()
        """The dialect made while a handshake was answered, for the session it upgrades to."""
        try:
            self.api_keys = ApiKeys.load(settings.api_keys, settings.api_keys_file or None)
        except ApiKeyError as exc:
            raise self.start_error(str(exc)) from None

    def session_dialect(self, path: str) -> tuple[bool, Any]:
        """Whether ``path`` opens a session, and the dialect factory it speaks (None: native ``/session``).
        The one place the host looks dialects up."""
        dialect = self.dialects.get(path)
        return path in SESSION_PATHS or dialect is not None, dialect

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when the settings said 0)."""
        return bound_port(self._server, self.settings.port)

    async def listen(self, ping_interval_s: float | None) -> None:
        """Load the static files and open the port: HTTP to :meth:`_http`, WebSockets to :meth:`_handle`."""
        self.static = await asyncio.to_thread(load_static)
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            process_request=self._http,
            process_response=self._respond,
            **serve_options(self.settings.max_frame_bytes, ping_interval_s),
        )

    async def open_registry(self, context: LoadContext, **derived: Any) -> tuple[str, object]:
        """The configured registry component and its name (see :mod:`host.registry_config`)."""
        try:
            return await open_registry(self.plugins, self.settings, context, **derived)
        except RegistryConfigError as exc:
            raise self.start_error(f"{exc}{self.registry_hint()}") from None

    def registry_hint(self) -> str:
        """Appended to a registry configuration error."""
        return ""

    # --- what a role adds ------------------------------------------------------------

    async def answer_http(self, path: str, headers: Headers, query: str) -> Response | None:
        """The response for a plain GET of ``path``, or None for the static files and 404."""
        return None

    async def health_answer(self) -> tuple[int, dict]:
        """(HTTP status, body) of ``/health``."""
        raise NotImplementedError

    def refusal(self) -> Close | None:
        """The close a session handshake gets right away (not ready, draining), or None."""
        return None

    def count_refusal(self, reason: str) -> None:
        """A request or session was turned away for ``reason`` (bad_request, unauthorized, ...)."""

    async def check_native(self, native: dict[str, str]) -> None:
        """Raise :class:`ConfigError` when no session could start with the native query ``native``
        (asked before the upgrade, for dialects whose vendor refuses bad parameters there)."""

    async def serve_session(self, ws: ServerConnection, url: SplitResult, query: dict[str, str],
                            dialect: Any) -> None:
        """Run one session whose handshake passed the front door."""
        raise NotImplementedError

    # --- the shared request routing ---------------------------------------------------

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        refused = check_request(request, peer_of(connection))
        if refused is not None:
            self.count_refusal("bad_request")
            return refused
        url = urlsplit(request.path)
        if is_upgrade(request):
            return await self._upgrade(connection, request, url)
        response = await self.answer_http(url.path, request.headers, url.query)
        if response is not None:
            return response
        if url.path in self.static:
            return static_response(*self.static[url.path])
        return json_response(404, {"error": "not found", "path": url.path})

    async def _upgrade(self, connection: ServerConnection, request: Request, url: SplitResult) -> Response | None:
        """A refusal of a session handshake (bad key; bad connect parameters where the dialect's vendor
        refuses them before the upgrade), or None: it goes on to _handle, bad paths included (close 1008)."""
        is_session, factory = self.session_dialect(url.path)
        if not is_session:
            return None
        vendor = self._vendor(connection, factory)
        if not self.api_keys.allows(request.headers, url.query):
            self.count_refusal("unauthorized")
            return unauthorized() if vendor is None else vendor_response(vendor, 401, "an API key is required")
        return None if vendor is None else await self._preflight(vendor, request, url)

    def _vendor(self, connection: ServerConnection, factory: Any) -> PreUpgradeDialect | None:
        """The handshake's dialect if its vendor refuses before the upgrade (kept for the session), else None."""
        made = factory() if factory is not None else None
        if not isinstance(made, PreUpgradeDialect):
            return None
        self._vendors[connection] = made
        return made

    async def _preflight(self, vendor: PreUpgradeDialect, request: Request, url: SplitResult) -> Response | None:
        """400 in the vendor's shape when no session could start with the connect query, else None."""
        try:
            query = Query(parse_qsl(url.query, keep_blank_values=True))
            await self.check_native(vendor.preflight(query, request.headers))
        except ConfigError as exc:
            self.count_refusal("invalid_config")
            return vendor_response(vendor, 400, str(exc))
        return None

    def _respond(self, connection: ServerConnection, request: Request, response: Response) -> None:
        """Add a vendor dialect's headers to its handshake's answer, refusals and the 101 alike."""
        vendor = self._vendors.get(connection)
        if vendor is None:
            return
        if response.status_code != 101:
            del self._vendors[connection]  # no session follows
        for name, value in vendor.handshake_headers().items():
            response.headers[name] = value

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handshake is done
        url = urlsplit(ws.request.path)
        if url.path == "/health":
            _, body = await self.health_answer()
            await ws.send(json.dumps(body))
            await ws.close(*msg.NORMAL)
            return
        is_session, dialect = self.session_dialect(url.path)
        if not is_session:
            await close_now(ws, *msg.INVALID_PATH)
            return
        refusal = self.refusal()
        if refusal is not None:
            await close_now(ws, *refusal)
            return
        await self.serve_session(ws, url, Query(parse_qsl(url.query, keep_blank_values=True)), dialect)

    async def open_dialect(self, ws: ServerConnection, dialect: Any, query: dict[str, str],
                           timeout: float = 30.0) -> tuple[Any, dict[str, str] | None]:
        """The client as a session sees it and its native ``/session`` query.

        For a vendor dialect that is a :class:`DialectConnection` translating both ways and the
        query its parameters map to; the query is None when the client left before its audio showed
        the format, or when its parameters were invalid (it has its invalid_config error then).
        """
        if dialect is None:
            return ws, query
        # A dialect refusing before the upgrade was made then: its request id is in the 101 already.
        conn = DialectConnection(ws, self._vendors.pop(ws) if ws in self._vendors else dialect())
        try:
            return conn, await conn.open(query, timeout=timeout)
        except ConfigError as exc:
            await self.refuse_config(conn, exc)
            return conn, None

    async def refuse_config(self, conn: Any, exc: ConfigError) -> None:
        """Send invalid_config and close."""
        self.count_refusal("invalid_config")
        await refuse_config(conn, exc)


def vendor_response(vendor: PreUpgradeDialect, status: int, text: str) -> Response:
    """The HTTP ``status`` refusing a handshake in the dialect vendor's shape."""
    headers, body = vendor.http_error(status, text)
    response = json_response(status, body)
    for name, value in headers.items():
        response.headers[name] = value
    return response
