"""No client can hurt another: malformed requests, pre-auth memory, slots held after a client is
gone, and one session's decode storm, each against a real worker process on 127.0.0.1.

Hostile clients here speak raw TCP where the websockets client would be too polite (it answers
close frames, it does not pipeline requests, it stops sending when told to close).
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading

import psutil
import pytest
from websockets.asyncio.client import connect

from host.adversary import flush_storm, upload_loop
from host.client import concat, read_wav, session_url, silence, stream
from host.scheduler import FINAL, PARTIAL, InferenceQueue
from host.wer import word_errors

from .support import WorkerProcess, client_frame, handshake, metrics, raw_exchange, read_frames_until_close

KEY = "isolation-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
AUTH_LINE = f"Authorization: Bearer {KEY}\r\n"
IDLE_S = 2.0
CAPACITY = 6


@pytest.fixture(scope="module")
def shielded(tmp_path_factory):
    """A worker with an API key and a short idle timeout."""
    w = WorkerProcess(tmp_path_factory.mktemp("shielded"), api_keys=KEY, idle_timeout_s=IDLE_S,
                      max_sessions=CAPACITY)
    w.wait_healthy()
    yield w
    w.stop()
    log = w.log()
    assert "Traceback" not in log, log
    assert KEY not in log, "the API key was logged"


# --- 2. malformed HTTP ----------------------------------------------------------------------


async def test_malformed_requests_get_a_clean_answer_and_one_log_line(shielded):
    answer = await raw_exchange(shielded.port, handshake("/session", AUTH_LINE * 2))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"duplicate Authorization header" in answer
    answer = await raw_exchange(shielded.port, handshake("/session", f"Upgrade: websocket\r\n{AUTH_LINE}"))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"duplicate Upgrade header" in answer
    answer = await raw_exchange(shielded.port, b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET\r\n" in answer
    # Pipelined: the first request is answered (and says the connection closes), the second dropped.
    answer = await raw_exchange(shielded.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in answer
    assert answer.count(b"HTTP/1.1") == 1
    # A handshake followed by frames before the 101 (RFC 6455 4.1 forbids them) still works in order.
    early = client_frame(0x1, json.dumps({"type": "end"}).encode())
    answer = await raw_exchange(shielded.port, handshake(f"/session?api_key={KEY}") + early, until=b"session.end")
    assert answer.startswith(b"HTTP/1.1 101 ") and b"session.end" in answer
    log = shielded.log()
    assert "Traceback" not in log and "AssertionError" not in log
    assert log.count("duplicate Authorization header") == 1 and log.count("method not allowed") == 1


# --- 4. memory before auth ------------------------------------------------------------------


async def push_frames(port: int, path: str, frames: int, stop: asyncio.Event) -> None:
    """A client that upgrades, then pushes 1 MiB frames without reading or answering anything."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake(path))
    blob = client_frame(0x2, bytes(1 << 20))
    try:
        for _ in range(frames):
            if stop.is_set():
                break
            writer.write(blob)
            await asyncio.wait_for(writer.drain(), 2)
    except (TimeoutError, OSError):
        pass  # the server dropped us or stopped reading: what it should do
    await stop.wait()
    writer.close()


async def test_hostile_connections_before_auth_cost_little_memory(shielded):
    """20 upgrades to a bad path (no key needed) and 20 unauthenticated /session upgrades, each
    pushing frames: before, each one pinned 64-72 MiB for the 10 s close timeout."""
    process = psutil.Process(shielded.proc.pid)
    before = peak = process.memory_info().rss
    stop = asyncio.Event()
    clients = [asyncio.create_task(push_frames(shielded.port, path, 64, stop))
               for path in ["/nope"] * 20 + ["/session"] * 20]
    for _ in range(50):  # sample while they push (before the fix the peak came within 4 s)
        await asyncio.sleep(0.1)
        peak = max(peak, process.memory_info().rss)
    stop.set()
    await asyncio.gather(*clients)
    assert peak - before < 64 << 20, f"RSS grew {(peak - before) >> 20} MiB under 40 hostile connections"
    assert shielded.health()["status"] == "healthy"


# --- 5. slots held after the client is gone ---------------------------------------------------


async def test_a_vanished_peer_gives_its_slot_back_at_the_idle_timeout(shielded):
    """The peer reads but never answers the close frame: its slot was free before the close frame
    came, and the server drops the TCP connection instead of waiting 10 s for a reply."""
    shielded.wait_idle()
    reader, writer = await asyncio.open_connection("127.0.0.1", shielded.port)
    try:
        writer.write(handshake(f"/session?api_key={KEY}"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        frames = await asyncio.wait_for(read_frames_until_close(reader), 60)
        assert shielded.health()["active_sessions"] == 0
        assert await asyncio.wait_for(reader.read(), 60) == b"", "the server kept the TCP connection"
    finally:
        writer.close()
    texts = [json.loads(payload) for opcode, payload in frames if opcode == 0x1]
    assert [m["type"] for m in texts] == ["session.begin", "error", "session.end"]
    assert texts[1]["code"] == "idle_timeout"
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 1008


async def test_a_normal_close_after_a_mix_of_controls_frees_the_slot(shielded):
    """The reported sequence (audio, flush with language "zz", clear, controls whose type is a
    number or null, several audio frames), then a normal close, all in one TCP write after the upgrade. The close
    arrived while the session still had messages to read, so the socket's reading was paused;
    answering the unknown message then waited the 10 s close timeout for a TCP close that only
    reading would have seen, and the slot stayed held."""
    shielded.wait_idle()
    audio = bytes(3200)
    sequence = [audio, {"type": "flush", "language": "zz"}, audio, {"type": "clear"}, audio, {"type": "flush"},
                audio, {"type": 5}, *[audio] * 24, {"type": "clear"}, audio, audio, {"type": None}]
    frames = b"".join(client_frame(0x2, m) if isinstance(m, bytes) else client_frame(0x1, json.dumps(m).encode())
                      for m in sequence)
    reader, writer = await asyncio.open_connection("127.0.0.1", shielded.port)
    try:
        writer.write(handshake(f"/session?api_key={KEY}&enable_vad=false"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        writer.write(frames + client_frame(0x8, struct.pack("!H", 1000)))
        await asyncio.wait_for(read_frames_until_close(reader), 30)  # the server's answer to our close
    finally:
        writer.close()  # then the client closes TCP, as websockets clients do
        await writer.wait_closed()
    await asyncio.to_thread(shielded.wait_idle, 8)  # the hold it replaces was the 10 s close timeout


async def test_clients_that_drop_mid_utterance_give_slots_back_before_their_finals(shielded, speech_by_id):
    """Finalizing a dropped session's open speech no longer holds its slot: the slot is free when the
    socket is gone, while the decode (accounted in the scheduler) still runs."""
    shielded.wait_idle()
    speech = read_wav(speech_by_id["jfk"].path).pcm
    clients = []
    for _ in range(CAPACITY):
        ws = await connect(session_url(shielded.url), additional_headers=AUTH)
        assert json.loads(await ws.recv())["type"] == "session.begin"
        await ws.send(speech[: len(speech) // 2])
        clients.append(ws)
    for ws in clients:  # an utterance is open in each
        while json.loads(await ws.recv())["type"] != "vad.speech_start":
            pass
    for ws in clients:
        ws.transport.abort()
    samples = []
    for _ in range(3000):  # until every session has finished finalizing
        h = shielded.health()
        samples.append((h["active_sessions"], h["finalizing"]))
        if samples[-1] == (0, 0):
            break
        await asyncio.sleep(0.02)
    assert samples[-1] == (0, 0), samples[-5:]
    assert any(active == 0 and finalizing > 0 for active, finalizing in samples), samples


# --- 3. fair inference ----------------------------------------------------------------------------


def test_the_queue_is_fair_between_sessions_and_serves_uploads_last():
    """One thread, held busy; a storm of finals from one session, then one final from another, a
    partial, and an upload's final: the other session's final runs after at most one of the storm's."""

    async def scenario() -> list[str]:
        q = InferenceQueue("fair", threads=1)
        order: list[str] = []
        gate = threading.Event()
        q.start()
        try:
            blocker = q.submit(lambda: gate.wait(5), FINAL, owner="storm")
            await asyncio.sleep(0.05)  # the blocker holds the thread: the storm has used decoder time
            jobs = [q.submit(lambda i=i: order.append(f"storm{i}"), FINAL, owner="storm") for i in range(5)]
            jobs.append(q.submit(lambda: order.append("upload"), FINAL, owner="upload", bulk=True))
            jobs.append(q.submit(lambda: order.append("partial"), PARTIAL, owner="ordinary"))
            jobs.append(q.submit(lambda: order.append("ordinary"), FINAL, owner="ordinary"))
            assert q.waiting(FINAL) == 6 and q.depth == 8
            gate.set()
            await asyncio.gather(blocker.future, *(j.future for j in jobs))
            return order
        finally:
            q.stop()

    order = asyncio.run(scenario())
    # Least used first: "ordinary" has used nothing, "storm" the blocker's time. Bulk after everything.
    assert order == ["ordinary", "storm0", "storm1", "storm2", "storm3", "storm4", "partial", "upload"], order


def queued_decodes(worker) -> float:
    """Inference jobs waiting, all models and priorities (from /metrics)."""
    return sum(v for k, v in metrics(worker).items() if k.startswith("engine_host_queue_depth{"))


async def sample_queue(worker, done: asyncio.Event) -> list[float]:
    depths = []
    while not done.is_set():
        depths.append(await asyncio.to_thread(queued_decodes, worker))
        await asyncio.sleep(0.2)
    return depths


async def test_a_flush_storm_cannot_starve_a_real_time_session(shielded, speech_by_id):
    shielded.wait_idle()
    utt = speech_by_id["jfk"]
    done = asyncio.Event()
    flooder = asyncio.create_task(flush_storm(session_url(shielded.url, enable_vad=False), done, headers=AUTH))
    sampler = asyncio.create_task(sample_queue(shielded, done))
    await asyncio.sleep(1.0)  # the storm is on
    try:
        ordinary = await stream(session_url(shielded.url, api_key=KEY), concat(read_wav(utt.path), silence(1.0)),
                                speed=1.0)
    finally:
        done.set()
    flood, depths = await flooder, await sampler
    # The ordinary session loses nothing and is never cut.
    assert ordinary.end is not None and ordinary.close_code == 1000, ordinary.of("error")
    assert not ordinary.of("error")
    assert word_errors(utt.reference, ordinary.end["transcript"]).wer <= 0.3, ordinary.end["transcript"]
    # The flooder is held to its own few decodes (backpressure): the queue never held its storm
    # (before: 645 decodes waiting), and it still got every flush answered and its session.end.
    assert max(depths) <= 2 * 4 + 2, depths
    assert flood.end is not None and flood.flush_done == flood.flushes, flood
    assert set(flood.errors) <= {"rate_limited"}, flood.errors


async def test_uploads_use_the_capacity_real_time_sessions_leave(shielded, speech, speech_by_id):
    """Three clients stream a minute of speech each as fast as they can while a real-time session runs:
    the real-time one keeps its transcript; the uploads are slowed, not failed."""
    shielded.wait_idle()
    minute = concat(*[part for u in speech[:12] for part in (read_wav(u.path), silence(0.5))])
    utt = speech_by_id["jfk"]
    url = session_url(shielded.url, api_key=KEY, interim_results=False)
    uploads = [asyncio.create_task(upload_loop(url, minute, asyncio.Event(), once=True)) for _ in range(3)]
    await asyncio.sleep(0.5)
    ordinary = await stream(session_url(shielded.url, api_key=KEY), concat(read_wav(utt.path), silence(1.0)),
                            speed=1.0)
    results = await asyncio.gather(*uploads)
    assert ordinary.end is not None and not ordinary.of("error"), ordinary.of("error")
    assert word_errors(utt.reference, ordinary.end["transcript"]).wer <= 0.3, ordinary.end["transcript"]
    for r in results:
        assert r.ended == 1 and r.finals >= 6 and r.errors == [], r


def test_one_session_holds_at_most_half_the_threads_while_another_waits():
    """Two threads, a storm of finals from one session and one partial from another: the partial
    runs beside the storm's first final instead of after all of them."""

    async def scenario() -> list[str]:
        q = InferenceQueue("share", threads=2)
        order: list[str] = []
        lock = threading.Lock()
        gate = threading.Event()

        def job(name: str, wait: bool = False):
            def run() -> None:
                with lock:
                    order.append(name)
                if wait:
                    gate.wait(5)
            return run

        jobs = [q.submit(job("storm0", wait=True), FINAL, owner="storm")]
        jobs += [q.submit(job(f"storm{i}"), FINAL, owner="storm") for i in (1, 2)]
        jobs.append(q.submit(job("partial"), PARTIAL, owner="ordinary"))
        q.start()  # both threads start with everything queued
        try:
            while len(order) < 2:
                await asyncio.sleep(0.01)
            gate.set()
            await asyncio.gather(*(j.future for j in jobs))
            return order
        finally:
            q.stop()

    order = asyncio.run(scenario())
    assert order[:2] == ["storm0", "partial"], order
