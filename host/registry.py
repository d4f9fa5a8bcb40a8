"""Worker registry: the built-in in-memory registry (plugin name ``memory``) and the heartbeat loop.

The in-memory registry is the embedded default: it keeps this worker's record
in the process, so a single worker runs with no Redis. Plugins (e.g.
``registry_redis``) provide shared registries for routers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Protocol, runtime_checkable

from host.contracts import Registry, SessionRecord, WorkerInfo, WorkerStatus
from host.hookspecs import hookimpl

log = logging.getLogger(__name__)

OPTIONS_SCHEMA = {
    "type": "object",
    "properties": {
        "max_session_records": {"type": "integer", "minimum": 0, "default": 1000},
    },
    "additionalProperties": False,
}


@runtime_checkable
class ResumeDirectory(Protocol):
    """Optional part of a shared registry: where a resumable session can be found by its resume token,
    so that a router resolves ``?resume=<token>`` to the worker holding the session (docs/protocol.md,
    "Resume"). The worker holds a record while the session lives (renewed before its TTL runs out) and
    drops it when the session ends; a worker that dies leaves it to expire with the TTL."""

    async def hold_resume(self, token: str, record: dict[str, Any], ttl_s: float) -> None:
        """Write (or renew) ``token``'s record (``worker_id``, ``endpoint``, ``session_id``...) for ``ttl_s``."""
        ...

    async def drop_resume(self, token: str) -> None:
        """The session of ``token`` ended: its record goes."""
        ...

    async def find_resume(self, token: str) -> dict[str, Any] | None:
        """``token``'s record, or None when no live session holds it."""
        ...


class InMemoryRegistry:
    """Keeps the worker record, its last heartbeat and recent ended sessions in memory."""

    def __init__(self, max_session_records: int = 1000):
        self.info: WorkerInfo | None = None
        self.status: WorkerStatus | None = None
        self.last_heartbeat: float | None = None
        self.sessions: deque[SessionRecord] = deque(maxlen=max_session_records)

    async def register(self, info: WorkerInfo) -> None:
        self.info = info

    async def heartbeat(self, status: WorkerStatus) -> None:
        self.status = status
        self.last_heartbeat = time.time()

    async def session_ended(self, record: SessionRecord) -> None:
        self.sessions.append(record)

    async def deregister(self) -> None:
        self.info = None

    def snapshot(self) -> dict:
        return {
            "worker": asdict(self.info) if self.info else None,
            "status": asdict(self.status) if self.status else None,
            "last_heartbeat": self.last_heartbeat,
            "sessions": [asdict(r) for r in self.sessions],
        }


@hookimpl
def register_registry(register):
    register("memory", lambda options, context: InMemoryRegistry(**options), OPTIONS_SCHEMA)


class Announcer:
    """Keeps one worker announced in a registry, through registry outages.

    It registers the worker, heartbeats every ``interval_s`` (sooner after
    :meth:`nudge`, so routers see a session start or end within a moment) and
    delivers ended-session records. When the registry fails (e.g. Redis down) it
    logs, retries with backoff capped at one interval, re-registers when the
    registry answers again, and keeps undelivered records (up to ``max_pending``).
    """

    NUDGE_GAP_S = 0.2
    """Heartbeats caused by nudges are at least this far apart: a burst of session starts costs one write."""

    def __init__(self, registry: Registry, info: WorkerInfo, status: Callable[[], WorkerStatus],
                 interval_s: float, max_pending: int = 1000):
        self.registry = registry
        self.info = info
        self.status = status
        self.interval_s = interval_s
        self.pending: deque[SessionRecord] = deque(maxlen=max_pending)
        self.registered = False
        self._wake = asyncio.Event()

    def update(self, info: WorkerInfo) -> None:
        """The worker's description changed (engines reloaded): register it again at once."""
        self.info = info
        self.registered = False
        self._wake.set()

    def nudge(self) -> None:
        """The worker's state changed: heartbeat soon rather than at the next interval."""
        self._wake.set()

    def record(self, record: SessionRecord) -> None:
        """Queue an ended session's record for the registry."""
        self.pending.append(record)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Announce until ``stop`` is set; never raises for registry failures."""
        failures = 0
        while not stop.is_set():
            try:
                await self.beat()
                failures = 0
                delay = self.interval_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a registry outage must never stop the worker
                self.registered = False
                failures += 1
                # Retry at once (the record may only have expired), then back off up to one interval.
                delay = 0.0 if failures == 1 else min(2.0 ** (failures - 2), self.interval_s, 30.0)
                log.warning("registry heartbeat failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc, delay)
            if await _wait_either(stop, self._wake, delay) is self._wake:
                await _wait_either(stop, None, self.NUDGE_GAP_S)
            self._wake.clear()
        await call_quietly("session records", self.flush_records())

    async def beat(self) -> None:
        if not self.registered:
            await self.registry.register(self.info)
            self.registered = True
            log.info("registered with the %s", type(self.registry).__name__)
        await self.registry.heartbeat(self.status())
        await self.flush_records()

    async def flush_records(self) -> None:
        while self.pending:
            await self.registry.session_ended(self.pending[0])
            self.pending.popleft()


async def _wait_either(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> asyncio.Event | None:
    """Wait until ``stop`` or ``wake`` is set, or ``timeout`` passes; say which event fired."""
    if stop.is_set():
        return stop
    if timeout <= 0:
        return wake if wake is not None and wake.is_set() else None
    events = [stop] + ([wake] if wake is not None else [])
    waiters = {asyncio.ensure_future(e.wait()): e for e in events}
    done, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return waiters[next(iter(done))] if done else None


async def call_quietly(what: str, coro: Awaitable) -> None:
    """Await a registry call, logging instead of raising: the registry is never on a session's critical path."""
    try:
        await coro
    except Exception as exc:  # noqa: BLE001
        log.warning("registry %s failed: %s: %s", what, type(exc).__name__, exc)


class RegistryConfigError(Exception):
    """The configured registry plugin is missing or its options are invalid."""


async def build_registry(plugins, name: str, offered: dict, context) -> object:
    """Build registry component ``name`` off the event loop.

    ``offered`` holds host-level settings (``url``, ``ttl_s``, ...); each is
    passed only if the plugin's options schema declares it.
    """
    from host.schemas import problems, with_defaults

    component = plugins.component("registry", name)
    if component is None:
        raise RegistryConfigError(f"no registry plugin named {name!r} (loaded: {', '.join(plugins.names('registry'))})")
    declared = component.options_schema.get("properties") or {}
    options = {k: v for k, v in offered.items() if k in declared and v is not None}
    found = problems(component.options_schema, options)
    if found:
        raise RegistryConfigError(f"registry {name!r}: {found[0]}")
    return await asyncio.to_thread(component.factory, with_defaults(component.options_schema, options), context)
