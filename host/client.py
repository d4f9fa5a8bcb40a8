"""A small ``/session`` client: stream a WAV file, collect what the server says.

Used by ``engine-host transcribe``, the tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


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
) -> StreamResult:
    """Send ``audio`` in ``chunk_s`` frames (at ``speed`` × real time; None: as fast as possible),
    then ``end``, and collect every message until the server closes."""
    result = StreamResult()
    step = int(audio.sample_rate * chunk_s) * 2 * audio.channels
    frames = chunks if chunks is not None else [audio.pcm[i:i + step] for i in range(0, len(audio.pcm), step)]
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
            sent = 0
            for frame in frames:
                if receiver.done():
                    break
                sent += len(frame)
                if speed:
                    # Like a live microphone: a frame leaves once all its audio has "happened".
                    due = result.started_at + sent / 2 / audio.channels / audio.sample_rate / speed
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
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
