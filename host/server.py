"""The worker: a websockets server for ``/session`` plus plain-HTTP ``/health`` and ``/engines``.

Lifecycle: :meth:`Worker.start` opens the port first (``/health`` answers 503
``starting`` meanwhile), loads plugins, engines and models, registers with the
registry and turns ``ready``. :meth:`Worker.shutdown` stops accepting, ends
every open session with ``session.end`` and close 1001, and deregisters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from host import __version__
from host import protocol as msg
from host.auth import ApiKeyError, ApiKeys
from host.compat import DIALECTS, DialectConnection, load_dialects
from host.contracts import LoadContext, Registry, SessionInfo, SessionRecord, WorkerInfo, WorkerStatus
from host.engines import EngineLoadError, load_engines
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
from host.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from host.metrics import Metrics
from host.models import ModelManager, trim_memory_loop
from host.plugins import PluginSet, load_plugins
from host.protocol import ConfigError
from host.recording import SessionRecorder, retention_loop
from host.registry import Announcer, RegistryConfigError, build_registry, call_quietly
from host.scheduler import Scheduler
from host.sender import refuse_config
from host.session import Session, SessionServices
from host.session_config import parse_session_config, pick_engine
from host.settings import Settings
from host.static import load_static
from host.vad import VadBatcher

log = logging.getLogger(__name__)

load_dialects()  # /v1/realtime (OpenAI), /v1/speech-to-text/realtime (ElevenLabs), /v1/listen (Deepgram)

STARTING, READY, DRAINING = "starting", "ready", "draining"


class StartupError(Exception):
    """The worker cannot serve (no valid engine, a model failed to load, ...)."""


class Worker:
    def __init__(self, settings: Settings, plugins: PluginSet | None = None):
        self.settings = settings
        self.plugins = plugins if plugins is not None else load_plugins()
        self.models = ModelManager(self.plugins)
        self.scheduler = Scheduler()
        self.status = STARTING
        self.sessions: set[Session] = set()
        """Every open session, finalizing ones included: shutdown drains them all."""
        self.admitted: set[Session] = set()
        """Sessions holding a capacity slot (MAX_SESSIONS): released when the client is gone or has
        its session.end, before finalizing or the close handshake."""
        self._reserved = 0
        self.started_at = time.time()
        self.ready_after_s: float | None = None
        self.registry: Registry | None = None
        self._server: Server | None = None
        self._stop = asyncio.Event()
        self.announcer: Announcer | None = None
        self._heartbeat: asyncio.Task | None = None
        self._trimmer: asyncio.Task | None = None
        self._vad_executor = ThreadPoolExecutor(
            max_workers=settings.vad_threads or os.cpu_count() or 2, thread_name_prefix="vad"
        )
        self._vad_batchers: dict[int, VadBatcher] = {}
        try:
            self.api_keys = ApiKeys.load(settings.api_keys, settings.api_keys_file or None)
        except ApiKeyError as exc:
            raise StartupError(str(exc)) from None
        self.metrics = Metrics(self._metrics_state)
        self.sessions_dir = Path(settings.sessions_dir) if settings.sessions_dir else None
        self._recording_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rec")
        self._retention: asyncio.Task | None = None
        self._reloader: asyncio.Task | None = None
        self.static: dict[str, tuple[str, bytes]] = {}
        self._reload_lock = asyncio.Lock()
        self.services = SessionServices(
            worker_id=settings.worker_id,
            scheduler=self.scheduler,
            vad_batcher=self._vad_batcher,
            max_frame_bytes=settings.max_frame_bytes,
            partial_interval_s=settings.partial_interval_s,
            lag_warning_s=settings.lag_warning_s,
            lag_limit_s=settings.lag_limit_s,
            metrics=self.metrics,
            idle_timeout_s=settings.idle_timeout_s,
            max_session_s=settings.max_session_s,
            max_control_per_s=settings.max_control_per_s,
            max_pending_finals=settings.max_pending_finals,
            recorder=self._recorder if self.sessions_dir is not None else None,
            on_started=self._session_started,
            on_released=self._session_released,
            on_ended=self._session_ended,
        )

    def _recorder(self, session_id: str) -> SessionRecorder:
        assert self.sessions_dir is not None  # only called when recording is on
        return SessionRecorder(self.sessions_dir, session_id, self._recording_io)

    def _vad_batcher(self, model) -> VadBatcher:
        batcher = self._vad_batchers.get(id(model))
        if batcher is None:
            batcher = self._vad_batchers[id(model)] = VadBatcher(
                model, self._vad_executor, interval_s=self.settings.vad_batch_interval_ms / 1000)
        return batcher

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        t0 = time.perf_counter()
        self.static = await asyncio.to_thread(load_static)
        for error in self.plugins.errors:
            log.error("%s", error)
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            process_request=self._http,
            **serve_options(self.settings.max_frame_bytes, self.settings.ping_interval_s),
        )
        if self.api_keys.enabled:
            log.info("API keys required for /session (%d configured)%s", len(self.api_keys.keys),
                     " and /metrics" if self.settings.metrics_auth else "")
        log.info("listening on %s:%d (worker %s)", self.settings.host, self.port, self.settings.worker_id)
        specs, errors = load_engines(self.settings.engines_dir, self.plugins)
        for problem in errors:
            log.error("engine skipped: %s", problem)
        if not specs:
            raise EngineLoadError(errors)
        await self.models.load(specs)
        registry = self.registry = await self._build_registry()
        self.announcer = Announcer(registry, self.worker_info(), self.worker_status, self.settings.heartbeat_s)
        self._heartbeat = asyncio.create_task(self.announcer.run(self._stop))
        if self.settings.memory_trim_s > 0:
            self._trimmer = asyncio.create_task(trim_memory_loop(self.settings.memory_trim_s, self._stop))
        if self.sessions_dir is not None:
            log.info("recording sessions to %s%s", self.sessions_dir,
                     f" (kept {self.settings.sessions_retention_s:.0f} s)" if self.settings.sessions_retention_s else "")
            if self.settings.sessions_retention_s > 0:
                self._retention = asyncio.create_task(
                    retention_loop(self.sessions_dir, self.settings.sessions_retention_s, self._stop))
        self.plugins.hook.startup(worker=self)
        self.status = READY
        self.ready_after_s = time.perf_counter() - t0
        log.info("ready in %.2f s: engines %s, %s", self.ready_after_s, ", ".join(self.models.engines),
                 _mib(self.models.memory()["rss_bytes"]))

    async def shutdown(self, force: asyncio.Event | None = None) -> None:
        """Drain, then stop: refuse new sessions (1013, /health 503 ``draining``), let open sessions
        run up to ``drain_timeout_s`` (or until ``force`` is set), end the rest with session.end and
        close 1001, deregister."""
        if self.status == DRAINING and self._stop.is_set():
            return
        self.status = DRAINING
        if self.announcer is not None:
            self.announcer.nudge()  # routers stop choosing this worker now, not at the next heartbeat
        if self.sessions and self.settings.drain_timeout_s > 0:
            log.info("draining: %d open session(s), up to %.0f s", len(self.sessions), self.settings.drain_timeout_s)
            await self._wait_sessions_done(self.settings.drain_timeout_s, force)
        if self._server is not None:
            self._server.close(close_connections=False)
        await asyncio.gather(*(s.stop(msg.SHUTTING_DOWN) for s in list(self.sessions)), return_exceptions=True)
        self._stop.set()
        if self._reloader is not None:
            self._reloader.cancel()
        await asyncio.gather(*(t for t in (self._heartbeat, self._trimmer, self._retention, self._reloader)
                               if t is not None), return_exceptions=True)
        if self.registry is not None:
            await call_quietly("deregister", self.registry.deregister())
        self.plugins.hook.shutdown(worker=self)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.scheduler.stop()
        self._vad_executor.shutdown(wait=False, cancel_futures=True)
        self._recording_io.shutdown(wait=True)  # every recording is complete on disk
        log.info("worker %s stopped", self.settings.worker_id)

    async def _wait_sessions_done(self, timeout_s: float, force: asyncio.Event | None) -> None:
        deadline = time.monotonic() + timeout_s
        while self.sessions and time.monotonic() < deadline and not (force is not None and force.is_set()):
            await asyncio.sleep(0.05)

    # --- live engine reload ---------------------------------------------------------

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the engines directory and apply it without dropping open sessions.

        New and changed engines load their models off the loop and become selectable;
        removed ones stop taking sessions while open sessions finish on them; an invalid
        file is reported (file: path: reason) and the engine it held keeps its last good version.
        """
        async with self._reload_lock:
            specs, errors = await asyncio.to_thread(load_engines, self.settings.engines_dir, self.plugins)
            for error in errors:
                log.error("engine reload: %s", error)
            failed = {Path(e.file).resolve() for e in errors}
            report = await self.models.reload(specs, failed)
            report["errors"] = [str(e) for e in errors]
            if self.announcer is not None:
                self.announcer.update(self.worker_info())
            changes = ", ".join(f"{k} {' '.join(v)}" for k, v in report.items() if v and k != "errors")
            log.info("engines reloaded: %s; serving %s", changes or "no change", ", ".join(self.models.engines) or "none")
            return report

    def reload_on(self, request: asyncio.Event) -> None:
        """Reload whenever ``request`` is set (SIGHUP), and on changes when ENGINES_WATCH_S > 0."""
        self._reloader = asyncio.create_task(self._reload_loop(request))

    async def _reload_loop(self, request: asyncio.Event) -> None:
        watch = self.settings.engines_watch_s
        seen = await asyncio.to_thread(_directory_state, self.settings.engines_dir) if watch > 0 else None
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(request.wait(), timeout=watch if watch > 0 else None)
            except TimeoutError:
                now = await asyncio.to_thread(_directory_state, self.settings.engines_dir)
                if now == seen:
                    continue
                seen = now
            request.clear()
            try:
                await self.reload()
            except Exception:  # a failed reload must leave the worker serving
                log.exception("engine reload failed; the previous engines keep serving")

    @property
    def port(self) -> int:
        return bound_port(self._server, self.settings.port)

    async def _build_registry(self):
        """The configured registry component; its TTL spans three heartbeats."""
        offered = {"url": self.settings.redis_url or None, "ttl_s": 3 * self.settings.heartbeat_s}
        try:
            return await build_registry(self.plugins, self.settings.registry, offered,
                                        LoadContext(shared=self.models.shared, engine_id=""))
        except RegistryConfigError as exc:
            raise StartupError(str(exc)) from None

    # --- state for health, metrics and the registry -----------------------------

    def _metrics_state(self) -> dict:
        return {
            "active_sessions": len(self.admitted),
            "capacity": self.settings.max_sessions,
            "status": self.status,
            "queue_depth": self.scheduler.depths(),
            "inference": self.scheduler.usage(),
            "memory": self.models.memory(),
            "vad": {"cpu_seconds": sum(b.cpu_seconds for b in self._vad_batchers.values()),
                    "windows": sum(b.windows for b in self._vad_batchers.values())},
        }

    def worker_info(self) -> WorkerInfo:
        engines = list(self.models.engines.values())
        return WorkerInfo(
            worker_id=self.settings.worker_id,
            endpoint=self.settings.endpoint,
            capacity=self.settings.max_sessions,
            engines=[e.id for e in engines],
            models=sorted({m for e in engines for m in e.spec.models}),
            languages=sorted({lang for e in engines for lang in e.spec.languages}),
            version=__version__,
            started_at=self.started_at,
            catalog={e.id: e.spec.describe() for e in engines},
        )

    def worker_status(self) -> WorkerStatus:
        return WorkerStatus(
            status=self.status,
            active_sessions=len(self.admitted),
            capacity=self.settings.max_sessions,
            memory=self.models.memory(),
        )

    def health(self) -> tuple[int, dict]:
        body = {
            "status": "healthy" if self.status == READY else self.status,
            "worker_id": self.settings.worker_id,
            "active_sessions": len(self.admitted),
            "finalizing": len(self.sessions) - len(self.admitted),
            "capacity": self.settings.max_sessions,
            "engines": list(self.models.engines),
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "memory": self.models.memory(),
        }
        if self.models.failed:
            body["failed_engines"] = [f.describe() for f in self.models.failed.values()]
        return (200 if self.status == READY else 503), body

    # --- HTTP -----------------------------------------------------------------

    def _http(self, connection: ServerConnection, request) -> Response | None:
        refused = check_request(request, peer_of(connection))
        if refused is not None:
            self.metrics.refused.labels("bad_request").inc()
            return refused
        url = urlsplit(request.path)
        path = url.path
        if is_upgrade(request):
            if (path in SESSION_PATHS or path in DIALECTS) and not self.api_keys.allows(request.headers, url.query):
                self.metrics.refused.labels("unauthorized").inc()
                return unauthorized()
            return None  # WebSocket handshakes go on to _handle, bad paths included (close 1008)
        if path == "/metrics":
            if self.settings.metrics_auth and not self.api_keys.allows(request.headers, url.query):
                return unauthorized()
            data = self.metrics.render()
            headers = Headers([("Content-Type", METRICS_CONTENT_TYPE), ("Content-Length", str(len(data))),
                               ("Cache-Control", "no-store")])
            return Response(200, "OK", headers, data)
        if path == "/health":
            status, body = self.health()
            return json_response(status, body)
        if path == "/engines":
            return json_response(200, [e.spec.describe() for e in self.models.engines.values()]
                                 + [f.describe() for f in self.models.failed.values()])
        if path in self.static:
            return static_response(*self.static[path])
        return json_response(404, {"error": "not found", "path": path})

    # --- WebSocket ---------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handshake is done
        url = urlsplit(ws.request.path)
        if url.path == "/health":
            _, body = self.health()
            await ws.send(json.dumps(body))
            await ws.close(*msg.NORMAL)
            return
        dialect = DIALECTS.get(url.path)
        if url.path not in SESSION_PATHS and dialect is None:
            await close_now(ws, *msg.INVALID_PATH)
            return
        if self.status != READY:
            self.metrics.refused.labels(self.status).inc()
            await close_now(ws, *msg.not_ready(self.status))
            return
        # Sessions whose client left still finalize without a slot; past as many again as there
        # are slots, new sessions wait too, so connect-and-drop churn cannot pile them up.
        if (len(self.admitted) + self._reserved >= self.settings.max_sessions
                or len(self.sessions) + self._reserved >= 2 * self.settings.max_sessions):
            self.metrics.refused.labels("capacity").inc()
            await close_now(ws, *msg.AT_CAPACITY)
            return
        self._reserved += 1
        try:
            session = await self._open_session(ws, url.query, dialect)
            if session is None:
                return
            self.admitted.add(session)
        finally:
            self._reserved -= 1
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.admitted.discard(session)
            self.sessions.discard(session)

    async def _open_session(self, ws: ServerConnection, query_string: str, dialect) -> Session | None:
        """The session a handshake asks for, or None once the client has its invalid_config error."""
        query = dict(parse_qsl(query_string, keep_blank_values=True))
        conn: Any = ws
        try:
            if dialect is not None:
                # Another vendor's protocol: translated both ways around the same session.
                conn = DialectConnection(ws, dialect())
                native = await conn.open(query, timeout=self.settings.idle_timeout_s)
                if native is None:
                    return None  # the client left before its audio showed the format
                query = native
            engine = pick_engine(query, self.models.engines, self.models.failed)
            config = parse_session_config(query, engine.spec)
        except ConfigError as exc:
            self.metrics.refused.labels("invalid_config").inc()
            self.metrics.errors.labels("invalid_config").inc()
            await refuse_config(conn, exc)
            return None
        return Session(conn, engine, config, self.services)

    def _session_released(self, session: Session) -> None:
        """The session no longer holds a capacity slot: its client is gone or has session.end.
        Finalizing and recording may go on; their decodes are accounted in the scheduler."""
        if session in self.admitted:
            self.admitted.discard(session)
            if self.announcer is not None:
                self.announcer.nudge()

    def _session_started(self, info: SessionInfo) -> None:
        log.info("session %s started: engine=%s model=%s", info.session_id, info.engine, info.config.get("model"))
        _call_hook(self.plugins.hook.session_started, session=info)
        if self.announcer is not None:
            self.announcer.nudge()

    async def _session_ended(self, info: SessionInfo, record: SessionRecord) -> None:
        log.info("session %s ended: status=%s audio=%.1fs speech=%.1fs segments=%d",
                 record.session_id, record.status, record.audio_seconds, record.speech_seconds, record.segments)
        self.metrics.sessions.labels(record.status).inc()
        _call_hook(self.plugins.hook.session_ended, session=info, record=record)
        if self.announcer is not None:
            self.announcer.record(record)


def _call_hook(hook, **kwargs) -> None:
    """Session hooks are observers: a failing plugin is logged and never breaks a session."""
    try:
        hook(**kwargs)
    except Exception:
        log.exception("%s hook failed", hook.name)


def _directory_state(directory: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of the engine files: what a watcher compares."""
    try:
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(directory).glob("*.yaml"))
    except OSError:
        return []


def _mib(n: int) -> str:
    return f"RSS {n / 2**20:.0f} MiB"


async def run_worker(settings: Settings, stop: asyncio.Event, plugins: PluginSet | None = None,
                     force: asyncio.Event | None = None, reload: asyncio.Event | None = None) -> Worker:
    """Start a worker, serve until ``stop`` is set, then drain (cut short by ``force``) and shut down.
    Setting ``reload`` re-reads the engines directory."""
    worker = Worker(settings, plugins)
    try:
        await worker.start()
        worker.reload_on(reload if reload is not None else asyncio.Event())
        await stop.wait()
    finally:
        await worker.shutdown(force)
    return worker
