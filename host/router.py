"""The session router (``engine-host route``): one WebSocket front door for many workers.

For each client session the router reads the live workers from a shared
registry (a :class:`~host.contracts.WorkerDirectory`, e.g. the Redis plugin),
keeps those that serve the requested ``engine``/``model``/``language``, ranks
them by free capacity, reserves a slot atomically and proxies the session
frame by frame, query string and ``Authorization`` header included. The
client sees the worker's protocol unchanged.

- A worker that refuses (close 1013) or cannot be reached is skipped for the
  next candidate, and the router avoids an unreachable one until it
  heartbeats again.
- No candidate left: close 1013, like a full worker.
- A dialect whose vendor refuses bad connect parameters before the upgrade (Deepgram's HTTP 400)
  has them checked against the engines the workers registered, with the workers' own validation.
- A worker that dies mid-session (its connection drops, or it misses the router's pings): the session
  fails over to another worker (host/relay.py): opened there on the same timeline, the client's audio
  since its last final replayed, a recoverable ``warning{code:"worker_lost"}`` to the client, and its
  finals go on. Only when no worker takes it: ``error{code:"worker_lost"}`` and a ``session.end`` built
  from the finals already relayed, then close 1011.
- Resume (docs/protocol.md, "Resume"): ``resumable`` goes to the worker; a client connection lost
  without a close frame drops the worker's connection the same way, so the worker parks the session;
  ``?resume=<token>&last_seq=<n>`` on any router finds the worker holding it through the registry's
  token record (:class:`~host.registry.ResumeDirectory`) and relays the resume there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.http11 import Response

from host import __version__
from host import protocol as msg
from host.contracts import LoadContext, WorkerDirectory, WorkerRecord
from host.door import FrontDoor
from host.engines import EngineSpec, Stage
from host.frontdoor import close_now, json_response, peer_of, registry_call, unauthorized
from host.plugins import PluginSet
from host.protocol import Close, ConfigError
from host.registry import ResumeDirectory, call_quietly
from host.relay import Refused, RoutedSession
from host.sender import refuse
from host.session_config import parse_session_config, pick_engine
from host.settings import RouterSettings

log = logging.getLogger(__name__)


class RouterError(Exception):
    """The router cannot start (no shared registry, ...)."""


CLIENT_PING_INTERVAL_S = 20.0
"""WebSocket keepalive pings to clients (``ROUTER_PING_INTERVAL_S`` is for the pings to workers)."""

DEFAULT_MAX_UTTERANCE_S = 30.0
"""An engine's ``max_utterance_s`` where its worker did not register one (the host's default)."""

REPLAY_MARGIN_S = 10.0
"""The replay buffer holds ``max_utterance_s`` plus this: the silence after the last final and an
utterance whose final is still being decoded."""


# --- choosing a worker ------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """What a session asks of its worker, from its query parameters."""

    engine: str | None = None
    model: str | None = None
    language: str | None = None

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Wanted:
        return cls(query.get("engine"), query.get("model"), query.get("language"))

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("engine", self.engine), ("model", self.model), ("language", self.language)) if v]
        return " ".join(parts) or "the default engine"


@dataclass
class Suspects:
    """Workers this router failed to reach, skipped until they heartbeat again or ``hold_s`` passes."""

    hold_s: float
    _seen: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (until, last_heartbeat)

    def add(self, worker: WorkerRecord) -> None:
        self._seen[worker.info.worker_id] = (time.monotonic() + self.hold_s, worker.last_heartbeat)

    def holds(self, worker: WorkerRecord) -> bool:
        entry = self._seen.get(worker.info.worker_id)
        if entry is None:
            return False
        until, heartbeat = entry
        if time.monotonic() >= until or worker.last_heartbeat > heartbeat:
            del self._seen[worker.info.worker_id]
            return False
        return True


def rank(workers: list[WorkerRecord], wanted: Wanted, suspects: Suspects) -> list[WorkerRecord]:
    """Ready workers that serve ``wanted`` and have room, most free capacity first.

    Ties are shuffled so that several routers do not all pick the same worker.
    """
    fit = [w for w in workers
           if w.status.status == "ready" and w.free > 0 and w.serves(wanted.engine, wanted.model, wanted.language)
           and not suspects.holds(w)]
    random.shuffle(fit)
    return sorted(fit, key=lambda w: (-w.free, w.load))


# --- the router ---------------------------------------------------------------------


class Router(FrontDoor[RouterSettings]):
    """The router: client sessions in, each proxied to a worker chosen from the shared registry."""

    start_error = RouterError

    def __init__(self, settings: RouterSettings, plugins: PluginSet | None = None):
        super().__init__(settings, plugins)
        self.directory: WorkerDirectory | None = None
        self.suspects = Suspects(settings.suspect_s)
        self.sessions: set[RoutedSession] = set()
        self.started_at = time.time()
        self._closing = False

    async def start(self) -> None:
        name, directory = await self.open_registry(LoadContext(shared=lambda key, loader: loader(), engine_id=""))
        if not isinstance(directory, WorkerDirectory):
            raise RouterError(f"registry {name!r} cannot list workers for a router (use a shared registry: "
                              "set REGISTRY_URL, or REDIS_URL, to the workers' registry)")
        self.directory = directory
        # Routed sessions ping their clients themselves (host/keepalive.py): a client whose pong waits
        # behind its own frames while the worker holds back reading must not be dropped.
        await self.listen(None)
        log.info("router listening on %s:%d (registry %s)", self.settings.host, self.port, name)

    def registry_hint(self) -> str:
        return "" if self.settings.registry_url else " (set REGISTRY_URL or --registry-url to the workers' registry)"

    async def shutdown(self) -> None:
        """Stop accepting; open sessions are finalized by their workers (session.end) and closed 1001."""
        self._closing = True
        if self._server is not None:
            self._server.close(close_connections=False)
        await asyncio.gather(*(s.end() for s in list(self.sessions)), return_exceptions=True)
        deadline = time.monotonic() + 30
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.directory is not None:
            await call_quietly("close", self.directory.close())
            log.info("router stopped")

    @property
    def _dir(self) -> WorkerDirectory:
        assert self.directory is not None, "the router has started"
        return self.directory

    # --- the front door's questions -------------------------------------------------

    async def answer_http(self, path: str, headers: Headers, query: str) -> Response | None:
        if path == "/health":
            return json_response(*await self.health())
        if path == "/ready":
            return json_response(*await self.readiness())
        if path == "/workers":
            # Internal endpoints and memory: only for key holders when the router has keys.
            if not self.api_keys.allows(headers, query):
                return unauthorized()
            workers, failed = await registry_call(self._dir.workers())
            return failed or json_response(200, [self.describe(w) for w in workers])
        if path == "/engines":
            workers, failed = await registry_call(self._dir.workers())
            return failed or json_response(200, engines_of(workers))
        return None

    async def health_answer(self) -> tuple[int, dict]:
        return await self.health()

    def refusal(self) -> Close | None:
        return msg.ROUTER_DRAINING if self._closing else None

    async def check_native(self, native: dict[str, str]) -> None:
        """The worker's own check (the session's validation) against the engines workers registered:
        bad when every worker with the engine asked for refuses it. Where the registry cannot be read,
        no worker has the engine or one registered too little to tell, the session's routing decides."""
        try:
            workers = await self._dir.workers()
        except Exception:  # noqa: BLE001 - the session's own registry read reports it
            return
        refused: ConfigError | None = None
        for worker in workers:
            specs = {engine: spec_of(description) for engine, description in worker.info.engine_catalog().items()}
            try:
                spec = pick_engine(native, specs)
            except ConfigError:
                continue  # this worker lacks the engine asked for
            if spec is None:
                return  # registered too little to tell: its own check answers after the upgrade
            try:
                parse_session_config(native, spec)
                return  # this worker takes it
            except ConfigError as exc:
                refused = refused or exc
        if refused is not None:
            raise refused

    async def health(self) -> tuple[int, dict]:
        body = {"status": "healthy", "role": "router", "version": __version__,
                "uptime_s": round(time.time() - self.started_at, 1), "active_sessions": len(self.sessions)}
        if self._closing:
            return 503, {**body, "status": "draining"}
        try:
            workers = await self._dir.workers()
        except Exception as exc:  # noqa: BLE001
            return 503, {**body, "status": "registry_unavailable", "error": f"{type(exc).__name__}: {exc}"}
        ready = [w for w in workers if w.status.status == "ready"]
        body.update(workers=len(workers), ready_workers=len(ready), free=sum(w.free for w in ready))
        if not ready:
            body["status"] = "no_workers"
        return 200, body

    async def readiness(self) -> tuple[int, dict]:
        """``GET /ready``: 200 when a ready worker has a free slot, so a session would be placed now; else
        503 and why (``draining``, ``registry_unavailable``, ``no_workers`` or ``full``). ``/health``
        stays 200 without workers: the router itself is alive and answers sessions (1013)."""
        code, health = await self.health()
        body = {k: health[k] for k in ("role", "workers", "ready_workers", "free", "error") if k in health}
        if code != 200 or health["status"] == "no_workers":
            return 503, {"status": health["status"], **body}
        return (200, {"status": "ready", **body}) if health["free"] > 0 else (503, {"status": "full", **body})

    def describe(self, w: WorkerRecord) -> dict:
        return {
            "worker_id": w.info.worker_id, "endpoint": w.info.endpoint, "status": w.status.status,
            "capacity": w.status.capacity, "active_sessions": w.status.active_sessions, "leases": w.leases,
            "free": w.free, "engines": w.info.engines, "models": w.info.models, "languages": w.info.languages,
            "version": w.info.version, "memory": w.status.memory,
            "heartbeat_age_s": round(max(0.0, time.time() - w.last_heartbeat), 2),
            "suspect": self.suspects.holds(w),
        }

    # --- sessions --------------------------------------------------------------

    async def serve_session(self, ws: ServerConnection, url: SplitResult, query: dict[str, str],
                            dialect: Any) -> None:
        client: Any = ws
        target = (url.path, url.query)
        if dialect is None and "resume" in query:
            await self._resume(ws, url, query)
            return
        if dialect is not None:
            # The router speaks the vendor's protocol itself and native /session to the worker,
            # so it sees session.begin and the finals like in any routed session.
            client, native = await self.open_dialect(ws, dialect, query)
            if native is None:
                return  # the client left before its audio showed the format, or has invalid_config
            if query.get("api_key") or query.get("token"):  # the worker checks the key again
                native["api_key"] = query.get("api_key") or query["token"]
            query, target = native, ("/session", urlencode(native))
        # Everything read from the client is read before any capacity is reserved.
        headers = forwarded_headers(ws)
        wanted = Wanted.from_query(query)
        try:
            workers = await self._dir.workers()
        except Exception as exc:  # noqa: BLE001
            log.warning("registry unavailable: %s: %s", type(exc).__name__, exc)
            await close_now(ws, *msg.REGISTRY_UNAVAILABLE)
            return
        attempts = 0
        for worker in rank(workers, wanted, self.suspects):
            if attempts >= self.settings.max_attempts:
                break
            lease = uuid.uuid4().hex
            if not await self._reserve(worker, lease):
                continue  # filled up since we read it (another router, a burst)
            attempts += 1
            try:
                if await self._attempt(client, worker, lease, target, headers):
                    return
            finally:
                # Every way out of an attempt gives the slot back, a failure of ours included:
                # a leaked lease keeps a worker "full" for ROUTER_LEASE_TTL_S.
                await self._release(worker, lease)
        await close_now(ws, *(msg.NO_WORKER if workers else msg.NO_WORKER_REGISTERED))

    async def _attempt(self, client, worker: WorkerRecord, lease: str, target: tuple[str, str],
                       headers: list[tuple[str, str]]) -> bool:
        """Open and relay the session on ``worker``; False to try the next candidate."""
        try:
            upstream, begin = await self._open(client, worker, *target, headers)
        except Refused as exc:
            log.info("worker %s refused a session (%s); trying the next", worker.info.worker_id, exc)
            return False
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            log.warning("worker %s unreachable at %s (%s: %s); trying the next", worker.info.worker_id,
                        worker.info.endpoint, type(exc).__name__, exc)
            self.suspects.add(worker)
            return False
        except ConnectionClosed:
            return True  # the client left while the worker's answer was relayed
        if upstream is not None:  # None: the worker rejected the config; the client has its error and close
            await self._relay(client, upstream, worker, lease, begin, target, headers)
        return True

    async def _resume(self, ws: ServerConnection, url: SplitResult, query: dict[str, str]) -> None:
        """``?resume=<token>&last_seq=<n>``: the worker holding the parked session, found by its token in the
        registry (a :class:`~host.registry.ResumeDirectory`), resumes it; its ``session.resumed``, the
        replay and the rest of the session are relayed. Refusals as the worker's own (docs/protocol.md, "Resume")."""
        token = query.get("resume", "")
        if not isinstance(self._dir, ResumeDirectory):
            await refuse(ws, msg.ErrorCode.INVALID_RESUME, "this router's registry cannot find sessions by resume token",
                         msg.RESUME_REFUSED)
            return
        try:
            record = await self._dir.find_resume(token) if token else None
            workers = await self._dir.workers() if record is not None else []
        except Exception as exc:  # noqa: BLE001
            log.warning("registry unavailable: %s: %s", type(exc).__name__, exc)
            await close_now(ws, *msg.REGISTRY_UNAVAILABLE)
            return
        if record is None:
            await refuse(ws, msg.ErrorCode.INVALID_RESUME, "unknown resume token", msg.RESUME_REFUSED)  # the worker's own answer
            return
        worker = next((w for w in workers if w.info.worker_id == record.get("worker_id")), None)
        if worker is None:
            await refuse(ws, msg.ErrorCode.RESUME_EXPIRED, f"the worker holding this session ({record.get('worker_id')}) "
                         "is gone; start a new session", msg.RESUME_REFUSED)
            return
        headers = forwarded_headers(ws)
        try:
            upstream, first = await self._open(ws, worker, url.path, url.query, headers)
        except Refused as exc:  # draining: like a new session
            await close_now(ws, msg.CloseCode.TRY_AGAIN_LATER, str(exc) or "Server draining")
            return
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            log.warning("resume: worker %s unreachable at %s (%s: %s)", worker.info.worker_id,
                        worker.info.endpoint, type(exc).__name__, exc)
            await refuse(ws, msg.ErrorCode.RESUME_EXPIRED, f"the worker holding this session ({worker.info.worker_id}) "
                         "cannot be reached; start a new session", msg.RESUME_REFUSED)
            return
        except ConnectionClosed:
            return  # the client left while the worker's answer was relayed
        if upstream is None:
            return  # refused (resume_in_use, ...): the client has the worker's error and close
        # What the relay needs of the session's session.begin, from the worker's record of it.
        begin = {"type": "session.begin", "session_id": first.get("session_id") or record.get("session_id"),
                 "engine": record.get("engine"), "config": record.get("config") or {},
                 "seq": first.get("last_seq") or 0, "resume_token": token}
        log.info("session %s resumed on %s through this router after seq %s", begin["session_id"],
                 worker.info.worker_id, begin["seq"])
        await self._relay(ws, upstream, worker, None, begin, (url.path, url.query), headers, first=first)

    async def _reserve(self, worker: WorkerRecord, lease: str) -> bool:
        try:
            return await self._dir.reserve(worker.info.worker_id, lease, self.settings.lease_ttl_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("reservation on %s failed: %s: %s", worker.info.worker_id, type(exc).__name__, exc)
            return False

    async def _release(self, worker: WorkerRecord, lease: str) -> None:
        await call_quietly("release", self._dir.release(worker.info.worker_id, lease))

    async def _open(self, ws, worker: WorkerRecord, path: str, query: str,
                    headers: list[tuple[str, str]]) -> tuple[ClientConnection | None, dict]:
        """Connect to the worker and wait for session.begin.

        Returns (None, {}) when the worker rejected the session for a reason the
        client must see (e.g. invalid_config): that message and the close are relayed.
        """
        try:
            upstream = await self._dial(worker, path, query, headers)
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                await close_now(ws, *msg.UNAUTHORIZED)
                return None, {}
            raise
        began = False
        try:
            upstream_or_none, begin = await self._await_begin(ws, upstream)
            began = upstream_or_none is not None
            return upstream_or_none, begin
        finally:
            if not began:
                await upstream.close()

    async def _dial(self, worker: WorkerRecord, path: str, query: str, headers: list[tuple[str, str]]) -> ClientConnection:
        """A WebSocket to ``worker`` for a session, with the router's keepalive and limits."""
        target = worker.info.endpoint.rstrip("/") + path + (f"?{query}" if query else "")
        return await connect(target, additional_headers=headers, open_timeout=self.settings.connect_timeout_s,
                             ping_interval=self.settings.ping_interval_s,
                             ping_timeout=2 * self.settings.ping_interval_s,
                             max_size=None, compression=None, close_timeout=5)

    async def _first(self, upstream: ClientConnection) -> tuple[str | bytes, dict]:
        """The worker's first message, raw and parsed: :class:`Refused` when it closes 1013 before
        it (full, starting, draining), ``OSError`` when it closes otherwise."""
        try:
            first = await asyncio.wait_for(upstream.recv(), self.settings.connect_timeout_s)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            if code == msg.CloseCode.TRY_AGAIN_LATER:
                raise Refused(exc.rcvd.reason if exc.rcvd else "") from None
            raise OSError(f"worker closed {code} before session.begin") from None
        return first, json.loads(first) if isinstance(first, str) else {}

    async def _await_begin(self, ws, upstream: ClientConnection) -> tuple[ClientConnection | None, dict]:
        first, data = await self._first(upstream)
        if data.get("type") in ("session.begin", "session.resumed"):
            return upstream, data
        # An error before session.begin (e.g. invalid_config): relay it and the close as they are.
        try:
            await ws.send(first)
            async for message in upstream:
                await ws.send(message)
        except ConnectionClosed:
            if ws.state.name != "OPEN":
                raise  # the client went away (not the worker)
        await close_now(ws, upstream.close_code or msg.CloseCode.POLICY_VIOLATION, upstream.close_reason or "")
        return None, {}

    async def _relay(self, ws: ServerConnection, upstream: ClientConnection, worker: WorkerRecord, lease: str | None,
                     begin: dict, target: tuple[str, str], headers: list[tuple[str, str]],
                     first: dict | None = None) -> None:
        """Relay a session (``lease``: this router's reservation on ``worker``; None for a resume, whose
        parked session holds its slot). A resumed session (``first``: its ``session.resumed``) does not fail
        over: this router lacks its audio before the resume and its finals before it (docs/protocol.md)."""
        held: dict[str, Any] = {"worker": worker, "lease": lease,
                                "renewer": asyncio.create_task(self._renew(worker, lease)) if lease else None}

        async def reopen(session: RoutedSession) -> tuple[ClientConnection, dict, WorkerRecord] | None:
            self.suspects.add(session.worker)
            opened = await self._reopen(session, target, headers)
            if opened is None:
                return None
            new_upstream, new_begin, new_worker, new_lease = opened
            if held["renewer"] is not None:  # the lost worker's slot: given back now (the original again at the end)
                held["renewer"].cancel()
                await self._release(held["worker"], held["lease"])
            held.update(worker=new_worker, lease=new_lease,
                        renewer=asyncio.create_task(self._renew(new_worker, new_lease)))
            return new_upstream, new_begin, new_worker

        session = RoutedSession(ws, upstream, worker, begin, ping_interval_s=CLIENT_PING_INTERVAL_S,
                                reopen=reopen if first is None else None, first=first,
                                max_buffer_s=max_utterance_s(worker, begin.get("engine")) + REPLAY_MARGIN_S)
        self.sessions.add(session)
        t0 = time.monotonic()
        lost = False
        try:
            lost = await session.run()
        finally:
            if held["renewer"] is not None:
                held["renewer"].cancel()
            self.sessions.discard(session)
            if held["lease"] is not None and held["lease"] != lease:
                await self._release(held["worker"], held["lease"])
            await session.close_upstream()
        if lost:
            self.suspects.add(session.worker)
        log.info("session %s on %s %s after %.1f s (%d finals, %d failovers, replay buffer peak %d bytes)",
                 begin.get("session_id"), session.worker.info.worker_id, "LOST" if lost else "ended",
                 time.monotonic() - t0, len(session.finals), session.failovers, session.buffer_peak)

    async def _reopen(self, session: RoutedSession, target: tuple[str, str], headers: list[tuple[str, str]]
                      ) -> tuple[ClientConnection, dict, WorkerRecord, str] | None:
        """Failover: the session opened on another worker (reserved like a new one) on its timeline."""
        path, query = target
        params = dict(parse_qsl(query, keep_blank_values=True))
        params.update(session.offsets())
        try:
            workers = await self._dir.workers()
        except Exception as exc:  # noqa: BLE001
            log.warning("failover: registry unavailable: %s: %s", type(exc).__name__, exc)
            return None
        attempts = 0
        for worker in rank(workers, Wanted.from_query(params), self.suspects):
            if worker.info.worker_id == session.worker.info.worker_id:
                continue
            if attempts >= self.settings.max_attempts:
                break
            lease = uuid.uuid4().hex
            if not await self._reserve(worker, lease):
                continue
            attempts += 1
            try:
                upstream, begin = await self._connect(worker, path, urlencode(params), headers)
                return upstream, begin, worker, lease
            except Refused as exc:
                log.info("failover: worker %s refused (%s); trying the next", worker.info.worker_id, exc)
            except (TimeoutError, OSError, InvalidHandshake, ConnectionClosed) as exc:
                log.warning("failover: worker %s unreachable (%s: %s); trying the next", worker.info.worker_id,
                            type(exc).__name__, exc)
                self.suspects.add(worker)
            await self._release(worker, lease)
        log.warning("failover: no worker can take session %s", session.begin.get("session_id"))
        return None

    async def _connect(self, worker: WorkerRecord, path: str, query: str,
                       headers: list[tuple[str, str]]) -> tuple[ClientConnection, dict]:
        """A session on ``worker`` that has begun (for a failover: anything but session.begin is a failure)."""
        upstream = await self._dial(worker, path, query, headers)
        try:
            first, data = await self._first(upstream)
            if data.get("type") != "session.begin":
                raise OSError(f"worker answered {str(first)[:200]!r} instead of session.begin")
        except BaseException:
            await upstream.close()
            raise
        return upstream, data

    async def _renew(self, worker: WorkerRecord, lease: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_ttl_s / 3)
            await call_quietly("lease renewal", self._dir.renew(worker.info.worker_id, lease,
                                                                    self.settings.lease_ttl_s))


def max_utterance_s(worker: WorkerRecord, engine: str | None) -> float:
    """The longest utterance ``engine`` endpoints (its ``max_utterance_s``, as the worker registered it)."""
    description = worker.info.engine_catalog().get(engine or "") or {}
    endpointing = description.get("endpointing") or {}
    value = endpointing.get("max_utterance_s") if isinstance(endpointing, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else DEFAULT_MAX_UTTERANCE_S


def engines_of(workers: list[WorkerRecord]) -> list[dict]:
    """The engines live workers serve: each one's description (from the first worker that has it)
    and how many workers serve it."""
    merged: dict[str, dict] = {}
    for w in workers:
        for engine, description in w.info.engine_catalog().items():
            entry = merged.setdefault(engine, {**description, "workers": 0})
            entry["workers"] += 1
    return list(merged.values())


def spec_of(description: dict[str, Any]) -> EngineSpec | None:
    """An engine as a worker registered it (its ``GET /engines`` description) in the form the session's
    validation reads; None when the worker registered too little to validate against."""
    caps = description.get("capabilities") or {}
    if "config_schema" not in description or "models" not in caps:
        return None
    variants = caps.get("variants") or {}
    served = {name: list(v["languages"]) for name, v in variants.items() if isinstance(v, dict) and v.get("languages")}
    pipeline = {name: Stage(stage.get("component", ""), {}, provider=stage.get("plugin", ""))
                for name, stage in (description.get("pipeline") or {}).items()}
    return EngineSpec(id=description.get("id", ""), name=description.get("name", ""),
                      version=description.get("version", ""), description=description.get("description", ""),
                      file=Path(), capabilities=caps, config_schema=description["config_schema"],
                      pipeline=pipeline, raw=description, served=served)


def forwarded_headers(ws) -> list[tuple[str, str]]:
    """The headers a routed session carries to its worker: the client's address and its key."""
    headers = [("X-Forwarded-For", peer_of(ws))]
    for name in ("Authorization", "xi-api-key"):
        if name in ws.request.headers:
            headers.append((name, ws.request.headers[name]))
    return headers


async def run_router(settings: RouterSettings, stop: asyncio.Event, plugins: PluginSet | None = None) -> Router:
    """Start a router, serve until ``stop`` is set, then shut it down."""
    router = Router(settings, plugins)
    try:
        await router.start()
        await stop.wait()
    finally:
        await router.shutdown()
    return router
