"""The Redis registry plugin against a real redis-server and a real worker process."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from host.client import concat, read_wav, session_url, silence, stream
from tests.support import WorkerProcess, free_port

redis = pytest.importorskip("redis")


@pytest.fixture
def redis_url(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


async def test_worker_registers_heartbeats_and_records_sessions(tmp_path, redis_url, speech_by_id):
    worker = WorkerProcess(tmp_path, env={"REDIS_URL": redis_url, "HEARTBEAT_INTERVAL_S": "0.5"}, max_sessions=2)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        worker.wait_healthy()
        key = f"dalston:realtime:worker:test-{worker.port}"
        deadline = time.monotonic() + 10
        while not r.hget(key, "last_heartbeat") and time.monotonic() < deadline:
            time.sleep(0.1)
        fields = r.hgetall(key)
        assert fields["status"] == "ready"
        assert fields["capacity"] == "2" and fields["active_sessions"] == "0"
        assert json.loads(fields["engines"]) == ["whisper-streaming"]
        assert json.loads(fields["models"]) == ["accurate", "fast"]
        assert json.loads(fields["memory"])["rss_bytes"] > 0
        assert 0 < r.pttl(key) <= 1500  # three heartbeats
        assert f"test-{worker.port}" in r.smembers("dalston:realtime:workers")

        audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.0))
        result = await stream(session_url(worker.url), audio, speed=None)
        assert result.finals
        deadline = time.monotonic() + 10
        while not r.xlen("dalston:realtime:sessions") and time.monotonic() < deadline:
            time.sleep(0.1)
        (_, record), = r.xrange("dalston:realtime:sessions")
        assert record["session_id"] == result.end["session_id"]
        assert record["status"] == "completed" and float(record["audio_seconds"]) == pytest.approx(12.0, abs=0.01)
    finally:
        worker.stop()
    assert not r.exists(key)  # a clean shutdown deregisters
