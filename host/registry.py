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
from dataclasses import asdict
from typing import Awaitable, Callable

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


async def heartbeat_loop(
    registry: Registry,
    info: WorkerInfo,
    status: Callable[[], WorkerStatus],
    interval_s: float,
    stop: asyncio.Event,
) -> None:
    """Register, then heartbeat every ``interval_s`` until ``stop`` is set.

    A registry that fails (e.g. Redis down) is retried with backoff; the worker
    keeps serving meanwhile and re-registers when the registry answers again.
    """
    registered = False
    backoff = 1.0
    while not stop.is_set():
        try:
            if not registered:
                await registry.register(info)
                registered = True
            await registry.heartbeat(status())
            backoff = 1.0
            delay = interval_s
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a registry outage must never stop the worker
            log.warning("registry heartbeat failed (%s: %s); retrying in %.0f s", type(exc).__name__, exc, backoff)
            registered = False
            delay = min(backoff, interval_s)
            backoff = min(backoff * 2, 30.0)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass


async def call_quietly(what: str, coro: Awaitable) -> None:
    """Await a registry call, logging instead of raising: the registry is never on a session's critical path."""
    try:
        await coro
    except Exception as exc:  # noqa: BLE001
        log.warning("registry %s failed: %s: %s", what, type(exc).__name__, exc)
