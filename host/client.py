"""A small ``/session`` client: stream a WAV file, collect what the server says.

Used by ``engine-host transcribe``, the tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake


@dataclass
class Audio:
    """PCM audio as the client sends it: int16 little-endian bytes plus its format."""

    pcm: bytes
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.channels / self.sample_rate


def read_wav(path: str | Path) -> Audio:
    """Read a PCM WAV file (8/16/24/32-bit integer) as 16-bit audio at its own rate and channels."""
    with wave.open(str(path), "rb") as w:
        width, rate, channels = w.getsampwidth(), w.getframerate(), w.getnchannels()
        raw = w.readframes(w.getnframes())
    if width == 2:
        pcm = raw
    elif width == 1:
        pcm = ((np.frombuffer(raw, dtype=np.uint8).astype(np.int16) - 128) << 8).astype("<i2").tobytes()
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        pcm = b[:, 1:].copy().view("<i2").tobytes()
    elif width == 4:
        pcm = (np.frombuffer(raw, dtype="<i4") >> 16).astype("<i2").tobytes()
    else:
        raise ValueError(f"{path}: unsupported sample width {width}")
    return Audio(pcm, rate, channels)


def silence(seconds: float, sample_rate: int = 16000, channels: int = 1) -> Audio:
    return Audio(b"\x00\x00" * int(seconds * sample_rate) * channels, sample_rate, channels)


def concat(*parts: Audio) -> Audio:
    rate, channels = parts[0].sample_rate, parts[0].channels
    if any(p.sample_rate != rate or p.channels != channels for p in parts):
        raise ValueError("all parts must share sample rate and channels")
    return Audio(b"".join(p.pcm for p in parts), rate, channels)


@dataclass
class StreamResult:
    messages: list[dict[str, Any]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    """Monotonic time each message arrived."""
    started_at: float = 0.0
    """Monotonic time the first audio byte was sent."""
    close_code: int | None = None
    close_reason: str = ""

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    @property
    def finals(self) -> list[dict[str, Any]]:
        return self.of("transcript.final")

    @property
    def end(self) -> dict[str, Any] | None:
        ends = self.of("session.end")
        return ends[0] if ends else None


def session_url(base: str, **params: Any) -> str:
    """``base`` (ws://host:port or a full /session URL) with query parameters."""
    if "/session" not in base and "/v1/" not in base:
        base = base.rstrip("/") + "/session"
    query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items() if v is not None}
    return f"{base}?{urlencode(query)}" if query else base


async def stream(
    url: str,
    audio: Audio,
    *,
    chunk_s: float = 0.1,
    speed: float | None = 1.0,
    end: bool = True,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    chunks: list[bytes] | None = None,
    on_sent: Callable[[int], None] | None = None,
    resume: bool = False,
    on_connected: Callable[[Any], None] | None = None,
) -> StreamResult:
    """Send ``audio`` in ``chunk_s`` frames (at ``speed`` × real time; None: as fast as possible),
    then ``end``, and collect every message until the server closes.

    ``resume``: open a resumable session and, when the connection is lost, reconnect with backoff and
    resume it (docs/protocol.md, "Resume"): the messages missed are replayed, the audio the server
    lacks is sent again, and ``messages`` holds each message once (plus each ``session.resumed``).
    ``on_connected`` is called with each new connection."""
    if resume:
        return await stream_source(url, _paced(_frames(audio, chunk_s), audio, speed), end=end,
                                   on_message=on_message, on_connected=on_connected, on_sent=on_sent)
    result = StreamResult()
    frames = chunks if chunks is not None else _frames(audio, chunk_s)
    async with connect(url, max_size=None, open_timeout=30, ping_interval=None) as ws:

        async def receive() -> None:
            try:
                async for raw in ws:
                    message = json.loads(raw)
                    result.messages.append(message)
                    result.received_at.append(time.monotonic())
                    if on_message is not None:
                        on_message(message)
            except ConnectionClosed:
                pass  # abnormal close: the code and reason below say what happened
            finally:
                result.close_code = ws.close_code
                result.close_reason = ws.close_reason or ""

        receiver = asyncio.create_task(receive())
        try:
            result.started_at = time.monotonic()
            async for frame in _paced(frames, audio, speed):
                if receiver.done():
                    break
                try:
                    await ws.send(frame)
                except ConnectionClosed:
                    break
                if on_sent is not None:
                    on_sent(len(frame))
            if end and not receiver.done():
                try:
                    await ws.send(json.dumps({"type": "end"}))
                except ConnectionClosed:
                    pass
            await receiver
        finally:
            receiver.cancel()
    return result


RESUME_TRIES = 8
"""Reconnects tried in a row (backoff 0.1 s doubling to 3.2 s) before a lost session is given up."""


RESEND_CHUNK = 19200
"""Audio sent again after a resume goes in frames of this many bytes (a multiple of every frame size)."""


def _frames(audio: Audio, chunk_s: float) -> list[bytes]:
    """``audio``'s PCM in ``chunk_s`` frames."""
    step = int(audio.sample_rate * chunk_s) * 2 * audio.channels
    return [audio.pcm[i:i + step] for i in range(0, len(audio.pcm), step)]


async def _paced(frames: Iterable[bytes], audio: Audio, speed: float | None) -> AsyncIterator[bytes]:
    """``frames`` of ``audio`` in order, like a live microphone: each once all its audio has
    "happened" (at ``speed`` × real time; None or 0: at once)."""
    rate = 2 * audio.channels * audio.sample_rate  # bytes per second
    started, sent = time.monotonic(), 0
    for frame in frames:
        sent += len(frame)
        if speed:
            await asyncio.sleep(max(0.0, started + sent / rate / speed - time.monotonic()))
        yield frame


async def stream_source(url: str, frames: AsyncIterator[bytes], *, end: bool = True,
                        on_message: Callable[[dict[str, Any]], None] | None = None,
                        on_connected: Callable[[Any], None] | None = None,
                        on_sent: Callable[[int], None] | None = None,
                        interruptible: bool = False) -> StreamResult:
    """One resumable session (docs/protocol.md, "Resume") fed from ``frames`` (a file, a microphone),
    over as many connections as it takes: a connection lost (no close frame, or a refused connect)
    is reconnected with backoff (0.1 s doubling, :data:`RESUME_TRIES` in a row) and resumed with
    ``resume=<token>&last_seq=<n>``; the audio the server lacks (``session.resumed.audio_bytes`` on,
    kept since the last ``audio.ack``) is sent again, and ``messages`` holds each message once (plus
    each ``session.resumed``). When ``frames`` ends: ``end`` (with ``end``). ``interruptible``: a
    cancellation (Ctrl-C) while waiting for a frame ends the source instead of the session.
    A ``warning`` with ``resumable: false`` (the router failed the session over) ends resuming."""
    result = StreamResult()
    base = url.split("?", 1)[0]
    target = url + ("&" if "?" in url else "?") + "resumable=true"
    token: str | None = None
    last_seq, tries = 0, 0
    kept = bytearray()  # the client's audio from byte `kept_from` on: what the server may still need
    kept_from, exhausted = 0, False
    next_frame: asyncio.Task | None = None

    async def take() -> bytes | None:
        try:
            return await anext(frames)
        except StopAsyncIteration:
            return None

    result.started_at = time.monotonic()
    try:
        while True:
            try:
                ws = await connect(target, max_size=None, open_timeout=30, ping_interval=None)
            except (OSError, TimeoutError, InvalidHandshake):
                if token is None or tries >= RESUME_TRIES:
                    raise
                await asyncio.sleep(0.1 * 2 ** tries)
                tries += 1
                continue
            if on_connected is not None:
                on_connected(ws)
            done = in_use = False
            position = 0
            async with ws:
                first = True
                opened = asyncio.Event()

                async def receive(ws: Any, opened: asyncio.Event) -> None:
                    nonlocal first, token, last_seq, position, done, tries, in_use, kept_from
                    try:
                        async for raw in ws:
                            message = json.loads(raw)
                            kind = message["type"]
                            if first:
                                first = False
                                if kind == "session.resumed":
                                    position, tries = message["audio_bytes"], 0
                                elif kind == "session.begin":
                                    token = message.get("resume_token")
                                elif message.get("code") == "resume_in_use":
                                    in_use = True  # the server has not seen the old connection go yet: retry
                                    return
                                opened.set()
                            if message.get("seq", 0) and message["seq"] <= last_seq:
                                continue  # never happens with a correct server; keeps the list free of repeats
                            last_seq = message.get("seq", last_seq)
                            if kind == "audio.ack" and message.get("bytes", 0) > kept_from:
                                del kept[:message["bytes"] - kept_from]  # never needed again
                                kept_from = message["bytes"]
                            elif kind == "warning" and message.get("resumable") is False:
                                token = None  # failed over behind the router: not resumable any more
                            result.messages.append(message)
                            result.received_at.append(time.monotonic())
                            if on_message is not None:
                                on_message(message)
                            if kind == "session.end" or (kind == "error" and not message.get("recoverable", True)):
                                done = kind == "session.end" or message["code"].startswith("resume")
                    except ConnectionClosed:
                        pass
                    finally:
                        opened.set()

                receiver = asyncio.create_task(receive(ws, opened))
                try:
                    await opened.wait()  # session.begin or session.resumed (which says where the audio goes on)
                    try:
                        # What the server lacks of the audio already taken (after a resume).
                        for i in range(max(position, kept_from) - kept_from, len(kept), RESEND_CHUNK):
                            if receiver.done():
                                break
                            await ws.send(bytes(kept[i:i + RESEND_CHUNK]))
                        while not exhausted and not receiver.done():
                            if next_frame is None:
                                next_frame = asyncio.create_task(take())
                            try:
                                await asyncio.wait({next_frame, receiver}, return_when=asyncio.FIRST_COMPLETED)
                            except asyncio.CancelledError:
                                if not interruptible:
                                    raise
                                exhausted = True  # Ctrl-C: the source ends, the session ends with `end`
                                break
                            if not next_frame.done():
                                break  # the connection ended: the frame goes to the next one
                            frame = next_frame.result()
                            next_frame = None
                            if frame is None:
                                exhausted = True
                                break
                            kept.extend(frame)
                            await ws.send(frame)
                            if on_sent is not None:
                                on_sent(len(frame))
                        if end and exhausted and not receiver.done():
                            await ws.send(json.dumps({"type": "end"}))
                    except ConnectionClosed:
                        pass
                    await receiver
                finally:
                    receiver.cancel()
            result.close_code, result.close_reason = ws.close_code, ws.close_reason or ""
            lost = ws.close_code in (None, 1006) or in_use
            if done or token is None or not lost or result.end is not None or tries >= RESUME_TRIES:
                return result
            await asyncio.sleep(0.1 * 2 ** tries)
            tries += 1
            target = f"{base}?resume={token}&last_seq={last_seq}"
    finally:
        if next_frame is not None:
            next_frame.cancel()
