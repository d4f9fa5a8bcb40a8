"""The session router over two real worker processes registered in a real redis-server."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import time
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from host.client import concat, read_wav, session_url, silence, stream
from host.wer import word_errors

from .support import (
    RouterProcess,
    free_port,
    handshake,
    http_get,
    raw_exchange,
    router_cluster,
    run_compat_snippet,
)

pytest.importorskip("redis")

HEARTBEAT_S = 0.5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis, two workers of capacity 2 and a router, all real processes."""
    yield from router_cluster(tmp_path_factory.mktemp("cluster"), "w", HEARTBEAT_S)


def active(workers) -> list[int]:
    return [w.health()["active_sessions"] if w.proc.poll() is None else -1 for w in workers]


async def wait_active(workers, expected: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (now := active(workers)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return now


async def open_session(url: str):
    """A routed session that has begun; returns (connection, session.begin)."""
    ws = await connect(url, open_timeout=10, max_size=None)
    begin = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert begin["type"] == "session.begin", begin
    return ws, begin


async def end_session(ws) -> dict:
    await ws.send(json.dumps({"type": "end"}))
    async for raw in ws:
        message = json.loads(raw)
        if message["type"] == "session.end":
            await ws.wait_closed()
            return message
    raise AssertionError(f"closed {ws.close_code} without session.end")


def test_router_lists_workers_and_health(cluster):
    _, workers, router = cluster
    listed = {w["worker_id"]: w for w in router.workers()}
    assert set(listed) == {"w1", "w2"}
    for w in workers:
        entry = listed[w.worker_id]
        assert entry["endpoint"] == w.url and entry["capacity"] == 2 and entry["status"] == "ready"
        assert entry["free"] == 2 and entry["engines"] == ["whisper-streaming"]
        assert entry["heartbeat_age_s"] < 5 * HEARTBEAT_S
    status, health = http_get(router.http + "/health")
    assert status == 200 and health["status"] == "healthy" and health["ready_workers"] == 2 and health["free"] == 4
    status, engines = http_get(router.http + "/engines")
    direct = http_get(workers[0].http + "/engines")[1]
    assert status == 200 and engines == [{**direct[0], "workers": 2}]  # bench reads endpointing from here
    assert http_get(router.http + "/nope")[0] == 404


async def test_routed_session_matches_a_direct_one(cluster, speech_by_id, speech):
    _, workers, router = cluster
    audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.0), read_wav(speech[2].path), silence(1.0))
    params = {"interim_results": False, "word_timestamps": True}
    direct = await stream(session_url(workers[0].url, **params), audio, speed=None)
    routed = await stream(session_url(router.url, **params), audio, speed=None)
    assert routed.close_code == 1000 and not routed.of("error")
    # Per kind, not interleaved: a final may overtake the next utterance's VAD events either way.
    vad = lambda r: [m for m in r.messages if m["type"].startswith("vad.")]  # noqa: E731
    assert vad(routed) == vad(direct)
    assert routed.messages[0]["type"] == "session.begin" and routed.messages[-1]["type"] == "session.end"
    strip = lambda m: {k: v for k, v in m.items() if k != "session_id"}  # noqa: E731
    assert [strip(m) for m in routed.finals] == [strip(m) for m in direct.finals]
    assert strip(routed.end) == strip(direct.end)
    assert routed.end["transcript"].lower().startswith("and so my fellow americans")


async def test_invalid_config_is_relayed_not_retried(cluster):
    _, _workers, router = cluster
    result = await stream(session_url(router.url, sample_rate=5), silence(0.1), speed=None)
    (error,) = result.of("error")
    assert error["code"] == "invalid_config" and "sample_rate" in error["message"]
    assert result.close_code == 1008
    async with connect(router.url + "/elsewhere") as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1008


async def test_sessions_spread_over_workers_and_capacity_is_enforced(cluster):
    _, workers, router = cluster
    opened = []
    try:
        for _ in range(4):
            opened.append(await open_session(session_url(router.url)))
        # Leases count at once, so the spread is exact even before the next heartbeat.
        assert await wait_active(workers, [2, 2]) == [2, 2]
        assert sorted(w["free"] for w in router.workers()) == [0, 0]
        async with connect(session_url(router.url), open_timeout=10) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1013, (ws.close_code, ws.close_reason)
        # Two routed sessions at once on a worker with one free slot: exactly one gets it.
        await end_session(opened.pop()[0])
        deadline = time.monotonic() + 5
        while sum(w["free"] for w in router.workers()) != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sorted(active(workers)) == [1, 2]
        results = await asyncio.gather(*(_try_open(router.url) for _ in range(2)))
        assert sorted(code or 0 for code, _ in results) == [0, 1013]  # 0: it began
        opened += [ws for code, ws in results if ws is not None]
        assert await wait_active(workers, [2, 2]) == [2, 2]
    finally:
        for ws, *_ in opened:
            await ws.close()
    assert await wait_active(workers, [0, 0]) == [0, 0]


async def _try_open(url: str):
    try:
        ws, begin = await open_session(session_url(url))
        return None, (ws, begin)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else 1006, None


async def test_router_checks_api_keys_at_its_handshake(cluster, tmp_path):
    redis_server, _workers, _ = cluster
    router = RouterProcess(tmp_path, redis_server.url, api_keys="secret-1")
    try:
        router.wait_healthy()
        with pytest.raises(InvalidStatus) as refused:
            async with connect(session_url(router.url)):
                pass
        assert refused.value.response.status_code == 401
        ws, begin = await open_session(session_url(router.url, api_key="secret-1"))
        assert (await end_session(ws))["session_id"] == begin["session_id"]
    finally:
        router.stop()
    assert "secret-1" not in router.log()


async def test_unreachable_worker_is_skipped_for_the_next(cluster):
    """A registered worker that does not answer (here: a record pointing at a closed port, with
    the most free capacity so it is tried first) costs one failed connect, then the router goes on."""
    redis_server, _workers, router = cluster
    r = redis_server.client()
    key = "dalston:realtime:worker:ghost"
    r.hset(key, mapping={
        "worker_id": "ghost", "endpoint": f"ws://127.0.0.1:{free_port()}", "capacity": "10", "engines": '["whisper-streaming"]',
        "models": '["fast", "accurate"]', "languages": '["en"]', "version": "0", "started_at": str(time.time()),
        "catalog": json.dumps({"whisper-streaming": {"capabilities": {"models": ["fast"], "languages": ["en"]}}}),
        "status": "ready", "active_sessions": "0", "memory": "{}", "last_heartbeat": str(time.time()),
    })
    r.expire(key, 30)
    r.sadd("dalston:realtime:workers", "ghost")
    try:
        ws, _begin = await open_session(session_url(router.url))
        await end_session(ws)
        assert "ghost unreachable" in router.log()
        assert [w["suspect"] for w in router.workers() if w["worker_id"] == "ghost"] == [True]
    finally:
        r.delete(key)
    assert "ghost" not in {w["worker_id"] for w in router.workers()}
    assert "ghost" not in r.smembers("dalston:realtime:workers")  # pruned by the read


@pytest.mark.parametrize("vendor", ["openai", "elevenlabs", "deepgram"])
async def test_compat_dialect_through_the_router(cluster, speech_by_id, vendor):
    """The router speaks each vendor dialect itself and native /session to the worker: the SDK
    snippets from docs/compat-*.md work through it unchanged (Deepgram's streams a WAV file, so
    the router waits for its header before it picks a worker)."""
    _, _, router = cluster
    utt = speech_by_id["librivox-sas01-0880"]
    text = await run_compat_snippet(vendor, utt, router)
    assert word_errors(utt.reference, text).wer <= 0.25, text


async def test_hostile_handshakes_leak_no_lease(cluster):
    """Two Authorization headers (no key needed: the router has none), and a query the worker rejects
    from a client that resets its connection as soon as it is upgraded: every lease comes back, so
    the next sessions find room (before, each such handshake held a slot for ROUTER_LEASE_TTL_S)."""
    _, workers, router = cluster
    assert await wait_leases(router, 0) == 0
    for _ in range(6):  # more than the 4 free slots
        answer = await raw_exchange(router.port, handshake("/session", "Authorization: Bearer a\r\n" * 2))
        assert answer.startswith(b"HTTP/1.1 400 ") and b"duplicate Authorization header" in answer
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(handshake("/session?sample_rate=5"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST
    assert await wait_leases(router, 0) == 0  # the lease TTL here is 30 s: released, not expired
    opened = [await open_session(session_url(router.url)) for _ in range(4)]
    for ws, _ in opened:
        await end_session(ws)
    assert await wait_active(workers, [0, 0]) == [0, 0]


async def wait_leases(router, expected: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (held := sum(w["leases"] for w in router.workers())) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return held


def test_router_lists_workers_only_to_key_holders_when_it_has_keys(cluster, tmp_path):
    redis_server, _, _ = cluster
    guarded = RouterProcess(tmp_path, redis_server.url, api_keys="router-key")
    try:
        guarded.wait_healthy()
        assert http_get(guarded.http + "/workers")[0] == 401
        assert http_get(guarded.http + "/workers?api_key=router-key")[0] == 200
        request = urllib.request.Request(guarded.http + "/workers", headers={"Authorization": "Bearer router-key"})
        with urllib.request.urlopen(request, timeout=5) as r:
            assert {w["worker_id"] for w in json.loads(r.read())} == {"w1", "w2"}
        assert http_get(guarded.http + "/health")[0] == 200  # probes need no key
    finally:
        guarded.stop()
    assert "Traceback" not in guarded.log()


async def test_worker_death_reports_worker_lost_and_new_sessions_avoid_it(cluster, speech):
    """Runs last in the module: it kills a worker."""
    _, workers, router = cluster
    audio = concat(*[x for u in speech[:3] for x in (read_wav(u.path), silence(1.0))])
    got_final = asyncio.Event()
    messages = []

    def on_message(m):
        messages.append(m)
        if m["type"] == "transcript.final":
            got_final.set()

    running = asyncio.create_task(stream(session_url(router.url, interim_results=False), audio, speed=2.0,
                                         on_message=on_message))
    await asyncio.wait_for(got_final.wait(), 60)
    victim = next(w for w in workers if w.health()["active_sessions"] == 1)
    survivor = next(w for w in workers if w is not victim)
    # The survivor full (sessions straight to it): no worker can take the lost session over, so the
    # client gets the worker_lost error (with room, it fails over: tests/test_failover.py).
    filling = [await open_session(session_url(survivor.url)) for _ in range(2)]
    victim.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    result = await asyncio.wait_for(running, 30)
    lost_after = time.monotonic() - killed_at
    for ws, _ in filling:
        await ws.close()
    assert await wait_active([survivor], [0]) == [0]

    (error,) = result.of("error")
    assert error["code"] == "worker_lost" and error["recoverable"] is False
    end = result.end
    assert end is not None and end["incomplete"] is True
    assert [s["text"] for s in end["segments"]] == [f["text"] for f in result.finals] and result.finals
    assert end["transcript"] == " ".join(f["text"] for f in result.finals)
    assert 0 < end["total_duration"] <= audio.seconds
    assert result.messages[-2:] == [error, end] and result.close_code == 1011

    # New sessions go to the survivor at once; the dead worker drops out of the registry within its TTL.
    opened = [await open_session(session_url(router.url)) for _ in range(2)]
    try:
        assert survivor.health()["active_sessions"] == 2
        code, _ = await _try_open(router.url)
        assert code == 1013
    finally:
        for ws, _ in opened:
            await ws.close()
    deadline = killed_at + 3 * HEARTBEAT_S + 2.0
    while victim.worker_id in {w["worker_id"] for w in router.workers()} and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    gone_after = time.monotonic() - killed_at
    assert victim.worker_id not in {w["worker_id"] for w in router.workers()}
    print(f"\nworker_lost reached the client {lost_after:.2f} s after SIGKILL; "
          f"the worker left /workers after {gone_after:.2f} s (TTL {3 * HEARTBEAT_S} s)")

