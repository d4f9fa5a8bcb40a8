"""The worker: a websockets server for ``/session`` plus plain-HTTP ``/health``, ``/ready`` and ``/engines``.

Lifecycle: :meth:`Worker.start` opens the port first (``/health`` answers 503
``starting`` meanwhile), loads plugins, engines and models, registers with the
registry and turns ``ready``. :meth:`Worker.shutdown` stops accepting, ends
every open session with ``session.end`` and close 1001, and deregisters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import SplitResult

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response

from host import __version__
from host import protocol as msg
from host.compat import dalston
from host.contracts import LoadContext, Registry, SessionInfo, SessionRecord, WorkerInfo, WorkerStatus
from host.door import FrontDoor
from host.engine_watch import reload_loop
from host.engines import EngineLoadError, load_engines
from host.frontdoor import close_now, json_response, unauthorized
from host.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from host.metrics import Metrics
from host.models import LoadedEngine, ModelManager, trim_memory_loop
from host.plugins import PluginSet
from host.protocol import Close, ConfigError, ErrorCode
from host.recording import KEEP_ALL, Keep, SessionRecorder, retention_loop
from host.registry import Announcer, ResumeDirectory, call_quietly
from host.scheduler import Scheduler
from host.sender import refuse
from host.session import Session, SessionServices
from host.session_config import SessionConfig, parse_session_config, pick_engine
from host.settings import Settings
from host.turn import TurnBatcher
from host.vad import VadBatcher

log = logging.getLogger(__name__)

STARTING, READY, DRAINING = "starting", "ready", "draining"

SPENT_TOKENS = 10000
"""Resume tokens of ended sessions remembered, so that a late resume gets ``resume_expired``."""


class StartupError(Exception):
    """The worker cannot serve (no valid engine, a model failed to load, ...)."""


class Worker(FrontDoor[Settings]):
    """One worker: its engines and models, its sessions, and its entry in the registry."""

    start_error = StartupError

    def __init__(self, settings: Settings, plugins: PluginSet | None = None):
        super().__init__(settings, plugins)
        self.models = ModelManager(self.plugins)
        self.scheduler = Scheduler()
        self.status = STARTING
        self.sessions: set[Session] = set()
        """Every open session, finalizing ones included: shutdown drains them all."""
        self.admitted: set[Session] = set()
        """Sessions holding a capacity slot (MAX_SESSIONS): released when the client is gone or has
        its session.end, before finalizing or the close handshake."""
        self._reserved = 0
        self.resumable: dict[str, Session] = {}
        """Open resumable sessions by their resume token (attached or parked)."""
        self._spent_tokens: OrderedDict[str, float] = OrderedDict()
        """Tokens of resumable sessions that ended (their last SPENT_TOKENS), for a clear resume_expired."""
        self.started_at = time.time()
        self.ready_after_s: float | None = None
        self.registry: Registry | None = None
        self._stop = asyncio.Event()
        self.announcer: Announcer | None = None
        self._heartbeat: asyncio.Task | None = None
        self._trimmer: asyncio.Task | None = None
        self._vad_executor = ThreadPoolExecutor(
            max_workers=settings.vad_threads or os.cpu_count() or 2, thread_name_prefix="vad"
        )
        self._vad_batchers: dict[int, VadBatcher] = {}
        # One thread for turn checks (~55 ms of a core each here): under load they queue there, and
        # are shed (host/turn.py), instead of holding up the VAD windows of every session.
        self._turn_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turn")
        self._turn_batchers: dict[int, TurnBatcher] = {}
        self.metrics = Metrics(self._metrics_state)
        self.sessions_dir = Path(settings.sessions_dir) if settings.sessions_dir else None
        self._recording_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rec")
        self._retention: asyncio.Task | None = None
        self._reloader: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()
        self.services = SessionServices(
            worker_id=settings.worker_id,
            scheduler=self.scheduler,
            vad_batcher=self._vad_batcher,
            turn_batcher=self._turn_batcher,
            max_frame_bytes=settings.max_frame_bytes,
            partial_interval_s=settings.partial_interval_s,
            lag_warning_s=settings.lag_warning_s,
            lag_limit_s=settings.lag_limit_s,
            metrics=self.metrics,
            idle_timeout_s=settings.idle_timeout_s,
            max_session_s=settings.max_session_s,
            max_control_per_s=settings.max_control_per_s,
            max_pending_finals=settings.max_pending_finals,
            ping_interval_s=settings.ping_interval_s,
            recorder=self._recorder if self.sessions_dir is not None else None,
            on_started=self._session_started,
            on_released=self._session_released,
            on_ended=self._session_ended,
        )

    def _recorder(self, session_id: str, keep: Keep = KEEP_ALL) -> SessionRecorder:
        assert self.sessions_dir is not None  # only called when recording is on
        return SessionRecorder(self.sessions_dir, session_id, self._recording_io, keep)

    def _services_for(self, conn: Any) -> SessionServices:
        """The services of one session: its dialect may keep less of the recording than the worker makes
        (Dalston's ``store_audio``/``store_transcript``)."""
        keep = getattr(getattr(conn, "dialect", None), "keep", None)
        if not isinstance(keep, Keep) or keep == KEEP_ALL or self.services.recorder is None:
            return self.services
        if not (keep.audio or keep.transcript):
            return replace(self.services, recorder=None)  # nothing kept: nothing written either
        return replace(self.services, recorder=partial(self._recorder, keep=keep))

    def _vad_batcher(self, model) -> VadBatcher:
        batcher = self._vad_batchers.get(id(model))
        if batcher is None:
            batcher = self._vad_batchers[id(model)] = VadBatcher(
                model, self._vad_executor, interval_s=self.settings.vad_batch_interval_ms / 1000)
        return batcher

    def _turn_batcher(self, detector, component: str) -> TurnBatcher:
        batcher = self._turn_batchers.get(id(detector))
        if batcher is None:
            batcher = self._turn_batchers[id(detector)] = TurnBatcher(detector, self._turn_executor, component)
        return batcher

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        t0 = time.perf_counter()
        for error in self.plugins.errors:
            log.error("%s", error)
        # Sessions ping their clients themselves (host/keepalive.py): a pong that waits behind the
        # client's own frames while the session withholds reading must not drop a live client.
        await self.listen(None)
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
        self._turn_executor.shutdown(wait=False, cancel_futures=True)
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
        self._reloader = asyncio.create_task(
            reload_loop(self.reload, self.settings.engines_dir, self.settings.engines_watch_s, request, self._stop))

    async def _build_registry(self) -> Registry:
        """The configured registry component; its TTL spans three heartbeats."""
        _, registry = await self.open_registry(LoadContext(shared=self.models.shared, engine_id=""),
                                               ttl_s=3 * self.settings.heartbeat_s)
        return cast(Registry, registry)

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
            "turn": {"cpu_seconds": sum(b.cpu_seconds for b in self._turn_batchers.values()),
                     "checks": sum(b.checks for b in self._turn_batchers.values()),
                     "shed": sum(b.shed for b in self._turn_batchers.values())},
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
            catalog={e.id: e.describe() for e in engines},
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

    def readiness(self) -> tuple[int, dict]:
        """``GET /ready``: 200 when a new session would be admitted now, else 503 and why (``starting``,
        ``draining`` or ``full``), for load balancers. ``/health`` stays the liveness answer: a full
        worker is healthy, but takes no session."""
        _, health = self.health()
        status = self.status if self.status != READY else "full" if self._full() else "ready"
        return (200 if status == "ready" else 503), {
            "status": status, **{k: health[k] for k in ("worker_id", "active_sessions", "finalizing", "capacity")}}

    def _full(self) -> bool:
        """No capacity slot free. Sessions whose client left still finalize without a slot; past as many
        again as there are slots, new sessions wait too, so connect-and-drop churn cannot pile them up."""
        return (len(self.admitted) + self._reserved >= self.settings.max_sessions
                or len(self.sessions) + self._reserved >= 2 * self.settings.max_sessions)

    # --- the front door's questions -------------------------------------------------

    async def health_answer(self) -> tuple[int, dict]:
        return self.health()

    async def answer_http(self, path: str, headers: Headers, query: str) -> Response | None:
        if path == "/metrics":
            if self.settings.metrics_auth and not self.api_keys.allows(headers, query):
                return unauthorized()
            data = self.metrics.render()
            return Response(200, "OK", Headers([("Content-Type", METRICS_CONTENT_TYPE),
                                                ("Content-Length", str(len(data))), ("Cache-Control", "no-store")]),
                            data)
        if path == "/health":
            return json_response(*self.health())
        if path == "/ready":
            return json_response(*self.readiness())
        if path == "/engines":
            return json_response(200, [e.describe() for e in self.models.engines.values()]
                                 + [f.describe() for f in self.models.failed.values()])
        return None

    def count_refusal(self, reason: str) -> None:
        self.metrics.refused.labels(reason).inc()
        if reason == "invalid_config":  # the client gets an error message as well as the refusal
            self.metrics.errors.labels(reason).inc()

    def refusal(self) -> Close | None:
        if self.status != READY:
            self.count_refusal(self.status)
            return msg.not_ready(self.status)
        return None

    # --- WebSocket ---------------------------------------------------------------

    async def serve_session(self, ws: ServerConnection, url: SplitResult, query: dict[str, str],
                            dialect: Any) -> None:
        if dialect is None and url.path != dalston.PATH and "resume" in query:
            await self._resume(ws, query)
            return
        if dialect is None and url.path == dalston.PATH:
            # Translated here, not on a router: the router relays this path untouched, so the
            # worker that records sees store_audio/store_transcript (host/compat/dalston.py).
            dialect = dalston.DalstonDialect
        if self._full():
            self.count_refusal("capacity")
            await close_now(ws, *msg.AT_CAPACITY)
            return
        self._reserved += 1
        try:
            session = await self._open_session(ws, query, dialect)
            if session is None:
                return
            self.admitted.add(session)
        finally:
            self._reserved -= 1
        self.sessions.add(session)
        holder: asyncio.Task | None = None
        if session.resume_token is not None:
            self.resumable[session.resume_token] = session
            holder = asyncio.create_task(self._hold_token(session))
        try:
            await session.run()
        finally:
            self.admitted.discard(session)
            self.sessions.discard(session)
            if session.resume_token is not None:
                assert holder is not None
                holder.cancel()
                if isinstance(self.registry, ResumeDirectory):
                    await call_quietly("resume token", self.registry.drop_resume(session.resume_token))
                self.resumable.pop(session.resume_token, None)
                self._spent_tokens[session.resume_token] = time.time()
                while len(self._spent_tokens) > SPENT_TOKENS:
                    self._spent_tokens.popitem(last=False)

    async def _hold_token(self, session: Session) -> None:
        """While a resumable session lives, its token names this worker in a shared registry (one
        that is a :class:`ResumeDirectory`), so that a router finds it; the record's TTL is the
        resume window, renewed every third of it: a worker that dies leaves it to expire."""
        if not isinstance(self.registry, ResumeDirectory) or session.resume_token is None:
            return
        ttl = max(session.resume_window_s, 1.0)
        record = {"worker_id": self.settings.worker_id, "endpoint": self.settings.endpoint,
                  "session_id": session.id, "engine": session.engine.id, "config": session.info.config}
        while True:
            await call_quietly("resume token", self.registry.hold_resume(session.resume_token, record, ttl))
            await asyncio.sleep(ttl / 3)

    async def _resume(self, ws: ServerConnection, query: dict[str, str]) -> None:
        """``/session?resume=<token>&last_seq=<n>``: re-attach a parked session (docs/protocol.md, "Resume"),
        or refuse with an error naming why and close 1008."""
        token = query.get("resume", "")
        session = self.resumable.get(token)
        raw_seq = query.get("last_seq", "0")
        last_seq = int(raw_seq) if raw_seq.isdigit() else -1
        refusal: tuple[ErrorCode, str] | None = None
        if session is None:
            refusal = ((ErrorCode.RESUME_EXPIRED, "the session of this resume token has ended (resume window "
                        "passed, or ended); start a new session") if token in self._spent_tokens
                       else (ErrorCode.INVALID_RESUME, "unknown resume token"))
        elif not session.parked or session.attached:
            refusal = (ErrorCode.RESUME_IN_USE, "the session of this resume token is attached to a connection; "
                       "retry once that connection is gone")
        elif not session.out.can_replay(last_seq):
            refusal = (ErrorCode.INVALID_RESUME, f"last_seq {raw_seq!r} is out of range: messages "
                       f"{session.out.oldest_kept}..{session.out.seq} can be replayed")
        if refusal is not None or session is None:  # (session is None always has a refusal: for mypy)
            code, text = refusal or (ErrorCode.INVALID_RESUME, "unknown resume token")
            self.count_refusal(str(code))
            await refuse(ws, code, text, msg.RESUME_REFUSED)
            return
        await session.attach(ws, last_seq)

    async def _open_session(self, ws: ServerConnection, query: dict[str, str], dialect) -> Session | None:
        """The session a handshake asks for, or None once the client has left or has its invalid_config error."""
        # Another vendor's protocol is translated both ways around the same session.
        conn, native = await self.open_dialect(ws, dialect, query, timeout=self.settings.idle_timeout_s)
        if native is None:
            return None
        try:
            engine, config = self._configured(native)
        except ConfigError as exc:
            await self.refuse_config(conn, exc)
            return None
        return Session(conn, engine, config, self._services_for(conn), resume_window_s=self.settings.resume_window_s)

    def _configured(self, native: dict[str, str]) -> tuple[LoadedEngine, SessionConfig]:
        """The engine and validated configuration a native query asks for; :class:`ConfigError` for a
        bad one. The one check, whether a session starts or a handshake is answered."""
        engine = pick_engine(native, self.models.engines, self.models.failed)
        return engine, parse_session_config(native, engine.spec)

    async def check_native(self, native: dict[str, str]) -> None:
        if self.status == READY:  # otherwise the handshake's refusal (1013) answers it
            self._configured(native)

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
