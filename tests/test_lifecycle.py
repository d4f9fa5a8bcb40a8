"""Worker lifecycle: /health while starting, clean shutdown with open sessions."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import read_wav, session_url

from .support import WorkerProcess, http_get


def test_health_is_503_starting_until_models_load(tmp_path):
    worker = WorkerProcess(tmp_path)
    seen = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            try:
                status, body = http_get(worker.http + "/health", timeout=1)
            except OSError:
                time.sleep(0.01)
                continue
            seen.append((status, body["status"]))
            if status == 200:
                break
            time.sleep(0.01)
        assert (503, "starting") in seen
        assert seen[-1] == (200, "healthy")
    finally:
        assert worker.stop() == 0


async def test_sigterm_drains_then_ends_open_sessions_with_1001(tmp_path, speech_by_id):
    """SIGTERM: new sessions are refused and /health says draining while open sessions go on
    working; at the drain deadline each gets its finals, session.end and close 1001."""
    worker = WorkerProcess(tmp_path, drain_timeout_s=3)
    worker.wait_healthy()
    audio = read_wav(speech_by_id["jfk"].path)
    second = 16000 * 2
    try:
        async with connect(session_url(worker.url)) as ws:
            assert json.loads(await ws.recv())["type"] == "session.begin"
            await ws.send(audio.pcm[: 4 * second])  # 4 s of speech, still open
            await asyncio.sleep(0.5)
            signalled = time.monotonic()  # before the signal: the worker's drain clock starts after it
            worker.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            status, health = http_get(worker.http + "/health")
            assert (status, health["status"]) == (503, "draining")
            async with connect(session_url(worker.url)) as refused:
                with pytest.raises(ConnectionClosed):
                    await refused.recv()
            assert (refused.close_code, refused.close_reason) == (1013, "Server draining")
            # The open session still works while draining: more audio, a flush, its final.
            await ws.send(audio.pcm[4 * second: 8 * second])
            await ws.send(json.dumps({"type": "flush"}))
            messages = [json.loads(raw) async for raw in ws]
            closed_after = time.monotonic() - signalled
        assert ws.close_code == 1001
        kinds = [m["type"] for m in messages]
        # The flush was served by the draining worker: its flush.done came before the drain's end.
        assert "flush.done" in kinds and kinds.index("flush.done") < kinds.index("session.end")
        assert kinds[-1] == "session.end" and kinds.count("transcript.final") >= 1
        assert messages[-1]["total_duration"] == pytest.approx(8.0, abs=0.01)
        assert messages[-1]["transcript"].lower().startswith("and so my fellow americans")
        assert closed_after >= 3  # not before the drain deadline (the worker's clock starts after ours)
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0  # exits by itself after the drain
    finally:
        worker.stop()
    assert "Traceback" not in worker.log()
