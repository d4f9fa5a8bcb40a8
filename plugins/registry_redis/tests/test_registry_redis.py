"""The Redis registry plugin against a real redis-server and real worker processes."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from host.client import concat, read_wav, session_url, silence, stream
from tests.support import WorkerProcess

pytest.importorskip("redis")


def wait_for(check, timeout: float, step: float = 0.02):
    """Poll ``check`` until it returns something truthy; return it (or the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


async def test_worker_registers_heartbeats_and_records_sessions(tmp_path, redis_server, speech_by_id):
    worker = WorkerProcess(tmp_path, env={"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL_S": "0.5"}, max_sessions=2)
    r = redis_server.client()
    key = f"dalston:realtime:worker:{worker.worker_id}"
    try:
        worker.wait_healthy()
        assert wait_for(lambda: r.hget(key, "last_heartbeat"), 10)
        fields = r.hgetall(key)
        assert fields["status"] == "ready"
        assert fields["endpoint"] == worker.url
        assert fields["capacity"] == "2" and fields["active_sessions"] == "0"
        assert json.loads(fields["engines"]) == ["whisper-streaming"]
        assert json.loads(fields["models"]) == ["accurate", "fast", "multilingual"]
        catalog = json.loads(fields["catalog"])
        assert list(catalog) == ["whisper-streaming"]
        assert catalog["whisper-streaming"]["capabilities"]["models"] == ["fast", "accurate", "multilingual"]
        assert catalog["whisper-streaming"]["endpointing"]["endpoint_silence_s"] == 0.5
        assert json.loads(fields["memory"])["rss_bytes"] > 0
        assert float(fields["started_at"]) <= float(fields["last_heartbeat"]) <= time.time() + 1
        assert 0 < r.pttl(key) <= 1500  # three heartbeats
        assert worker.worker_id in r.smembers("dalston:realtime:workers")

        audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.0))
        result = await stream(session_url(worker.url), audio, speed=None)
        assert result.finals
        assert wait_for(lambda: r.xlen("dalston:realtime:sessions"), 10)
        (_, record), = r.xrange("dalston:realtime:sessions")
        assert record["session_id"] == result.end["session_id"]
        assert record["worker_id"] == worker.worker_id
        assert record["status"] == "completed" and float(record["audio_seconds"]) == pytest.approx(12.0, abs=0.01)
        assert float(record["ended_at"]) >= float(record["started_at"])
    finally:
        worker.stop()
    assert not r.exists(key)  # a clean shutdown deregisters
    assert worker.worker_id not in r.smembers("dalston:realtime:workers")


async def test_redis_outage_keeps_sessions_and_worker_reregisters(tmp_path, redis_server, speech):
    """Redis stops mid-session and comes back empty: the session transcribes on, the worker
    re-registers within a heartbeat, the record of a session that ended meanwhile is delivered,
    and once the worker is SIGKILLed its key expires within three heartbeats."""
    interval = 1.0
    worker = WorkerProcess(tmp_path, env={"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL_S": str(interval)})
    r = redis_server.client()
    key = f"dalston:realtime:worker:{worker.worker_id}"
    long_audio = concat(*[x for u in speech[:3] for x in (read_wav(u.path), silence(1.0))])
    short_audio = concat(read_wav(speech[3].path), silence(1.0))
    try:
        worker.wait_healthy()
        assert wait_for(lambda: r.exists(key), 10)
        long_run = asyncio.create_task(stream(session_url(worker.url, interim_results=False), long_audio, speed=3.0))
        await asyncio.sleep(2.0)
        redis_server.stop()
        during = await stream(session_url(worker.url, interim_results=False), short_audio, speed=None)
        assert during.finals and not during.of("error")
        await asyncio.sleep(1.5 * interval)  # a failed heartbeat or two
        redis_server.start()  # empty: no persistence
        t0 = time.monotonic()
        r = redis_server.client()
        assert await asyncio.to_thread(wait_for, lambda: r.exists(key), 10), worker.log()
        back_after = time.monotonic() - t0
        print(f"\nre-registered {back_after:.2f} s after Redis came back (heartbeat {interval} s)")
        assert back_after <= interval + 1.0
        assert worker.worker_id in r.smembers("dalston:realtime:workers")

        result = await long_run
        assert not result.of("error")
        assert len(result.finals) >= 3 and result.end["total_duration"] == pytest.approx(long_audio.seconds, abs=0.01)
        sessions = await asyncio.to_thread(
            wait_for, lambda: len(r.xrange("dalston:realtime:sessions")) >= 2 and r.xrange("dalston:realtime:sessions"), 10)
        ids = {record["session_id"] for _, record in sessions}
        assert {during.end["session_id"], result.end["session_id"]} <= ids  # nothing lost in the outage
        assert "registry heartbeat failed" in worker.log()

        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
        t0 = time.monotonic()
        assert await asyncio.to_thread(wait_for, lambda: not r.exists(key), 3 * interval + 1.0)
        print(f"worker key expired {time.monotonic() - t0:.2f} s after SIGKILL (TTL {3 * interval} s)")
    finally:
        worker.stop()


def test_registry_url_and_options_configure_the_plugin(tmp_path, redis_server):
    """REGISTRY_URL picks the registry by its scheme (no ENGINE_HOST_REGISTRY, no REDIS_URL), and
    --registry-option goes on top of ENGINE_HOST_REGISTRY_OPTIONS."""
    options = {"key_prefix": "from-env", "max_session_records": 5}
    env = {"REGISTRY_URL": redis_server.url, "ENGINE_HOST_REGISTRY_OPTIONS": json.dumps(options),
           "HEARTBEAT_INTERVAL_S": "0.5"}
    worker = WorkerProcess(tmp_path, env=env, registry_option="key_prefix=from-flag")
    r = redis_server.client()
    try:
        worker.wait_healthy()
        assert wait_for(lambda: r.hget(f"from-flag:worker:{worker.worker_id}", "status") == "ready", 10)
        assert worker.worker_id in r.smembers("from-flag:workers")
        assert not r.keys("dalston:realtime:*") and not r.keys("from-env:*")
    finally:
        worker.stop()


def test_an_unknown_registry_option_stops_the_worker(tmp_path, redis_server):
    worker = WorkerProcess(tmp_path, env={"REGISTRY_URL": redis_server.url}, registry_option="key_prefx=x")
    try:
        assert worker.proc.wait(120) == 1
        assert "registry 'redis' has no option 'key_prefx'" in worker.log()
    finally:
        worker.stop()
