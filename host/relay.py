"""One routed session: the router's relay between a client and the worker it was given.

It passes the frames both ways unchanged and remembers what the client got, so that when the worker
is lost mid-session the client still gets ``error{code:"worker_lost"}`` and a ``session.end`` built
from the finals already relayed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from host import protocol as msg
from host.contracts import WorkerRecord
from host.frontdoor import close_now
from host.keepalive import Keepalive
from host.protocol import ENCODINGS, ErrorCode

WAITED_S = 0.05
"""A send to the worker that took longer than this waited for the worker to read (backpressure)."""


class Refused(Exception):
    """The worker turned the session away before it began (full, starting, draining)."""


@dataclass(eq=False)
class RoutedSession:
    """Relays one session between a client and a worker and remembers what the client got."""

    client: ServerConnection
    upstream: ClientConnection
    worker: WorkerRecord
    begin: dict
    finals: list[dict] = field(default_factory=list)
    ended: bool = False
    bytes_in: int = 0
    stopping: bool = False
    ping_interval_s: float = 0.0
    """Keepalive pings to the client (0: none)."""
    _forwarding: bool = False  # a frame is on its way to the worker, which may not be reading (backpressure)
    _forwarded_at: float = float("-inf")

    async def run(self) -> bool:
        """Relay until either side ends; True when the worker was lost mid-session."""
        try:
            await self.client.send(json.dumps(self.begin))
        except ConnectionClosed:
            return False  # the client left while we were finding it a worker
        upward = asyncio.create_task(self._client_to_worker())
        pinger = None
        if self.ping_interval_s > 0:
            pinger = asyncio.create_task(Keepalive(self.client, self.ping_interval_s, self._backlogged,
                                                   self._client_dead).run())
        try:
            lost = await self._worker_to_client()
        finally:
            if pinger is not None:
                pinger.cancel()
            if not upward.done():
                try:
                    await asyncio.wait_for(asyncio.shield(upward), timeout=5)
                except TimeoutError:
                    upward.cancel()
        return lost

    def _backlogged(self) -> bool:
        """Whether the worker has lately kept us waiting to forward (its session holds back reading):
        the client's pong may then wait behind frames we have not read."""
        return self._forwarding or time.monotonic() - self._forwarded_at < self.ping_interval_s

    async def _client_dead(self) -> None:
        await close_now(self.client, msg.CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

    async def end(self) -> None:
        """Router shutdown: ask the worker to finalize; its session.end reaches the client."""
        self.stopping = True
        try:
            await self.upstream.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass

    async def _client_to_worker(self) -> None:
        try:
            async for message in self.client:
                if isinstance(message, bytes):
                    self.bytes_in += len(message)
                elif isinstance(message, dict):  # a dialect's native control message
                    message = json.dumps(message)
                self._forwarding, began = True, time.monotonic()
                try:
                    await self.upstream.send(message)
                finally:
                    self._forwarding = False
                    if time.monotonic() - began > WAITED_S:  # the worker's socket was full: it is not reading
                        self._forwarded_at = time.monotonic()
        except ConnectionClosed:
            pass  # the client vanished (ends below) or the worker did (_worker_to_client reports it)
        # The client is gone: closing the worker's side makes it finalize and record the session.
        await self.upstream.close()

    async def _worker_to_client(self) -> bool:
        try:
            async for message in self.upstream:
                if isinstance(message, str):
                    self._note(message)
                await self.client.send(message)
        except ConnectionClosed as exc:
            if exc.rcvd is None and exc.sent is not None:
                return False  # we closed it because the client left
        if self.ended or self.client.state.name != "OPEN":
            code = msg.CloseCode.GOING_AWAY if self.stopping else (self.upstream.close_code or msg.CloseCode.NORMAL_CLOSURE)
            await self.client.close(code, self.upstream.close_reason or "")
            return False
        await self._report_lost()
        return True

    def _note(self, message: str) -> None:
        try:
            data = json.loads(message)
        except ValueError:
            return
        kind = data.get("type")
        if kind == "transcript.final":
            self.finals.append(data)
        elif kind == "session.end":
            self.ended = True

    async def _report_lost(self) -> None:
        """The worker vanished before session.end: tell the client and hand it what it already has."""
        config = self.begin.get("config", {})
        rate = (config.get("sample_rate") or 16000) * (config.get("channels") or 1)
        duration = self.bytes_in / (rate * ENCODINGS.get(config.get("encoding"), 2))
        segments = [{"id": f.get("segment_id"), "start": f.get("start"), "end": f.get("end"), "text": f.get("text"),
                     "confidence": f.get("confidence"), **({"words": f["words"]} if "words" in f else {})}
                    for f in self.finals]
        speech = sum(s["end"] - s["start"] for s in segments if s["end"] is not None and s["start"] is not None)
        try:
            await self.client.send(json.dumps(msg.error(
                ErrorCode.WORKER_LOST, f"worker {self.worker.info.worker_id} went away mid-session; "
                "the finals sent so far are kept in session.end", recoverable=False)))
            await self.client.send(json.dumps(msg.session_end_of(
                self.begin.get("session_id"), duration, speech, segments, incomplete=True)))
            await self.client.close(*msg.WORKER_LOST)
        except ConnectionClosed:
            pass
