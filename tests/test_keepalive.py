"""The session's keepalive: a client whose pongs wait behind its own frames while the worker holds
back reading it (backpressure) is not dropped; one that goes silent while it is read is."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import pytest
import yaml
from websockets.asyncio.client import connect

from host.contracts import AsrResult
from host.hookspecs import hookimpl
from host.plugins import load_plugins
from host.server import Worker
from host.settings import Settings

from .support import ENGINES, handshake, read_frames_until_close

PING_S = 0.3
GATE = threading.Event()
"""Decodes of the gated model wait on it: the test decides when finals may settle."""


class GatedModel:
    key, parallelism, languages = ("gated",), 1, ["en"]

    def transcribe(self, audio, *, language, word_timestamps, partial=False):
        GATE.wait(120)
        return AsrResult("held", [], language, 1.0)


@hookimpl
def register_asr(register):
    register("gated", lambda options, context: type("E", (), {"variants": {"fast": GatedModel()}})(),
             {"type": "object", "properties": {"models": {"type": "object"}}})


@pytest.fixture
async def worker(tmp_path: Path):
    raw = yaml.safe_load((ENGINES / "whisper-streaming.yaml").read_text())
    raw["capabilities"]["models"] = ["fast"]
    raw["config_schema"]["properties"]["model"]["enum"] = ["fast"]
    raw["pipeline"]["asr"] = {"plugin": "gated", "options": {"models": {"fast": {}}}}
    raw["pipeline"].pop("turn")  # the silence timer: these tests are about the connection, not the turn
    (tmp_path / "gated.yaml").write_text(yaml.safe_dump(raw))
    GATE.clear()
    w = Worker(Settings(host="127.0.0.1", port=0, engines_dir=tmp_path, ping_interval_s=PING_S, max_pending_finals=1,
                        idle_timeout_s=600, lag_limit_s=600, lag_warning_s=600),
               load_plugins(env={"ENGINE_HOST_PLUGINS": "vad_silero"}, extra=[sys.modules[__name__]]))
    await w.start()
    try:
        yield w
    finally:
        GATE.set()
        await w.shutdown()


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(PING_S / 4)


async def collect(ws) -> list[dict]:
    return [json.loads(m) async for m in ws]


async def test_a_backlogged_client_is_not_dropped_while_its_pongs_wait_behind_its_frames(worker):
    flushes = 40
    async with connect(f"ws://127.0.0.1:{worker.port}/session?enable_vad=false&interim_results=false",
                       ping_interval=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.begin"

        async def send() -> None:  # blocks once the worker stops reading: TCP backpressure
            for _ in range(flushes):  # each flush cuts an utterance: one final each, and only one may wait
                await ws.send(b"\x01\x00" * 8000)  # 0.5 s: more than min_speech_s, so each flush is an utterance
                await ws.send(json.dumps({"type": "flush"}))
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        await asyncio.wait_for(until(lambda: len(worker.sessions) == 1), 60)
        (session,) = worker.sessions
        # The first final waits on the gate, so the next frame is held back, its frames unread.
        await asyncio.wait_for(until(lambda: session.decoding.held_back), 60)
        # A pong overdue through five ping intervals, excused each time (the old keepalive dropped the
        # client after one).
        while session.keepalive.excused < 5:
            assert session.decoding.held_back, "the gate holds the finals: the session stays held back"
            await asyncio.sleep(PING_S / 4)
        GATE.set()
        await asyncio.wait_for(sender, 120)
        messages = await asyncio.wait_for(collect(ws), 120)
    assert ws.close_code == 1000, (ws.close_code, ws.close_reason)
    kinds = [m["type"] for m in messages]
    assert kinds.count("flush.done") == flushes and kinds[-1] == "session.end"
    assert kinds.count("transcript.final") == flushes
    assert session.keepalive.pings >= 1


async def test_a_client_that_stops_answering_while_read_is_dropped(worker):
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.port)
    writer.write(handshake("/session"))
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    # A raw client that never answers pings and sends nothing: nothing is held back, so the keepalive
    # drops it (1011), whatever the idle timeout.
    frames = await asyncio.wait_for(read_frames_until_close(reader), 60)
    writer.close()
    opcode, payload = frames[-1]
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1011, frames[-3:]
    assert b"keepalive ping timeout" in payload
    assert any(op == 0x9 for op, _ in frames), "it was pinged first"
