"""Worker lifecycle: /health while starting, clean shutdown with open sessions."""

from __future__ import annotations

import asyncio
import json
import signal
import time

from websockets.asyncio.client import connect

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


async def test_sigterm_ends_open_sessions_with_1001(tmp_path, speech_by_id):
    worker = WorkerProcess(tmp_path)
    worker.wait_healthy()
    audio = read_wav(speech_by_id["jfk"].path)
    try:
        async with connect(session_url(worker.url)) as ws:
            assert json.loads(await ws.recv())["type"] == "session.begin"
            await ws.send(audio.pcm[: 16000 * 2 * 4])  # 4 s of speech, still open
            await asyncio.sleep(0.5)
            worker.proc.send_signal(signal.SIGTERM)
            messages = []
            async for raw in ws:
                messages.append(json.loads(raw))
        assert ws.close_code == 1001
        kinds = [m["type"] for m in messages]
        assert kinds[-1] == "session.end"
        assert "transcript.final" in kinds  # the open utterance was finalized, not lost
        assert messages[-1]["transcript"]
    finally:
        code = worker.stop()
    assert code == 0
    assert "Traceback" not in worker.log()
