"""API keys, /metrics, idle timeout, session length limit and control-message rate, on one real worker."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from host.client import concat, read_wav, session_url, silence, stream

from .support import WorkerProcess, collect, http_get, metrics

KEYS = ("key-one", "key-two")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A worker with API keys, a 1.5 s idle timeout, an 8 s session limit and 5 control messages/s."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# operators' keys\n{KEYS[1]}\n\n")
    w = WorkerProcess(tmp_path_factory.mktemp("guarded"), api_keys=KEYS[0], api_keys_file=keys_file,
                      idle_timeout_s=1.5, max_session_s=8, max_control_per_s=5)
    w.wait_healthy()
    yield w
    w.stop()
    log = w.log()
    assert "Traceback" not in log, log
    assert not any(k in log for k in KEYS), "an API key was logged"


async def refused_status(url: str, headers=None) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers):
            pass
    return info.value.response.status_code


async def test_api_keys_guard_sessions_not_health(guarded):
    assert await refused_status(session_url(guarded.url)) == 401
    assert await refused_status(session_url(guarded.url), {"Authorization": "Bearer nope"}) == 401
    assert await refused_status(session_url(guarded.url, api_key="nope")) == 401
    assert await refused_status(session_url(guarded.url), {"Authorization": f"Basic {KEYS[0]}"}) == 401
    for url, headers in ((session_url(guarded.url), AUTH), (session_url(guarded.url, api_key=KEYS[0]), None)):
        async with connect(url, additional_headers=headers) as ws:
            assert json.loads(await ws.recv())["type"] == "session.begin"
    assert http_get(guarded.http + "/health")[0] == 200
    assert http_get(guarded.http + "/engines")[0] == 200
    assert metrics(guarded)['engine_host_sessions_refused_total{reason="unauthorized"}'] >= 4


async def test_vendor_key_forms_on_the_compat_endpoints(guarded):
    """ElevenLabs' xi-api-key header and ?token=, Deepgram's Authorization: Token, checked like Bearer."""
    elevenlabs = f"{guarded.url}/v1/speech-to-text/realtime?model_id=scribe_v2_realtime"
    deepgram = f"{guarded.url}/v1/listen?encoding=linear16&sample_rate=16000"
    assert await refused_status(elevenlabs, {"xi-api-key": "nope"}) == 401
    assert await refused_status(elevenlabs + "&token=nope") == 401
    assert await refused_status(deepgram, {"Authorization": "Token nope"}) == 401
    for url, headers in ((elevenlabs, {"xi-api-key": KEYS[1]}), (elevenlabs + f"&token={KEYS[0]}", None)):
        async with connect(url, additional_headers=headers) as ws:
            assert json.loads(await ws.recv())["message_type"] == "session_started"
    async with connect(deepgram, additional_headers={"Authorization": f"Token {KEYS[0]}"}) as ws:
        await ws.send(json.dumps({"type": "CloseStream"}))
        assert json.loads(await ws.recv())["type"] == "Metadata"


async def test_deepgram_container_stream_without_audio_times_out(guarded):
    """No encoding and no audio: the session cannot start; after IDLE_TIMEOUT_S a Deepgram Error, 1008."""
    # The client's clock starts before the connection, so the worker's (which starts with the
    # session) cannot have run longer: the wait is at least the timeout by causality, on any machine.
    t0 = time.monotonic()
    async with connect(f"{guarded.url}/v1/listen", additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"type": "KeepAlive"}))
        messages = await collect(ws)
        waited = time.monotonic() - t0
    assert [m["type"] for m in messages] == ["Error"] and "no audio within 1.5 s" in messages[0]["description"]
    assert ws.close_code == 1008 and waited >= 1.5


async def test_idle_session_is_ended_with_idle_timeout(guarded):
    # The idle clock starts when the worker opens the session, after this one (it once measured
    # 1.4987 s from session.begin on a loaded machine): the lower bound holds by causality.
    t0 = time.monotonic()
    async with connect(session_url(guarded.url), additional_headers=AUTH) as ws:
        assert json.loads(await ws.recv())["type"] == "session.begin"
        messages = await collect(ws)
        waited = time.monotonic() - t0
    assert [m["type"] for m in messages] == ["error", "session.end"]
    assert messages[0]["code"] == "idle_timeout" and messages[0]["recoverable"] is False
    assert (ws.close_code, ws.close_reason) == (1008, "Idle timeout")
    assert waited >= 1.5


async def test_session_length_limit(guarded, speech_by_id):
    """Audio keeps coming (so it is not idle), but the session may not outlive max_session_s."""
    audio = read_wav(speech_by_id["jfk"].path)
    result = await stream(session_url(guarded.url, api_key=KEYS[0]), concat(audio, audio), speed=1.0)
    error = result.of("error")[-1]
    assert error["code"] == "max_duration" and error["recoverable"] is False
    assert result.close_code == 1008 and result.messages[-1]["type"] == "session.end"
    # The client paces itself from after session.begin and never runs ahead of real time, so by
    # the worker's 8 s it cannot have sent more than 8 s and one 0.1 s frame (it may have sent less:
    # a loaded machine makes a client late, never early).
    assert 0 < result.end["total_duration"] <= 8.1 + 1e-3
    assert result.finals, "speech before the limit is transcribed and kept"


async def test_control_message_flood_is_rate_limited_and_session_survives(guarded, speech_by_id):
    async with connect(session_url(guarded.url), additional_headers=AUTH, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.begin"
        for _ in range(40):
            await ws.send(json.dumps({"type": "config", "language": "en"}))
        await asyncio.sleep(1.2)  # the bucket refills
        await ws.send(concat(read_wav(speech_by_id["jfk"].path), silence(1.0)).pcm)
        await ws.send(json.dumps({"type": "end"}))
        messages = await collect(ws)
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"]  # one report, not one per dropped message
    assert errors[0]["recoverable"] is True
    assert messages[-1]["type"] == "session.end" and messages[-1]["transcript"]
    assert ws.close_code == 1000


async def test_metrics_count_sessions_audio_latency_and_errors(guarded, speech_by_id):
    before = metrics(guarded)
    audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.0))
    result = await stream(session_url(guarded.url, api_key=KEYS[0]), audio, speed=None)
    assert result.finals
    await asyncio.sleep(0.2)  # the session's end is counted after its socket closes
    after = metrics(guarded)
    key = 'engine_host_sessions_total{status="completed"}'
    assert after[key] - before.get(key, 0) == 1
    assert after["engine_host_audio_seconds_total"] - before["engine_host_audio_seconds_total"] == pytest.approx(
        audio.seconds, abs=0.01)
    assert after["engine_host_speech_seconds_total"] > before["engine_host_speech_seconds_total"]
    finals = len(result.finals)
    assert after["engine_host_final_latency_seconds_count"] - before["engine_host_final_latency_seconds_count"] == finals
    assert after['engine_host_errors_total{code="idle_timeout"}'] >= 1
    assert after["engine_host_active_sessions"] == 0 and after["engine_host_capacity"] == 16
    assert after["engine_host_ready"] == 1
    assert after['engine_host_memory_bytes{device="cpu",kind="rss"}'] > 100e6
    assert any(k.startswith("engine_host_queue_depth{") for k in after)
    windows = after["engine_host_vad_windows_total"] - before["engine_host_vad_windows_total"]
    assert windows >= int(audio.seconds * 16000) // 512  # every window of the session, warm-ups too
    assert after["engine_host_vad_cpu_seconds_total"] > before["engine_host_vad_cpu_seconds_total"]

    def delta(prefix: str, *labels: str) -> float:
        """Change of every sample of ``prefix`` whose labels include all of ``labels``."""
        keys = [k for k in after if k.startswith(prefix + "{") and all(x in k for x in labels)]
        return sum(after[k] - before.get(k, 0.0) for k in keys)

    # Every final came from a final decode or from a speculative one that was used.
    assert (delta("engine_host_inference_jobs_total", 'kind="final"', 'outcome="completed"')
            + delta("engine_host_speculative_decodes_total", 'outcome="used"')) >= finals
    assert delta("engine_host_inference_seconds_total", 'kind="final"') + delta(
        "engine_host_inference_seconds_total", 'kind="speculative"') > 0


async def test_metrics_can_require_a_key(tmp_path):
    w = WorkerProcess(tmp_path, api_keys=KEYS[0], metrics_auth="true")
    try:
        w.wait_healthy()
        assert http_get(w.http + "/metrics")[0] == 401
        request = urllib.request.Request(w.http + "/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200 and b"engine_host_active_sessions" in r.read()
        assert http_get(w.http + "/health")[0] == 200
    finally:
        w.stop()


async def test_missing_key_file_is_a_clear_startup_error(tmp_path):
    w = WorkerProcess(tmp_path, api_keys_file=tmp_path / "absent.txt")
    assert w.proc.wait(60) == 1
    w.stop()
    assert "cannot read API key file" in w.log() and "Traceback" not in w.log()
