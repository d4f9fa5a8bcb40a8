"""ElevenLabs realtime speech-to-text compatibility (/v1/speech-to-text/realtime): the real
``elevenlabs`` SDK against a real worker.

Real speech (../shared/speech) is streamed as base64 ``input_audio_chunk`` messages through the
SDK's own connection (``AsyncElevenLabs(base_url=...)``); committed transcripts are scored with
the speech set's WER. Malformed messages are sent raw (the SDK would not send them) and must get
ElevenLabs' ``{"message_type": ..., "error": ...}`` shape. The dialect's segment bookkeeping is
also checked directly, without a worker.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from elevenlabs import AsyncElevenLabs
from elevenlabs.realtime import AudioFormat, CommitStrategy, RealtimeEvents
from elevenlabs.types.session_started_payload_config import SessionStartedPayloadConfig
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import concat, read_wav, silence
from host.compat import Query
from host.compat.elevenlabs import ElevenLabsDialect
from host.wer import WerCounts, word_errors
from tests.support import b64, chunks, mulaw8k, pcm_at, run_compat_snippet

PATH = "/v1/speech-to-text/realtime"
VAD_IDS = ["librivox-sas01-0880", "librivox-sas01-0930", "1688-142285-0004"]
MANUAL_IDS = ["533-1066-0008", "librivox-sas01-0890"]


class Messages:
    """Every message the SDK connection emits, in order (its event callbacks)."""

    def __init__(self, conn):
        self.items: list[dict] = []
        self.closed: dict | None = None
        self._new = asyncio.Event()
        for event in RealtimeEvents:
            if event not in (RealtimeEvents.OPEN, RealtimeEvents.CLOSE, RealtimeEvents.ERROR):
                conn.on(event, self._add)
        conn.on(RealtimeEvents.CLOSE, self._close)

    def _add(self, data):
        self.items.append(data)
        self._new.set()

    def _close(self, info):
        self.closed = info
        self._new.set()

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.items if m["message_type"] == kind]

    async def until(self, predicate, timeout: float = 30.0):
        async def wait():
            while not predicate():
                self._new.clear()
                await self._new.wait()
        await asyncio.wait_for(wait(), timeout)

    async def quiet(self, seconds: float, timeout: float = 30.0):
        """Until nothing new came for ``seconds`` (VAD commits have no end marker)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            count = len(self.items)
            await asyncio.sleep(seconds)
            if len(self.items) == count:
                return
        raise TimeoutError("messages kept coming")


def client_for(worker) -> AsyncElevenLabs:
    return AsyncElevenLabs(api_key="xi-local-test", base_url=worker.http)


async def test_sdk_vad_commits_each_utterance_with_timestamps(idle_worker, speech_by_id):
    """commit_strategy=vad: partials, then one committed transcript (+ words) per utterance; WER."""
    utts = [speech_by_id[i] for i in VAD_IDS]
    audio = concat(silence(0.5), *[part for u in utts for part in (read_wav(u.path), silence(1.2))])
    conn = await client_for(idle_worker).speech_to_text.realtime.connect({
        "model_id": "scribe_v2_realtime", "audio_format": AudioFormat.PCM_16000, "sample_rate": 16000,
        "commit_strategy": CommitStrategy.VAD, "include_timestamps": True, "language_code": "eng"})
    messages = Messages(conn)
    try:
        for piece in chunks(pcm_at(audio, 16000), 3200):  # 100 ms chunks at ~3x real time
            await conn.send({"audio_base_64": b64(piece)})
            await asyncio.sleep(0.033)
        await messages.until(lambda: len(messages.of("committed_transcript")) >= len(utts))
        await messages.quiet(2.0)
    finally:
        await conn.close()

    started = messages.items[0]
    assert started["message_type"] == "session_started" and started["session_id"].startswith("sess_")
    assert started["config"]["commit_strategy"] == "vad" and started["config"]["audio_format"] == "pcm_16000"
    assert started["config"]["language_code"] == "eng" and started["config"]["include_timestamps"] is True
    kinds = [m["message_type"] for m in messages.items]
    assert not [k for k in kinds if k not in ("session_started", "partial_transcript", "committed_transcript",
                                              "committed_transcript_with_timestamps")], kinds
    assert messages.of("partial_transcript"), "no partial transcripts"
    committed = messages.of("committed_transcript")
    stamped = messages.of("committed_transcript_with_timestamps")
    # Each committed transcript is followed at once by its timestamped twin.
    for i, kind in enumerate(kinds):
        if kind == "committed_transcript":
            assert kinds[i + 1] == "committed_transcript_with_timestamps"
            assert messages.items[i + 1]["text"] == messages.items[i]["text"]
    last = 0.0
    for message in stamped:
        assert message["language_code"] == "en"
        words = message["words"]
        types = [w["type"] for w in words]
        assert types[0] == types[-1] == "word" and "spacing spacing" not in " ".join(types), types
        assert "".join(w["text"] for w in words) == message["text"]
        for w in words:
            assert last <= w["start"] <= w["end"] <= audio.seconds + 0.01, words
            last = w["end"]
            if w["type"] == "word":
                assert w["logprob"] <= 0
    transcript = " ".join(m["text"] for m in committed)
    counts = word_errors(" ".join(u.reference for u in utts), transcript)
    print(f"ElevenLabs SDK, vad: WER {counts.wer:.3f} over {counts.words} words: {transcript!r}")
    assert counts.wer <= 0.25, transcript


async def test_sdk_manual_commit_one_transcript_per_commit(idle_worker, speech_by_id):
    """commit_strategy=manual at 24 kHz: each commit's transcript holds exactly its own audio's text."""
    utts = [speech_by_id[i] for i in MANUAL_IDS]
    conn = await client_for(idle_worker).speech_to_text.realtime.connect({
        "model_id": "scribe_v2_realtime", "audio_format": AudioFormat.PCM_24000, "sample_rate": 24000,
        "commit_strategy": CommitStrategy.MANUAL})
    messages = Messages(conn)
    try:
        for n, utt in enumerate(utts, 1):
            for i, piece in enumerate(chunks(pcm_at(concat(read_wav(utt.path), silence(0.4)), 24000), 4800)):
                await conn.send({"audio_base_64": b64(piece), **({"previous_text": "Context."} if n == 1 and not i else {})})
                await asyncio.sleep(0.02)
            await conn.commit()
            await messages.until(lambda n=n: len(messages.of("committed_transcript")) == n)
        await conn.commit()  # nothing since the last commit: an empty transcript
        await messages.until(lambda: len(messages.of("committed_transcript")) == len(utts) + 1)
    finally:
        await conn.close()

    assert not [m for m in messages.items if "error" in m], messages.items
    committed = messages.of("committed_transcript")
    assert committed[-1]["text"] == ""
    assert not messages.of("committed_transcript_with_timestamps")
    partials = messages.of("partial_transcript")
    assert partials, "no partial transcripts"
    total = WerCounts(0, 0)
    for utt, done in zip(utts, committed):
        counts = word_errors(utt.reference, done["text"])
        print(f"ElevenLabs SDK, manual 24 kHz: {utt.id} WER {counts.wer:.3f}: {done['text']!r}")
        assert counts.wer <= 0.3, (utt.reference, done["text"])
        total += counts
    assert total.wer <= 0.25
    # The second segment's partials never repeat the first commit's text.
    first_words = set(committed[0]["text"].lower().split()) - set(committed[1]["text"].lower().split())
    after = partials[[m["message_type"] for m in messages.items].index("committed_transcript"):]
    assert not any(p["text"].lower().startswith(committed[0]["text"].lower()[:20]) for p in after), first_words


async def test_doc_snippet_runs_against_the_server(idle_worker, speech_by_id):
    """The snippet in docs/compat-elevenlabs.md, executed as written."""
    utt = speech_by_id["librivox-sas01-0880"]
    text = await run_compat_snippet("elevenlabs", utt, idle_worker)
    assert word_errors(utt.reference, text).wer <= 0.25, text


async def test_ulaw_8000_on_the_wire(idle_worker, speech_by_id):
    """audio_format=ulaw_8000 with a raw client following the documented wire format."""
    utt = speech_by_id["1688-142285-0003"]
    url = f"{idle_worker.url}{PATH}?model_id=scribe_v2_realtime&audio_format=ulaw_8000&include_timestamps=true"
    async with connect(url, additional_headers={"xi-api-key": "anything"}) as ws:
        started = json.loads(await ws.recv())
        assert started["message_type"] == "session_started"
        assert started["config"]["sample_rate"] == 8000 and started["config"]["commit_strategy"] == "manual"
        pieces = list(chunks(mulaw8k(concat(read_wav(utt.path), silence(0.3))), 1600))
        for i, piece in enumerate(pieces):
            await ws.send(json.dumps({"message_type": "input_audio_chunk", "audio_base_64": b64(piece),
                                      "commit": i == len(pieces) - 1, "sample_rate": 8000}))
        seen = []
        while not seen or seen[-1]["message_type"] != "committed_transcript_with_timestamps":
            seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    committed = seen[-2]
    assert committed["message_type"] == "committed_transcript" and committed["text"] == seen[-1]["text"]
    counts = word_errors(utt.reference, committed["text"])
    print(f"ElevenLabs ulaw_8000: WER {counts.wer:.3f}: {committed['text']!r}")
    assert counts.wer <= 0.3


BAD_MESSAGES = [
    "{not json",
    "[1, 2]",
    '{"audio_base_64": ""}',
    '{"message_type": "input_audio_chunk", "audio_base_64": "%%not base64%%"}',
    '{"message_type": "input_audio_chunk", "audio_base_64": 5}',
    '{"message_type": "input_audio_chunk", "audio_base_64": "", "commit": "yes"}',
    '{"message_type": "input_audio_chunk", "audio_base_64": "AAAA", "sample_rate": 44100}',
    '{"message_type": "transcribe", "audio_base_64": ""}',
    '{"message_type": "x\\ud800"}',
    "[" * 100 + "]" * 100,
]


async def test_malformed_messages_get_elevenlabs_errors(idle_worker):
    async with connect(f"{idle_worker.url}{PATH}?model_id=scribe_v2_realtime") as ws:
        assert json.loads(await ws.recv())["message_type"] == "session_started"
        # previous_text is allowed with the first audio chunk only.
        await ws.send(json.dumps({"message_type": "input_audio_chunk", "audio_base_64": b64(b"\0\0" * 1600),
                                  "previous_text": "Earlier words."}))
        for raw in [*BAD_MESSAGES, '{"message_type": "input_audio_chunk", "audio_base_64": "AAAA", '
                    '"previous_text": "too late"}']:
            await ws.send(raw)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["message_type"] == "input_error", (raw, reply)
            assert isinstance(reply["error"], str) and reply["error"], (raw, reply)
        await ws.send(b"\xff\xfe binary")
        assert json.loads(await ws.recv())["message_type"] == "input_error"
        # The session is still usable: a commit of the (silent) audio gives an empty transcript.
        await ws.send(json.dumps({"message_type": "input_audio_chunk", "audio_base_64": "", "commit": True}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply == {"message_type": "committed_transcript", "text": ""}


@pytest.mark.parametrize("query, param", [("audio_format=mp3_44100", "audio_format"),
                                          ("commit_strategy=auto", "commit_strategy"),
                                          ("vad_threshold=2", "vad_threshold"),
                                          ("include_timestamps=maybe", "include_timestamps"),
                                          ("language_code=zz", "language"),
                                          ("model_id=fast&language_code=deu", "language")])
async def test_bad_connect_parameters_are_refused(idle_worker, query, param):
    async with connect(f"{idle_worker.url}{PATH}?model_id=scribe_v2_realtime&{query}") as ws:
        reply = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert reply["message_type"] == "invalid_request" and reply["error"].startswith(param + ":"), reply
    assert ws.close_code == 1008


# --- the dialect alone ---------------------------------------------------------------------


def started(**query) -> ElevenLabsDialect:
    d = ElevenLabsDialect()
    d.configure(query, {})
    d.outgoing({"type": "session.begin", "session_id": "sess_x"})
    return d


def test_configure_maps_formats_models_and_languages():
    d = ElevenLabsDialect()
    assert d.configure({"model_id": "scribe_v1", "audio_format": "ulaw_8000", "language_code": "ENG"}, {}) == {
        "encoding": "mulaw", "sample_rate": "8000", "channels": "1", "enable_vad": "true",
        "word_timestamps": "false", "language": "en"}
    native = ElevenLabsDialect().configure({"model_id": "accurate", "audio_format": "pcm_44100",
                                            "include_timestamps": "true", "engine": "whisper-streaming"}, {})
    assert native == {"encoding": "pcm_s16le", "sample_rate": "44100", "channels": "1", "enable_vad": "true",
                      "word_timestamps": "true", "model": "accurate", "engine": "whisper-streaming"}
    d = ElevenLabsDialect()
    native = d.configure(Query([("keyterms", "Kowloon"), ("keyterms", "Carpanedo")]), {})
    assert native["keyterms"] == "Kowloon,Carpanedo" and d.config["keyterms"] == ["Kowloon", "Carpanedo"]
    assert SessionStartedPayloadConfig.model_validate(d.config).keyterms == ["Kowloon", "Carpanedo"]


def test_manual_finals_before_flush_done_belong_to_the_commit():
    d = started()
    d.outgoing({"type": "vad.speech_start", "timestamp": 0.1})
    assert d.outgoing({"type": "transcript.partial", "utterance_id": 0, "text": "One"}) == [
        {"message_type": "partial_transcript", "text": "One"}]
    d.outgoing({"type": "vad.speech_end", "timestamp": 1.0})
    d.outgoing({"type": "transcript.final", "utterance_id": 0, "text": "One.", "words": []})
    d.outgoing({"type": "vad.speech_start", "timestamp": 1.5})
    assert d.outgoing({"type": "transcript.partial", "utterance_id": 1, "text": "Two"}) == [
        {"message_type": "partial_transcript", "text": "One. Two"}]
    natives, replies = d.incoming(json.dumps({"message_type": "input_audio_chunk", "audio_base_64": b64(b"\0" * 8),
                                              "commit": True}))
    assert natives == [b"\0" * 8, {"type": "flush"}] and replies == []
    # A partial of the flushed utterance racing the flush is not shown as the next segment's.
    assert d.outgoing({"type": "transcript.partial", "utterance_id": 1, "text": "Two th"}) == []
    assert d.outgoing({"type": "transcript.final", "utterance_id": 1, "text": "Two."}) == []
    d.outgoing({"type": "vad.speech_start", "timestamp": 2.5})
    assert d.outgoing({"type": "transcript.partial", "utterance_id": 2, "text": "Three"}) == [
        {"message_type": "partial_transcript", "text": "Three"}]
    assert d.outgoing({"type": "flush.done"}) == [{"message_type": "committed_transcript", "text": "One. Two."}]
    assert d.outgoing({"type": "flush.done"}) == []  # a flush of its own (vad-mode commits) commits nothing


def test_native_errors_map_to_elevenlabs_types():
    d = started(commit_strategy="vad")
    for code, kind in [("invalid_config", "invalid_request"), ("idle_timeout", "insufficient_audio_activity"),
                       ("internal_error", "transcriber_error"), ("worker_lost", "error"),
                       ("max_duration", "session_time_limit_exceeded")]:
        assert d.outgoing({"type": "error", "code": code, "message": "m", "recoverable": False}) == [
            {"message_type": kind, "error": "m"}]
    assert d.outgoing({"type": "vad.speech_end", "timestamp": 1.0}) == []
    assert d.outgoing({"type": "session.end"}) == []
