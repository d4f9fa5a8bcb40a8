"""Session recording (SESSIONS_DIR): WAV + transcript JSON per session, retention, SIGTERM and crashes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import wave
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.client import connect

from host.client import concat, read_wav, session_url, silence, stream

from .support import WorkerProcess


def read_recording(uri: str) -> np.ndarray:
    path = Path(urlsplit(uri).path)
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


async def test_sessions_are_recorded_and_old_recordings_expire(tmp_path, speech_by_id):
    rec = tmp_path / "sessions"
    old = rec / "2020-01-01" / "sess_old.wav"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"RIFF")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    worker = WorkerProcess(tmp_path, sessions_dir=rec, sessions_retention_s=3600)
    try:
        worker.wait_healthy()
        audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.0))
        result = await stream(session_url(worker.url, word_timestamps=True), audio, speed=None)
    finally:
        worker.stop()
    assert not old.exists() and not old.parent.exists(), "retention deletes recordings past their age"
    end = result.end
    recorded = read_recording(end["audio_uri"])
    sent = np.frombuffer(audio.pcm, "<i2")
    assert len(recorded) == len(sent) == round(end["total_duration"] * 16000)
    assert np.abs(recorded.astype(int) - sent).max() <= 1  # the audio as received, at 16 kHz
    document = json.loads(Path(urlsplit(end["transcript_uri"]).path).read_text())
    assert document["session_id"] == end["session_id"] and document["status"] == "completed"
    assert document["segments"] == end["segments"] and document["transcript"] == end["transcript"]
    assert all(s["words"] for s in document["segments"])
    assert document["config"]["word_timestamps"] is True and document["engine"] == "whisper-streaming"
    assert document["ended_at"] >= document["started_at"]
    assert Path(urlsplit(end["audio_uri"]).path).parent.parent == rec


async def test_sigterm_finalizes_and_recordings_match_the_finals(tmp_path, speech):
    rec = tmp_path / "sessions"
    worker = WorkerProcess(tmp_path, sessions_dir=rec, drain_timeout_s=0.5)
    worker.wait_healthy()
    audios = [concat(read_wav(u.path), silence(1.0), read_wav(speech[i + 4].path)) for i, u in enumerate(speech[:2])]
    try:
        runs = [asyncio.create_task(stream(session_url(worker.url, interim_results=False), a, speed=2.0))
                for a in audios]
        await asyncio.sleep(4.0)
        worker.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*runs)
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0  # exits by itself after the drain
    finally:
        worker.stop()
    for result in results:
        assert result.close_code == 1001 and result.messages[-1]["type"] == "session.end"
        end = result.end
        assert result.finals and [s["text"] for s in end["segments"]] == [f["text"] for f in result.finals]
        recorded = read_recording(end["audio_uri"])
        assert len(recorded) == round(end["total_duration"] * 16000)
        document = json.loads(Path(urlsplit(end["transcript_uri"]).path).read_text())
        assert [s["text"] for s in document["segments"]] == [f["text"] for f in result.finals]


async def test_a_crash_leaves_a_readable_partial_recording(tmp_path, speech_by_id):
    rec = tmp_path / "sessions"
    worker = WorkerProcess(tmp_path, sessions_dir=rec)
    worker.wait_healthy()
    audio = read_wav(speech_by_id["jfk"].path)
    try:
        async with connect(session_url(worker.url)) as ws:
            session_id = json.loads(await ws.recv())["session_id"]
            await ws.send(audio.pcm[: 16000 * 2 * 5])  # 5 s
            await asyncio.sleep(1.0)
            worker.proc.send_signal(signal.SIGKILL)
            worker.proc.wait(10)
    finally:
        worker.stop()
    (path,) = rec.glob(f"*/{session_id}.wav")
    with wave.open(str(path)) as w:
        frames = w.getnframes()
        data = np.frombuffer(w.readframes(frames), "<i2")
    assert 4 * 16000 <= frames <= 5 * 16000  # every whole chunk written before the crash
    assert path.stat().st_size == 44 + 2 * frames  # the header agrees with the data
    assert np.abs(data.astype(int) - np.frombuffer(audio.pcm[: 2 * frames], "<i2")).max() <= 1
    assert not list(rec.glob(f"*/{session_id}.json"))
