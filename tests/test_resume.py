"""Resume after a dropped connection (docs/protocol.md, "Resume"): real worker processes, real
WebSocket connections, real speech, and the client's TCP connection cut mid-utterance."""

from __future__ import annotations

import asyncio
import json
import time
import wave

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import concat, read_wav, session_url, silence
from host.relay import segment_of
from host.wer import word_errors

from .support import WorkerProcess

GAP_S = 1.2
SPEED = 3.0  # × real time
CHUNK = 3200  # 0.1 s of 16 kHz s16


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A worker whose parked sessions wait long enough for any reconnect here."""
    w = WorkerProcess(tmp_path_factory.mktemp("resume"), max_sessions=2, resume_window_s=120)
    w.wait_healthy()
    yield w
    w.stop()
    assert "Traceback" not in w.log(), w.log()


@pytest.fixture(scope="module")
def conversation(speech):
    """Three utterances with silence between them; each one's byte span in the stream."""
    picked = [u for u in speech if 4.0 <= u.duration <= 9.0][:3]
    parts, spans, at = [silence(0.4)], [], len(silence(0.4).pcm)
    for u in picked:
        audio = read_wav(u.path)
        assert audio.sample_rate == 16000 and audio.channels == 1
        parts += [audio, silence(GAP_S)]
        spans.append((at, at + len(audio.pcm)))
        at += len(audio.pcm) + len(silence(GAP_S).pcm)
    return concat(*parts).pcm, spans, " ".join(u.reference for u in picked)


class Connection:
    """One WebSocket of a session and every message it received."""

    def __init__(self, ws):
        self.ws = ws
        self.messages: list[dict] = []
        self.arrived = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.messages.append(json.loads(raw))
                self.arrived.set()
        except ConnectionClosed:
            pass
        self.arrived.set()

    async def wait_for(self, predicate, timeout: float = 120.0) -> dict:
        async def until() -> dict:
            while True:
                found = next((m for m in self.messages if predicate(m)), None)
                if found is not None:
                    return found
                if self.reader.done():
                    raise AssertionError(f"closed before the message came: {self.messages[-3:]}")
                self.arrived.clear()
                await self.arrived.wait()
        return await asyncio.wait_for(until(), timeout)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    @property
    def last_seq(self) -> int:
        return max((m["seq"] for m in self.messages if "seq" in m), default=0)


async def open_connection(url: str) -> Connection:
    ws = await connect(url, max_size=None, open_timeout=30, ping_interval=None)
    return Connection(ws)


async def send_audio(conn: Connection, pcm: bytes, speed: float | None = SPEED) -> None:
    t0, sent = time.monotonic(), 0
    for i in range(0, len(pcm), CHUNK):
        frame = pcm[i:i + CHUNK]
        sent += len(frame)
        if speed:
            await asyncio.sleep(max(0.0, t0 + sent / 32000 / speed - time.monotonic()))
        await conn.ws.send(frame)


def drop(conn: Connection) -> None:
    """Cut the TCP connection: no close frame, as when the network goes away."""
    conn.ws.transport.abort()


async def resume(base: str, token: str, last_seq: int, attempts: int = 200, timeout: float = 30) -> Connection:
    """Re-attach through ``base`` (a worker or a router), retrying while the worker has not yet seen
    the old connection go (resume_in_use)."""
    for _ in range(attempts):
        conn = await open_connection(f"{base}/session?resume={token}&last_seq={last_seq}")
        first = await conn.wait_for(lambda m: True, timeout)
        if first["type"] == "session.resumed":
            return conn
        assert first["type"] == "error" and first["code"] == "resume_in_use", first
        await conn.reader
        await asyncio.sleep(0.05)
    raise AssertionError("the session never became resumable")


async def test_resume_after_a_tcp_reset_mid_utterance_loses_nothing(worker, conversation):
    pcm, spans, reference = conversation
    first = await open_connection(session_url(worker.url, resumable=True))
    begin = await first.wait_for(lambda m: m["type"] == "session.begin")
    assert begin["seq"] == 1 and begin["config"]["resumable"] is True
    token = begin["resume_token"]
    assert len(token) >= 32
    # Up to the middle of the second utterance, once the first one's final (and its ack) are in.
    cut = (spans[1][0] + spans[1][1]) // 2 // 2 * 2
    await send_audio(first, pcm[:spans[1][0]])
    await first.wait_for(lambda m: m["type"] == "audio.ack")
    await send_audio(first, pcm[spans[1][0]:cut])
    await first.wait_for(lambda m: m["type"] == "vad.speech_start" and m["timestamp"] > spans[1][0] / 32000 - 0.5)
    drop(first)
    await first.reader
    last_seq = first.last_seq
    acks = first.of("audio.ack")
    assert acks and all(a["bytes"] <= cut for a in acks)
    assert [a["bytes"] for a in acks] == sorted(a["bytes"] for a in acks)
    ack_bytes = acks[-1]["bytes"]
    # The client keeps its audio after the last ack; the server says where it wants it from.
    second = await resume(worker.url, token, last_seq)
    resumed = second.messages[0]
    assert "seq" not in resumed and resumed["session_id"] == begin["session_id"]
    assert resumed["last_seq"] == last_seq
    assert ack_bytes <= resumed["ack_bytes"] <= resumed["audio_bytes"] <= cut
    assert resumed["audio_bytes"] % 2 == 0
    kept = pcm[ack_bytes:]
    await send_audio(second, kept[resumed["audio_bytes"] - ack_bytes:])
    await second.ws.send(json.dumps({"type": "end"}))
    end = await second.wait_for(lambda m: m["type"] == "session.end")
    await second.reader
    assert second.ws.close_code == 1000
    # seq: 1, 2, 3… across both connections, none repeated, none missing.
    seqs = [m["seq"] for m in first.messages + second.messages[1:]]
    assert seqs == list(range(1, len(seqs) + 1))
    finals = first.of("transcript.final") + second.of("transcript.final")
    assert [f["segment_id"] for f in finals] == list(range(len(finals)))
    assert [f["utterance_id"] for f in finals] == sorted({f["utterance_id"] for f in finals})
    assert end["segments"] == [segment_of(f) for f in finals]
    assert end["transcript"] == " ".join(f["text"] for f in finals)
    # The utterance cut by the drop was transcribed whole, once: the words match the speech.
    assert word_errors(reference, end["transcript"]).wer <= 0.25, end["transcript"]
    assert end["total_duration"] == pytest.approx(len(pcm) / 32000, abs=0.01)
    worker.wait_idle()


async def test_wrong_token_double_attach_and_ended_session_are_refused(worker, speech_by_id):
    pcm = read_wav(speech_by_id["jfk"].path).pcm
    wrong = await open_connection(f"{worker.url}/session?resume=not-a-token&last_seq=0")
    await wrong.reader
    assert [(m["type"], m["code"], m["recoverable"]) for m in wrong.messages] == [("error", "invalid_resume", False)]
    assert (wrong.ws.close_code, wrong.ws.close_reason) == (1008, "Resume refused")

    first = await open_connection(session_url(worker.url, resumable=True))
    begin = await first.wait_for(lambda m: m["type"] == "session.begin")
    token = begin["resume_token"]
    await send_audio(first, pcm[:len(pcm) // 2], speed=None)
    drop(first)
    await first.reader
    second = await resume(worker.url, token, first.last_seq)
    # While one connection is attached, the token is refused to another.
    third = await open_connection(f"{worker.url}/session?resume={token}&last_seq={first.last_seq}")
    await third.reader
    assert [(m["type"], m["code"]) for m in third.messages] == [("error", "resume_in_use")]
    assert third.ws.close_code == 1008
    await second.ws.send(json.dumps({"type": "end"}))
    end = await second.wait_for(lambda m: m["type"] == "session.end")
    await second.reader
    finals = first.of("transcript.final") + second.of("transcript.final")
    assert end["segments"] == [segment_of(f) for f in finals]
    late = await open_connection(f"{worker.url}/session?resume={token}&last_seq=0")
    await late.reader
    assert [(m["type"], m["code"]) for m in late.messages] == [("error", "resume_expired")]
    worker.wait_idle()


async def test_out_of_range_last_seq_is_refused_and_the_session_stays_parked(worker, speech_by_id):
    pcm = read_wav(speech_by_id["jfk"].path).pcm
    first = await open_connection(session_url(worker.url, resumable=True))
    token = (await first.wait_for(lambda m: m["type"] == "session.begin"))["resume_token"]
    await send_audio(first, pcm[:len(pcm) // 3], speed=None)
    drop(first)
    await first.reader
    for _ in range(200):  # until the server has seen the drop: then last_seq is what is judged
        bad = await open_connection(f"{worker.url}/session?resume={token}&last_seq=999999")
        await bad.reader
        if bad.messages[0]["code"] != "resume_in_use":
            break
        await asyncio.sleep(0.05)
    assert bad.messages[0]["code"] == "invalid_resume" and "last_seq" in bad.messages[0]["message"]
    good = await resume(worker.url, token, first.last_seq)
    assert good.messages[0]["type"] == "session.resumed"
    await good.ws.send(json.dumps({"type": "end"}))
    await good.wait_for(lambda m: m["type"] == "session.end")
    await good.reader
    worker.wait_idle()


async def test_a_session_never_resumed_frees_its_slot_after_the_window_and_is_recorded(tmp_path, speech_by_id):
    rec = tmp_path / "sessions"
    w = WorkerProcess(tmp_path, sessions_dir=rec, resume_window_s=2, max_sessions=1)
    try:
        w.wait_healthy()
        utt = speech_by_id["jfk"]
        pcm = read_wav(utt.path).pcm  # no silence after: the last utterance is still open at the drop
        conn = await open_connection(session_url(w.url, resumable=True))
        begin = await conn.wait_for(lambda m: m["type"] == "session.begin")
        await send_audio(conn, pcm, speed=None)
        await (await conn.ws.ping())  # the worker has every frame before the pong
        drop(conn)
        await conn.reader
        w.wait_idle(timeout=120)  # the slot comes back (after the window) and finalizing ends
        assert w.health()["active_sessions"] == 0
        log = w.log()
        parked = log.index(f"session {begin['session_id']}: connection lost; parked")
        assert parked < log.index(f"session {begin['session_id']}: not resumed within") < log.index(
            f"session {begin['session_id']} ended: status=completed")
        late = await open_connection(f"{w.url}/session?resume={begin['resume_token']}&last_seq=1")
        await late.reader
        assert [(m["type"], m["code"]) for m in late.messages] == [("error", "resume_expired")]
        # A new session gets the freed slot.
        fresh = await open_connection(session_url(w.url))
        assert (await fresh.wait_for(lambda m: True))["type"] == "session.begin"
        await fresh.ws.close()
    finally:
        w.stop()
    documents = list(rec.glob(f"*/{begin['session_id']}.json"))
    assert len(documents) == 1
    document = json.loads(documents[0].read_text())
    assert document["session_id"] == begin["session_id"] and document["status"] == "completed"
    assert word_errors(utt.reference, document["transcript"]).wer <= 0.2, document["transcript"]
    with wave.open(str(documents[0].with_suffix(".wav"))) as recorded:
        assert recorded.getnframes() == len(pcm) // 2  # every byte the client sent
    assert "Traceback" not in w.log_path.read_text()


async def test_the_python_client_resumes_by_itself(worker, conversation):
    """host.client.stream(resume=True): its connection cut mid-utterance, it reconnects, resumes, re-sends
    the audio the server lacks, and ends with every final once."""
    pcm, spans, reference = conversation
    from host.client import Audio, stream

    connections = []
    cut = (spans[1][0] + spans[1][1]) // 2

    def on_message(message: dict) -> None:
        if (len(connections) == 1 and message["type"] == "vad.speech_start"
                and message["timestamp"] > spans[1][0] / 32000 - 0.5 and len(message) > 0):
            connections[0].transport.abort()  # mid-utterance: the second utterance has begun

    result = await stream(session_url(worker.url), Audio(pcm, 16000, 1), speed=SPEED, resume=True, on_message=on_message,
                          on_connected=connections.append)
    assert cut > 0 and len(connections) >= 2
    assert result.of("session.resumed") and result.end is not None
    finals = result.finals
    assert [f["segment_id"] for f in finals] == list(range(len(finals)))
    assert result.end["segments"] == [segment_of(f) for f in finals]
    seqs = [m["seq"] for m in result.messages if "seq" in m]
    assert seqs == list(range(1, len(seqs) + 1))
    assert word_errors(reference, result.end["transcript"]).wer <= 0.25, result.end["transcript"]
    worker.wait_idle()
