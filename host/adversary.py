"""Hostile load that ``engine-host bench`` can run beside its measured streams (``--flood``,
``--uploads``), and that the isolation tests use: what one careless or hostile client does to a
worker, so that what it costs everybody else is measured in the bench's own terms.

- A flush storm: ``enable_vad=false``, 32 ms of noise and a ``flush`` about 45 times a second,
  inside the default control-message limit. Each flush asks for a decode of its own.
- An upload: a long recording streamed as fast as the socket takes it, again and again.

Both run until told to stop, then end their sessions normally and report what they got.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import Audio, stream


@dataclass
class StormReport:
    """What one flush-storm session sent and got back."""

    flushes: int = 0
    flush_done: int = 0
    errors: list[str] = field(default_factory=list)
    end: dict[str, Any] | None = None
    close_code: int | None = None
    """How the worker closed the session (1000 after ``end``; 1013 if it cut the storm)."""
    refused: bool = False
    """The worker turned the session away before it began (e.g. 1013 at capacity)."""


async def flush_storm(url: str, stop: asyncio.Event, per_s: float = 45.0, limit: int = 100_000,
                      headers: dict[str, str] | None = None) -> StormReport:
    """Run one flush storm on ``url`` (a ``/session`` URL with ``enable_vad=false``) until ``stop``
    (or ``limit`` flushes), then send ``end`` and wait for ``session.end``."""
    got = StormReport()
    # No keepalive of its own: the storm's pings queue behind its own flushes, which the worker reads
    # only as fast as it decodes them (backpressure), so under load a client-side ping timeout (1011)
    # would measure the storm's backlog, not the worker. The worker's lag budget bounds the wait.
    async with connect(url, additional_headers=headers, max_size=None, ping_interval=None) as ws:
        try:
            begin = json.loads(await ws.recv())
        except ConnectionClosed as exc:
            got.refused, got.close_code = True, exc.rcvd.code if exc.rcvd else None
            return got
        if begin.get("type") != "session.begin":
            raise RuntimeError(f"the storm's session did not begin: {begin}")

        async def read() -> None:
            try:
                async for raw in ws:
                    message = json.loads(raw)
                    kind = message["type"]
                    if kind == "flush.done":
                        got.flush_done += 1
                    elif kind == "error":
                        got.errors.append(message["code"])
                    elif kind == "session.end":
                        got.end = message
            except ConnectionClosed:
                pass  # cut by the worker: the close code says why

        reader = asyncio.create_task(read())
        try:
            while not stop.is_set() and got.flushes < limit and not reader.done():
                await ws.send(os.urandom(1024))  # 32 ms of 16 kHz noise: a decode of its own
                await ws.send(json.dumps({"type": "flush"}))
                got.flushes += 1
                await asyncio.sleep(1 / per_s)
            await ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass
        await reader
        got.close_code = ws.close_code
    return got


@dataclass
class UploadReport:
    """What one uploading client streamed and got back."""

    uploads: int = 0
    audio_seconds: float = 0.0
    finals: int = 0
    errors: list[str] = field(default_factory=list)
    ended: int = 0
    refused: int = 0
    """Uploads turned away before their session began (e.g. 1013 at capacity)."""


async def upload_loop(url: str, audio: Audio, stop: asyncio.Event, once: bool = False) -> UploadReport:
    """Stream ``audio`` to ``url`` as fast as possible, again and again until ``stop`` (or once).
    A client turned away (no ``session.begin``, e.g. 1013 at capacity) gives up rather than retry."""
    got = UploadReport()
    while not stop.is_set():
        result = await stream(url, audio, speed=None)
        if not result.of("session.begin"):
            got.refused += 1
            break
        got.uploads += 1
        got.audio_seconds += audio.seconds
        got.finals += len(result.finals)
        got.errors += [e["code"] for e in result.of("error")]
        got.ended += result.end is not None
        if once:
            break
    return got


def summary(storms: list[StormReport], uploads: list[UploadReport]) -> dict[str, Any]:
    """The adversaries' side of a bench level, for its report."""
    return {
        "flood_sessions": len(storms),
        "flushes": sum(s.flushes for s in storms),
        "flushes_answered": sum(s.flush_done for s in storms),
        "flood_errors": sorted({e for s in storms for e in s.errors}),
        "flood_close_codes": sorted({s.close_code for s in storms if s.close_code is not None}),
        "upload_sessions": len(uploads),
        "uploads_completed": sum(u.ended for u in uploads),
        "uploaded_audio_seconds": round(sum(u.audio_seconds for u in uploads), 1),
        "upload_errors": sorted({e for u in uploads for e in u.errors}),
    }
