"""When a worker re-reads its engines directory: on request (SIGHUP) and, with ENGINES_WATCH_S > 0,
whenever the directory's files change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)


async def reload_loop(reload: Callable[[], Awaitable[object]], directory: Path, watch_s: float,
                      request: asyncio.Event, stop: asyncio.Event) -> None:
    """Call ``reload`` whenever ``request`` is set, and every ``watch_s`` seconds in which the
    directory changed (0: on request only), until ``stop`` is set."""
    seen = await asyncio.to_thread(directory_state, directory) if watch_s > 0 else None
    while not stop.is_set():
        try:
            await asyncio.wait_for(request.wait(), timeout=watch_s if watch_s > 0 else None)
        except TimeoutError:
            now = await asyncio.to_thread(directory_state, directory)
            if now == seen:
                continue
            seen = now
        request.clear()
        try:
            await reload()
        except Exception:  # a failed reload must leave the worker serving
            log.exception("engine reload failed; the previous engines keep serving")


def directory_state(directory: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of the engine files: what a watcher compares."""
    try:
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(directory).glob("*.yaml"))
    except OSError:
        return []
