"""Dalston's realtime protocol on /v1/audio/transcriptions/stream: a client that speaks exactly
what Dalston's Python SDK (``dalston_sdk``, not on any package registry) speaks, against real workers.

:class:`SdkClient` builds the SDK's query string (``store_audio=true&store_transcript=true``
always, ``vocabulary`` as a JSON array), sends its messages (binary audio, ``flush``, ``end``) and
parses server messages by the SDK's rules: top-level ``model``/``language`` in ``session.begin``,
``words[].text`` in finals (a word without it raises, which lost the SDK's session), and any
type it does not know reported as an ``unknown_message`` error. Real speech (../shared/speech)
is scored with the speech set's WER. The recording flags are checked on a worker that records
(SESSIONS_DIR), directly and through a router; the dialect's mapping is also checked without a worker.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import Audio, concat, read_wav, silence
from host.compat import Query
from host.compat.dalston import DalstonDialect
from host.protocol import ConfigError
from host.recording import Keep
from host.wer import word_errors
from tests.support import RedisServer, RouterProcess, WorkerProcess, chunks

PATH = "/v1/audio/transcriptions/stream"
UTT_IDS = ["librivox-sas01-0880", "1688-142285-0004", "1688-142285-0003", "librivox-sas01-0930"]
SHORT_ID = "1688-142285-0004"
KNOWN = ("session.begin", "session.end", "transcript.partial", "transcript.final", "vad.speech_start",
         "vad.speech_end", "error")
"""The message types the SDK parses; any other becomes an ``unknown_message`` error for it."""


class SdkError(Exception):
    """What the SDK raises when the first message is an error instead of session.begin."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def sdk_parse(data: dict) -> dict:
    """A server message as the SDK reads it (its fields, its defaults, its KeyErrors)."""
    kind = data.get("type", "")
    if kind == "session.begin":
        return {"type": kind, "session_id": data["session_id"], "model": data.get("model", ""),
                "language": data.get("language", "auto"), "sample_rate": data.get("sample_rate", 16000),
                "encoding": data.get("encoding", "pcm_s16le")}
    if kind == "session.end":
        return {"type": kind, "session_id": data["session_id"],
                "total_audio_seconds": data.get("total_duration", data.get("total_audio_seconds", 0.0)),
                "total_billed_seconds": data.get("total_billed_seconds")}
    if kind == "transcript.partial":
        return {"type": kind, "text": data.get("text", ""), "start": data.get("start", 0.0), "end": data.get("end", 0.0)}
    if kind == "transcript.final":
        words = None
        if data.get("words"):
            words = [{"text": w["text"], "start": w["start"], "end": w["end"], "confidence": w.get("confidence"),
                      "speaker_id": w.get("speaker_id")} for w in data["words"]]
        return {"type": kind, "text": data.get("text", ""), "start": data.get("start", 0.0),
                "end": data.get("end", 0.0), "words": words, "confidence": data.get("confidence")}
    if kind in ("vad.speech_start", "vad.speech_end"):
        return {"type": kind, "timestamp": data.get("timestamp", 0.0)}
    if kind == "error":
        return {"type": "error", "code": data.get("code", "unknown"), "message": data.get("message", "Unknown error"),
                "details": data.get("details")}
    return {"type": "error", "code": "unknown_message", "message": f"Unknown message type: {kind}", "details": data}


class SdkClient:
    """One session in the SDK's wire format: its URL, its messages, its parsing."""

    def __init__(self, base: str, *, language: str = "auto", model: str | None = None, word_timestamps: bool = False,
                 vocabulary: list[str] | None = None, store_audio: bool = True, store_transcript: bool = True,
                 extra: dict[str, str] | None = None):
        params = {"language": language}
        if model:
            params["model"] = model
        params.update({"encoding": "pcm_s16le", "sample_rate": "16000", "enable_vad": "true",
                       "interim_results": "true", "word_timestamps": str(word_timestamps).lower()})
        if store_audio:  # the SDK sends these only when true
            params["store_audio"] = "true"
        if store_transcript:
            params["store_transcript"] = "true"
        if vocabulary:
            params["vocabulary"] = json.dumps(vocabulary)
        params.update(extra or {})  # what a raw Dalston client adds (store_audio=false, retention)
        self.url = f"{base}{PATH}?{urlencode(params)}"
        self.raw: list[dict] = []
        """Every message as the server sent it, in order."""
        self.parsed: list[dict] = []
        self.close_code: int | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None

    async def connect(self) -> dict:
        """Open the session: the parsed session.begin, or :class:`SdkError` for an error."""
        self._ws = await connect(self.url, open_timeout=30, close_timeout=5, max_size=None, ping_interval=None)
        begin = self._take(json.loads(await asyncio.wait_for(self._ws.recv(), 30)))
        if begin["type"] == "error":
            await self._finish_close()
            raise SdkError(begin["code"], begin["message"])
        self._reader = asyncio.create_task(self._read())
        return begin

    def _take(self, data: dict) -> dict:
        self.raw.append(data)
        self.parsed.append(sdk_parse(data))
        return self.parsed[-1]

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                if isinstance(raw, str) and self._take(json.loads(raw))["type"] == "session.end":
                    break
        except ConnectionClosed:
            pass

    async def send_audio(self, pcm: bytes, chunk_bytes: int = 3200) -> None:
        assert self._ws is not None
        for piece in chunks(pcm, chunk_bytes):
            await self._ws.send(piece)

    async def flush(self) -> None:
        assert self._ws is not None
        await self._ws.send(json.dumps({"type": "flush"}))

    async def until(self, predicate, timeout: float = 60.0) -> None:
        """Wait until the messages so far satisfy ``predicate`` (the reader task fills them)."""
        async def wait():
            while not predicate(self.parsed):
                assert self._reader is not None and not self._reader.done(), self.raw
                await asyncio.sleep(0.02)
        await asyncio.wait_for(wait(), timeout)

    async def close(self) -> dict:
        """The SDK's close: ``end``, then every message up to session.end; the parsed session.end."""
        assert self._ws is not None and self._reader is not None
        await self._ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(self._reader, 120)
        await self._finish_close()
        ends = self.of("session.end")
        assert ends, self.raw
        return ends[0]

    async def _finish_close(self) -> None:
        assert self._ws is not None
        await self._ws.close()
        self.close_code = self._ws.close_code

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.parsed if m["type"] == kind]

    def raw_of(self, kind: str) -> list[dict]:
        return [m for m in self.raw if m.get("type") == kind]


def pcm(audio: Audio) -> bytes:
    assert audio.sample_rate == 16000 and audio.channels == 1
    return audio.pcm


def files_of(rec: Path, session_id: str) -> list[str]:
    return sorted(p.name for p in rec.glob(f"*/{session_id}.*"))


def local(uri: str) -> Path:
    return Path(urlsplit(uri).path)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A worker that records (SESSIONS_DIR), registered in Redis, and a router in front of it."""
    tmp = tmp_path_factory.mktemp("dalston")
    redis_server = RedisServer(tmp)
    rec = tmp / "sessions"
    worker = WorkerProcess(tmp, env={"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL_S": "0.5"},
                           max_sessions=3, sessions_dir=rec)
    router = RouterProcess(tmp, redis_server.url)
    try:
        worker.wait_healthy()
        router.wait_healthy()
        yield worker, router, rec
    finally:
        router.stop()
        worker.stop()
        redis_server.stop()
    assert "Traceback" not in worker.log(), worker.log()
    assert "Traceback" not in router.log(), router.log()


async def test_sdk_session_gets_finals_with_words_and_keeps_both_recordings(recording, speech_by_id):
    """The SDK's defaults plus word_timestamps: finals with words[].text, no message it cannot parse
    (a flush gets its final, no flush.done), and both the WAV and the JSON stored."""
    worker, _, rec = recording
    utts = [speech_by_id[i] for i in UTT_IDS]
    client = SdkClient(worker.url, word_timestamps=True)
    begin = await client.connect()
    # The first utterance is flushed before its trailing silence: its final answers the flush.
    await client.send_audio(pcm(concat(silence(0.5), read_wav(utts[0].path))))
    await client.flush()
    await client.until(lambda ms: any(m["type"] == "transcript.final" for m in ms))
    finals_at_flush = len(client.of("transcript.final"))
    rest = concat(silence(1.2), *[part for u in utts[1:] for part in (read_wav(u.path), silence(1.2))])
    await client.send_audio(pcm(rest))
    end = await client.close()

    assert client.close_code == 1000
    assert [m for m in client.parsed if m["type"] == "error"] == [], client.raw  # nothing unknown
    assert all(m["type"] in KNOWN for m in client.raw), [m["type"] for m in client.raw]
    assert begin["session_id"].startswith("sess_")
    native_begin = client.raw[0]
    config = native_begin["config"]
    assert (begin["model"], begin["language"], begin["sample_rate"], begin["encoding"]) == (
        config["model"], config["language"], 16000, "pcm_s16le")
    assert begin["model"] and native_begin["engine"] == "whisper-streaming"  # the native fields stay

    finals = client.of("transcript.final")
    assert finals_at_flush >= 1 and len(finals) >= len(utts), [f["text"] for f in finals]
    hypothesis = " ".join(f["text"] for f in finals)
    reference = " ".join(u.reference for u in utts)
    assert word_errors(reference, hypothesis).wer <= 0.2, hypothesis
    last = 0.0
    for final, raw in zip(finals, client.raw_of("transcript.final"), strict=True):
        assert final["words"], final
        assert [w["text"] for w in final["words"]] == [w["word"] for w in raw["words"]]  # both names
        for word in final["words"]:
            assert word["text"].strip() and last <= word["start"] <= word["end"]
            last = word["start"]

    assert end["session_id"] == begin["session_id"]
    native_end = client.raw_of("session.end")[0]
    assert end["total_audio_seconds"] == native_end["total_duration"] == native_end["total_audio_seconds"]
    assert abs(end["total_audio_seconds"] - (0.5 + utts[0].duration + rest.seconds)) < 0.01
    assert all(w["text"] == w["word"] for s in native_end["segments"] for w in s["words"])
    assert local(native_end["audio_uri"]).is_file() and local(native_end["transcript_uri"]).is_file()
    assert files_of(rec, begin["session_id"]) == [f"{begin['session_id']}.json", f"{begin['session_id']}.wav"]


@pytest.mark.parametrize(("extra", "kept"), [
    ({"store_audio": "false"}, {"json"}),
    ({"store_transcript": "false"}, {"wav"}),
    ({"store_audio": "false", "store_transcript": "false"}, set()),
    ({"retention": "0"}, set()),  # Dalston's gateway parameter: transient, nothing stored
], ids=["no-audio", "no-transcript", "neither", "retention-0"])
async def test_recording_flags_are_honoured(recording, speech_by_id, extra, kept):
    """A part the client does not want stored is never written; session.end names only what was kept."""
    worker, _, rec = recording
    utt = speech_by_id[SHORT_ID]
    client = SdkClient(worker.url, extra=extra)  # explicit values override the SDK's store_*=true
    begin = await client.connect()
    await client.send_audio(pcm(concat(read_wav(utt.path), silence(1.0))))
    await client.close()
    native_end = client.raw_of("session.end")[0]

    assert client.of("transcript.final") and word_errors(utt.reference, native_end["transcript"]).wer <= 0.2
    sid = begin["session_id"]
    assert {name.rsplit(".", 1)[1] for name in files_of(rec, sid)} == kept
    assert ("audio_uri" in native_end) == ("wav" in kept) and ("transcript_uri" in native_end) == ("json" in kept)
    if kept == {"json"}:
        document = json.loads(local(native_end["transcript_uri"]).read_text())
        assert document["session_id"] == sid and document["audio_file"] is None
        assert document["transcript"] == native_end["transcript"]


async def test_routed_session_honours_the_flags_on_the_worker(recording, speech_by_id):
    """Through a router the alias path and its query reach the worker, which records and translates."""
    _, router, rec = recording
    utt = speech_by_id[SHORT_ID]
    deadline = asyncio.get_running_loop().time() + 10
    while not [w for w in router.workers() if w["status"] == "ready"]:
        assert asyncio.get_running_loop().time() < deadline, router.workers()
        await asyncio.sleep(0.1)
    client = SdkClient(router.url, word_timestamps=True, extra={"store_audio": "false"})
    begin = await client.connect()
    await client.send_audio(pcm(concat(read_wav(utt.path), silence(1.0))))
    end = await client.close()

    assert end["session_id"] == begin["session_id"] and begin["model"]
    finals = client.of("transcript.final")
    assert finals and all(f["words"] for f in finals)
    assert files_of(rec, begin["session_id"]) == [f"{begin['session_id']}.json"]


async def test_flags_are_accepted_where_nothing_is_recorded(idle_worker, speech_by_id):
    """A worker without SESSIONS_DIR takes the SDK's store_*=true and stores nothing; its vocabulary
    becomes the native keyterms."""
    utt = speech_by_id[SHORT_ID]
    client = SdkClient(idle_worker.url, word_timestamps=True, vocabulary=["Hale", "Thornton"])
    await client.connect()
    assert client.raw[0]["config"]["keyterms"] == "Hale,Thornton"
    await client.send_audio(pcm(concat(read_wav(utt.path), silence(1.0))))
    await client.close()
    native_end = client.raw_of("session.end")[0]
    assert client.of("transcript.final") and client.of("transcript.final")[0]["words"]
    assert "audio_uri" not in native_end and "transcript_uri" not in native_end


async def test_native_session_still_refuses_store_audio(idle_worker):
    """/session's contract is unchanged: store_audio is an unknown parameter there."""
    async with connect(f"{idle_worker.url}/session?store_audio=true", open_timeout=30) as ws:
        error = json.loads(await asyncio.wait_for(ws.recv(), 30))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 30)
    assert error["type"] == "error" and error["code"] == "invalid_config" and error["recoverable"] is False
    assert error["param"] == "store_audio" and error["message"].startswith("store_audio: unknown parameter")
    assert ws.close_code == 1008


@pytest.mark.parametrize(("extra", "param"), [
    ({"pii_detection": "true"}, "pii_detection"),
    ({"vocabulary": '"Dalston"'}, "vocabulary"),
    ({"store_audio": "maybe"}, "store_audio"),
    ({"model": "faster-whisper-large-v3"}, "model"),
])
async def test_refused_parameters_reach_the_sdk_as_its_error(idle_worker, extra, param):
    """A bad parameter is the SDK's connect error (code, message), then close 1008."""
    client = SdkClient(idle_worker.url, extra=extra)
    with pytest.raises(SdkError) as refused:
        await client.connect()
    assert refused.value.code == "invalid_config" and client.raw[0]["param"] == param
    assert client.close_code == 1008


# --- the dialect alone -------------------------------------------------------------------------


def configure(**params: str) -> tuple[DalstonDialect, dict[str, str]]:
    dialect = DalstonDialect()
    return dialect, dialect.configure(Query(list(params.items())), {})


def test_query_mapping():
    dialect, native = configure(language="en", model="accurate", word_timestamps="true", store_audio="true",
                                store_transcript="false", vocabulary='["a,b", "c"]', pii_entity_types="x",
                                turn_events="true")
    assert native == {"language": "en", "model": "accurate", "word_timestamps": "true", "keyterms": "a b,c",
                      "turn_events": "true"}
    assert dialect.keep == Keep(audio=True, transcript=False)
    assert configure()[0].keep == Keep() and configure(retention="-1")[0].keep == Keep()
    assert configure(retention="0", store_audio="true")[0].keep == Keep(False, False)
    for bad in ({"retention": "4000"}, {"retention": "x"}, {"vocabulary": json.dumps(["x" * 51])},
                {"vocabulary": json.dumps(["t"] * 101)}, {"redact_pii_audio": "true"},
                {"vocabulary": '["a"]', "keyterms": "b"}):
        with pytest.raises(ConfigError):
            configure(**bad)


def test_outgoing_messages():
    dialect = DalstonDialect()
    assert dialect.outgoing({"type": "flush.done"}) == [] and dialect.outgoing({"type": "warning"}) == []
    begin = dialect.outgoing({"type": "session.begin", "session_id": "s", "engine": "e",
                              "config": {"model": "fast", "language": "en", "sample_rate": 8000,
                                         "encoding": "mulaw", "channels": 1}})[0]
    assert (begin["model"], begin["language"], begin["sample_rate"], begin["encoding"]) == ("fast", "en", 8000, "mulaw")
    assert begin["engine"] == "e" and begin["config"]["channels"] == 1
    word = {"word": " Hi", "start": 0.1, "end": 0.3, "confidence": 0.9}
    final = dialect.outgoing({"type": "transcript.final", "text": "Hi", "words": [word]})[0]
    assert final["words"] == [{**word, "text": " Hi"}]
    assert dialect.outgoing({"type": "transcript.final", "text": "Hi"})[0] == {"type": "transcript.final", "text": "Hi"}
    end = dialect.outgoing({"type": "session.end", "session_id": "s", "total_duration": 2.5, "segments": [],
                            "audio_uri": None, "transcript_uri": "file:///x.json"})[0]
    assert end["total_audio_seconds"] == 2.5 and "audio_uri" not in end and end["transcript_uri"] == "file:///x.json"
    assert dialect.incoming(b"\x00\x01") == ([b"\x00\x01"], [])
    assert dialect.incoming('{"type": "flush"}') == (['{"type": "flush"}'], [])
