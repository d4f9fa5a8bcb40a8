"""Protocol edges against a real worker: paths, capacity, bad config, bad messages, flush, end, disconnects."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import concat, read_wav, session_url, silence, stream
from host.wer import word_errors

from .support import http_get


async def recv_json(ws, timeout: float = 30.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws, kind: str, timeout: float = 60.0) -> list[dict]:
    """Messages up to and including the first of type ``kind``."""
    out = []
    while True:
        m = await recv_json(ws, timeout)
        out.append(m)
        if m["type"] == kind:
            return out


async def wait_closed(ws, timeout: float = 10.0) -> None:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed:
        pass


async def test_invalid_path_closes_1008(worker):
    async with connect(worker.url + "/nope") as ws:
        await wait_closed(ws)
    assert ws.close_code == 1008
    assert ws.close_reason == "Invalid path"


def test_invalid_http_path_is_404(worker):
    assert http_get(worker.http + "/nope")[0] == 404


def test_health_over_http(worker):
    status, body = http_get(worker.http + "/health")
    assert status == 200
    assert body["status"] == "healthy"
    assert body["capacity"] == 3
    assert body["engines"] == ["whisper-streaming"]
    assert isinstance(body["active_sessions"], int)
    assert body["worker_id"].startswith("test-")


async def test_health_over_websocket(worker):
    async with connect(worker.url + "/health") as ws:
        body = await recv_json(ws)
        await wait_closed(ws)
    assert body["status"] == "healthy"
    assert ws.close_code == 1000


def test_engines_endpoint(worker):
    status, body = http_get(worker.http + "/engines")
    assert status == 200
    (engine,) = body
    assert engine["id"] == "whisper-streaming"
    assert engine["capabilities"]["models"] == ["fast", "accurate", "multilingual"]
    assert engine["config_schema"]["properties"]["model"]["default"] == "fast"


async def test_session_begin_applies_defaults(idle_worker):
    async with connect(session_url(idle_worker.url)) as ws:
        begin = await recv_json(ws)
        await ws.send(json.dumps({"type": "end"}))
        end = await recv_json(ws)
    assert begin["type"] == "session.begin"
    assert begin["engine"] == "whisper-streaming"
    assert begin["config"] == {
        "model": "fast", "language": "auto", "interim_results": True, "word_timestamps": False,
        "enable_vad": True, "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1,
        "endpointing": "turn", "eagerness": "auto", "silence_ms": None, "turn_events": False,
    }
    assert end["type"] == "session.end" and end["segments"] == [] and end["transcript"] == ""


@pytest.mark.parametrize("query, param", [
    ({"model": "huge"}, "model"),
    ({"model": "fast", "language": "de"}, "language"),  # without model, a variant serving de is chosen
    ({"language": "zz"}, "language"),
    ({"word_timestamps": "maybe"}, "word_timestamps"),
    ({"sample_rate": "4000"}, "sample_rate"),
    ({"encoding": "mp3"}, "encoding"),
    ({"channels": "3"}, "channels"),
    ({"engine": "nope"}, "engine"),
    ({"colour": "blue"}, "colour"),
])
async def test_bad_config_is_invalid_config_1008(idle_worker, query, param):
    async with connect(session_url(idle_worker.url, **query)) as ws:
        error = await recv_json(ws)
        await wait_closed(ws)
    assert error["type"] == "error" and error["code"] == "invalid_config"
    assert error["recoverable"] is False
    assert param in error["message"]
    assert error["param"] == param  # structured: no client parses it out of the text
    assert ws.close_code == 1008


async def test_capacity_closes_1013(idle_worker):
    cap = idle_worker.health()["capacity"]
    held = []
    try:
        for _ in range(cap):
            ws = await connect(session_url(idle_worker.url))
            assert (await recv_json(ws))["type"] == "session.begin"
            held.append(ws)
        async with connect(session_url(idle_worker.url)) as extra:
            await wait_closed(extra)
        assert extra.close_code == 1013
        assert extra.close_reason == "Server at capacity"
    finally:
        for ws in held:
            await ws.close()
    idle_worker.wait_idle()


async def test_disconnect_without_end_frees_slot(idle_worker, speech_by_id):
    audio = read_wav(speech_by_id["jfk"].path)
    ws = await connect(session_url(idle_worker.url))
    await recv_json(ws)
    await ws.send(audio.pcm[: len(audio.pcm) // 2])
    # Abrupt: drop the TCP connection without a closing handshake.
    ws.transport.abort()
    t0 = time.monotonic()
    while idle_worker.health()["active_sessions"] and time.monotonic() - t0 < 30:
        await asyncio.sleep(0.05)
    assert idle_worker.health()["active_sessions"] == 0
    assert idle_worker.proc.poll() is None


async def test_bad_messages_are_recoverable(idle_worker, speech_by_id):
    utt = speech_by_id["jfk"]
    audio = concat(read_wav(utt.path), silence(1.0))
    half = len(audio.pcm) // 2 // 2 * 2
    async with connect(session_url(idle_worker.url)) as ws:
        await recv_json(ws)
        await ws.send(audio.pcm[:half])
        await ws.send("{not json")
        await ws.send(json.dumps({"type": "dance"}))
        await ws.send(json.dumps(["type", "flush"]))
        await ws.send(json.dumps({"type": "config", "word_timestamps": True}))
        await ws.send(json.dumps({"type": "config", "language": "xx"}))
        await ws.send(audio.pcm[half:])
        await ws.send(json.dumps({"type": "end"}))
        messages = await recv_until(ws, "session.end")
        await wait_closed(ws)
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == [
        "invalid_json", "unknown_message", "unknown_message", "invalid_config", "invalid_config"]
    assert all(e["recoverable"] for e in errors)
    assert word_errors(utt.reference, messages[-1]["transcript"]).wer <= 0.2
    assert ws.close_code == 1000


async def test_frames_split_anywhere_transcribe_identically(idle_worker, speech_by_id):
    utt = speech_by_id["1688-142285-0003"]
    audio = concat(silence(0.5), read_wav(utt.path), silence(1.0))
    rng = random.Random(7)
    chunks, pos = [], 0
    while pos < len(audio.pcm):
        n = rng.choice([1, 3, 7, 333, 1001, 4097, 12345])
        chunks.append(audio.pcm[pos:pos + n])
        pos += n
    assert any(len(c) % 2 for c in chunks)
    url = session_url(idle_worker.url, word_timestamps=True)
    aligned = await stream(url, audio, speed=None)
    split = await stream(url, audio, speed=None, chunks=chunks)
    assert split.end["transcript"] == aligned.end["transcript"] != ""
    assert split.end["segments"] == aligned.end["segments"]
    assert split.end["total_duration"] == aligned.end["total_duration"]


async def test_flush_finalizes_mid_speech(idle_worker, speech_by_id):
    utt = speech_by_id["jfk"]
    audio = read_wav(utt.path)
    cut = int(16000 * 5.0) * 2  # 5 s in: in the middle of a sentence
    async with connect(session_url(idle_worker.url)) as ws:
        await recv_json(ws)
        await ws.send(audio.pcm[:cut])
        await ws.send(json.dumps({"type": "flush"}))
        flushed = await recv_until(ws, "flush.done")
        await ws.send(audio.pcm[cut:] + silence(1.0).pcm)
        await ws.send(json.dumps({"type": "end"}))
        rest = await recv_until(ws, "session.end")
    finals_before = [m for m in flushed if m["type"] == "transcript.final"]
    assert finals_before, "flush produced no final"
    assert finals_before[-1]["end"] <= 5.0 + 1e-3
    assert "vad.speech_end" in [m["type"] for m in flushed]
    end = rest[-1]
    all_finals = finals_before + [m for m in rest if m["type"] == "transcript.final"]
    assert [s["text"] for s in end["segments"]] == [f["text"] for f in all_finals]
    assert word_errors(utt.reference, end["transcript"]).wer <= 0.35


async def test_flush_without_speech_answers_done(idle_worker):
    async with connect(session_url(idle_worker.url)) as ws:
        await recv_json(ws)
        await ws.send(silence(0.5).pcm)
        await ws.send(json.dumps({"type": "flush"}))
        assert [m["type"] for m in await recv_until(ws, "flush.done")] == ["flush.done"]


async def test_clear_drops_unfinalized_audio(idle_worker, speech_by_id):
    audio = read_wav(speech_by_id["jfk"].path)
    async with connect(session_url(idle_worker.url)) as ws:
        await recv_json(ws)
        await ws.send(audio.pcm[: 16000 * 2 * 2])  # 2 s of speech, no endpoint yet
        await ws.send(json.dumps({"type": "clear"}))
        await ws.send(json.dumps({"type": "end"}))
        messages = await recv_until(ws, "session.end")
    assert not [m for m in messages if m["type"] == "transcript.final"]
    assert messages[-1]["segments"] == []


async def test_no_vad_mode_cuts_on_flush(idle_worker, speech_by_id):
    utt = speech_by_id["jfk"]
    audio = concat(read_wav(utt.path), silence(0.5))
    result = await stream(session_url(idle_worker.url, enable_vad=False), audio, speed=None)
    assert not result.of("vad.speech_start") and not result.of("vad.speech_end")
    assert len(result.finals) == 1
    assert word_errors(utt.reference, result.end["transcript"]).wer <= 0.2


async def test_oversized_frame_is_recoverable(idle_worker, speech_by_id):
    utt = speech_by_id["jfk"]
    audio = concat(read_wav(utt.path), silence(1.0))
    async with connect(session_url(idle_worker.url), max_size=None) as ws:
        await recv_json(ws)
        await ws.send(b"\x00" * ((1 << 20) + 2))
        error = await recv_json(ws)
        await ws.send(audio.pcm)
        await ws.send(json.dumps({"type": "end"}))
        end = (await recv_until(ws, "session.end"))[-1]
    assert error["code"] == "frame_too_large" and error["recoverable"] is True
    assert word_errors(utt.reference, end["transcript"]).wer <= 0.2


async def test_alias_path(idle_worker, speech_by_id):
    audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.0))
    result = await stream(f"{idle_worker.url}/v1/audio/transcriptions/stream", audio, speed=None)
    assert result.finals and result.close_code == 1000


def test_docs_list_every_endpointing_option_and_health_field(worker):
    """docs/protocol.md's endpointing table names every option, and its /health example every field."""
    from pathlib import Path

    from host.endpointing_options import ENDPOINTING_KEYS

    docs = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    table = docs[docs.index("#### Endpointing options"):docs.index("#### Transcripts")]
    assert {k for k in ENDPOINTING_KEYS if f"| `{k}` |" not in table} == set()
    status, body = http_get(worker.http + "/health")
    example = json.loads(docs[docs.index("`GET /health`, ready:"):].split("```json", 1)[1].split("```", 1)[0])
    assert status == 200 and set(body) == set(example)
