"""Resume through the router (docs/protocol.md, "Resume"): real redis-server, a real worker, two real
routers, real speech; the client's TCP connection cut mid-utterance, and a router SIGKILLed mid-session.
The client resumes through the other router: the token resolves (via Redis) to the worker holding the
parked session."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from host.client import session_url
from host.relay import segment_of

from .support import RedisServer, RouterProcess, WorkerProcess
from .test_resume import conversation, drop, open_connection, resume, send_audio  # noqa: F401 - the fixture

pytest.importorskip("redis")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis, one worker whose parked sessions wait long enough, and two routers."""
    tmp = tmp_path_factory.mktemp("resume_router")
    redis_server = RedisServer(tmp)
    env = {"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL_S": "0.5"}
    worker = WorkerProcess(tmp, env=env, max_sessions=2, worker_id="r1", resume_window_s=120)
    routers = [RouterProcess(tmp, redis_server.url), RouterProcess(tmp, redis_server.url)]
    try:
        worker.wait_healthy()
        for r in routers:
            r.wait_healthy()
            deadline = time.monotonic() + 30
            while not [w for w in r.workers() if w["status"] == "ready"] and time.monotonic() < deadline:
                time.sleep(0.1)
        yield redis_server, worker, routers
    finally:
        for r in routers:
            r.stop()
        worker.stop()
        redis_server.stop()
    assert "Traceback" not in worker.log(), worker.log()
    for r in routers:
        assert "Traceback" not in r.log(), r.log()


def token_key(redis_server, token: str) -> str | None:
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        return client.get(f"dalston:realtime:resume:{token}")
    finally:
        client.close()


async def finish_and_check(first, second, begin, pcm, ack_bytes: int, cut: int):
    """Send what the server lacks, end, and check nothing was lost or repeated across both connections."""
    resumed = second.messages[0]
    assert "seq" not in resumed and resumed["session_id"] == begin["session_id"]
    assert resumed["last_seq"] == first.last_seq
    assert ack_bytes <= resumed["ack_bytes"] <= resumed["audio_bytes"] <= cut
    await send_audio(second, pcm[resumed["audio_bytes"]:])
    await second.ws.send(json.dumps({"type": "end"}))
    end = await second.wait_for(lambda m: m["type"] == "session.end")
    await second.reader
    assert second.ws.close_code == 1000
    seqs = [m["seq"] for m in first.messages + second.messages[1:]]
    assert seqs == list(range(1, len(seqs) + 1))  # continuous: none repeated, none missing
    finals = first.of("transcript.final") + second.of("transcript.final")
    assert len(finals) >= 3  # one per utterance at least: the cut one was transcribed after the resume
    assert [f["segment_id"] for f in finals] == list(range(len(finals)))
    assert [f["utterance_id"] for f in finals] == sorted({f["utterance_id"] for f in finals})
    assert end["segments"] == [segment_of(f) for f in finals]
    return end


async def cut_mid_second_utterance(router_url: str, pcm, spans):
    first = await open_connection(session_url(router_url, resumable=True))
    begin = await first.wait_for(lambda m: m["type"] == "session.begin")
    assert begin["seq"] == 1 and begin["config"]["resumable"] is True and begin["resume_token"]
    cut = (spans[1][0] + spans[1][1]) // 2 // 2 * 2
    await send_audio(first, pcm[:spans[1][0]])
    await first.wait_for(lambda m: m["type"] == "audio.ack")
    await send_audio(first, pcm[spans[1][0]:cut])
    await first.wait_for(lambda m: m["type"] == "vad.speech_start" and m["timestamp"] > spans[1][0] / 32000 - 0.5)
    return first, begin, cut


async def test_routed_session_resumes_through_another_router_after_a_tcp_reset(cluster, conversation):  # noqa: F811
    redis_server, worker, routers = cluster
    pcm, spans, _ = conversation
    first, begin, cut = await cut_mid_second_utterance(routers[0].url, pcm, spans)
    token = begin["resume_token"]
    record = json.loads(token_key(redis_server, token) or "{}")
    assert record["worker_id"] == worker.worker_id and record["session_id"] == begin["session_id"]
    drop(first)
    await first.reader
    ack_bytes = first.of("audio.ack")[-1]["bytes"]
    second = await resume(routers[1].url, token, first.last_seq, 400, 60)
    await finish_and_check(first, second, begin, pcm, ack_bytes, cut)
    worker.wait_idle()
    assert token_key(redis_server, token) is None  # the ended session's record is gone
    # The worker parked the session because the router dropped its connection without a close frame.
    assert f"session {begin['session_id']}: connection lost; parked" in worker.log()
    assert f"session {begin['session_id']} resumed on {worker.worker_id}" in routers[1].log()


async def test_unknown_token_through_the_router_is_refused_like_the_workers(cluster):
    _, worker, routers = cluster
    answers = []
    for base in (routers[0].url, worker.url):
        conn = await open_connection(f"{base}/session?resume=not-a-token&last_seq=0")
        await conn.reader
        answers.append(([(m["type"], m["code"], m["message"], m["recoverable"]) for m in conn.messages],
                        conn.ws.close_code, conn.ws.close_reason))
    assert answers[0] == answers[1]
    assert answers[0][0][0][:2] == ("error", "invalid_resume") and answers[0][1:] == (1008, "Resume refused")


async def test_router_killed_mid_session_the_client_resumes_through_the_other(cluster, conversation, tmp_path):  # noqa: F811
    redis_server, worker, routers = cluster
    pcm, spans, _ = conversation
    doomed = RouterProcess(tmp_path, redis_server.url)
    try:
        doomed.wait_healthy()
        while not [w for w in doomed.workers() if w["status"] == "ready"]:
            await asyncio.sleep(0.1)
        first, begin, cut = await cut_mid_second_utterance(doomed.url, pcm, spans)
        doomed.proc.send_signal(signal.SIGKILL)
        await first.reader  # the client sees its connection go
        assert first.ws.close_code in (None, 1006)
    finally:
        doomed.stop()
    ack_bytes = first.of("audio.ack")[-1]["bytes"]
    second = await resume(routers[1].url, begin["resume_token"], first.last_seq, 400, 60)
    await finish_and_check(first, second, begin, pcm, ack_bytes, cut)
    worker.wait_idle()
