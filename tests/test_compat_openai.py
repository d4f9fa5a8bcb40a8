"""OpenAI Realtime transcription compatibility (/v1/realtime): the real ``openai`` SDK against a real worker.

Real speech (../shared/speech) is resampled to 24 kHz pcm16 and streamed as base64
``input_audio_buffer.append`` events; the completed transcripts are scored with the speech
set's WER. Malformed events are sent raw (the SDK would not send them) and must get OpenAI's
``error`` shape. The dialect's bookkeeping (deltas, empty turns, failures) is also checked
directly, without a worker.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import concat, read_wav, silence
from host.compat.openai_realtime import OpenAIRealtimeDialect, keep_sent
from host.protocol import ConfigError
from host.wer import WerCounts, field_errors, word_errors
from tests.support import b64, chunks, mulaw8k, pcm24, run_compat_snippet

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"
VAD_IDS = ["librivox-sas01-0880", "librivox-sas01-0930", "1688-142285-0004"]
MANUAL_IDS = ["533-1066-0008", "librivox-sas01-0890"]


class Events:
    """Every event the SDK connection receives, in order, collected by a background task."""

    def __init__(self, conn):
        self.conn, self.items, self._new = conn, [], asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self):
        try:
            while True:
                self.items.append(await self.conn.recv())
                self._new.set()
        except (ConnectionClosed, asyncio.CancelledError):
            pass

    def of(self, kind: str) -> list:
        return [e for e in self.items if e.type == kind]

    async def until(self, predicate, timeout: float = 30.0):
        async def wait():
            while not predicate():
                self._new.clear()
                await self._new.wait()
        await asyncio.wait_for(wait(), timeout)

    async def next(self, kind: str, after: int, timeout: float = 15.0):
        await self.until(lambda: any(e.type == kind for e in self.items[after:]), timeout)
        return next(e for e in self.items[after:] if e.type == kind)


def client_for(worker) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-local-test", websocket_base_url=f"{worker.url}/v1")


async def test_sdk_server_vad_stream_wer_and_event_order(idle_worker, speech_by_id):
    """GA client, server VAD: per turn speech_started < speech_stopped < committed < deltas < completed."""
    utts = [speech_by_id[i] for i in VAD_IDS]
    audio = concat(silence(0.5), *[part for u in utts for part in (read_wav(u.path), silence(1.2))])
    async with client_for(idle_worker).realtime.connect(
            model="gpt-4o-transcribe", extra_query={"intent": "transcription"}) as conn:
        events = Events(conn)
        created = await events.next("session.created", 0)
        assert created.session.type == "transcription"
        assert created.session.audio.input.format.type == "audio/pcm"
        await conn.session.update(session={
            "type": "transcription",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
        updated = await events.next("session.updated", 0)
        assert updated.session.audio.input.transcription.language == "en"
        assert updated.session.audio.input.turn_detection.type == "server_vad"
        for piece in chunks(pcm24(audio)):  # 100 ms appends at ~3x real time, so partials come back
            await conn.input_audio_buffer.append(audio=b64(piece))
            await asyncio.sleep(0.033)
        # The server answers in order: once this update is answered, every turn of the audio has ended.
        mark = len(events.items)
        await conn.session.update(session={"type": "transcription"})
        await events.next("session.updated", mark)
        await events.until(lambda: len(events.of(COMPLETED)) >= len(events.of("input_audio_buffer.committed")))
        events.task.cancel()

    items = [e.item_id for e in events.of("input_audio_buffer.committed")]
    assert len(items) >= len(utts), [e.type for e in events.items]
    assert len(set(e.event_id for e in events.items)) == len(events.items)
    assert all(e.event_id.startswith("event_") for e in events.items)
    previous = None
    for committed in events.of("input_audio_buffer.committed"):
        assert committed.previous_item_id == previous
        previous = committed.item_id
    last_end = 0
    for item in items:
        seq = [e for e in events.items if getattr(e, "item_id", None) == item]
        kinds = [e.type for e in seq]
        # Deltas (from partials) may come while the turn is still open, before it is committed.
        turn = [k for k in kinds if k != DELTA]
        assert turn == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                        "input_audio_buffer.committed", COMPLETED], kinds
        assert kinds[0] == turn[0] and kinds[-1] == COMPLETED, kinds
        start, stop = seq[0], next(e for e in seq if e.type == "input_audio_buffer.speech_stopped")
        assert last_end <= start.audio_start_ms < stop.audio_end_ms <= audio.seconds * 1000 + 1
        last_end = stop.audio_end_ms
        assert seq[-1].usage.type == "duration" and seq[-1].usage.seconds > 0
    deltas = events.of(DELTA)
    assert deltas and all(d.delta for d in deltas), "no transcript deltas from the partials"
    live = 0  # items with deltas before their commit: captions that grew while the speaker talked
    for done in events.of(COMPLETED):
        seq = [e for e in events.items if getattr(e, "item_id", None) == done.item_id]
        sent = "".join(e.delta for e in seq if e.type == DELTA)
        assert done.transcript.startswith(sent), (sent, done.transcript)  # deltas cannot be taken back
        live += any(e.type == DELTA for e in seq[:[e.type for e in seq].index("input_audio_buffer.committed")])
    assert live, "no item's deltas came while its turn was open"
    transcript = " ".join(e.transcript for e in events.of(COMPLETED))
    counts = word_errors(" ".join(u.reference for u in utts), transcript)
    print(f"OpenAI SDK, server VAD: WER {counts.wer:.3f} over {counts.words} words: {transcript!r}")
    assert counts.wer <= 0.25, transcript


async def test_sdk_german_by_session_update(idle_worker):
    """An OpenAI app sets the language with session.update after connecting: the default (English)
    session moves to a variant that serves German, and the German clip comes back in German."""
    from tests.test_languages import multi_manifest

    clip = multi_manifest()["de-fleurs-004"]
    audio = concat(silence(0.5), read_wav(clip.path), silence(1.5))
    async with client_for(idle_worker).realtime.connect(
            model="gpt-4o-transcribe", extra_query={"intent": "transcription"}) as conn:
        events = Events(conn)
        await events.next("session.created", 0)
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"model": "gpt-4o-transcribe", "language": "de", "prompt": "Mekka"}}}})
        updated = await events.next("session.updated", 0)
        assert updated.session.audio.input.transcription.language == "de"
        for piece in chunks(pcm24(audio)):
            await conn.input_audio_buffer.append(audio=b64(piece))
        mark = len(events.items)
        await conn.session.update(session={"type": "transcription"})
        await events.next("session.updated", mark)
        await events.until(lambda: len(events.of(COMPLETED)) >= max(1, len(events.of("input_audio_buffer.committed"))))
        events.task.cancel()
    assert not events.of("error"), events.of("error")
    transcript = " ".join(e.transcript for e in events.of(COMPLETED))
    counts = field_errors(clip.reference, transcript, "de")
    assert counts.wer <= 0.2, transcript


async def test_sdk_beta_manual_commit_one_item_per_commit(idle_worker, speech_by_id):
    """Beta client, turn_detection null: each commit is one item holding exactly its own audio's text."""
    utts = [speech_by_id[i] for i in MANUAL_IDS]
    async with client_for(idle_worker).beta.realtime.connect(
            model="gpt-4o-transcribe", extra_query={"intent": "transcription"}) as conn:
        events = Events(conn)
        await events.next("transcription_session.created", 0)
        assert events.items[0].type == "transcription_session.created"
        await conn.transcription_session.update(session={
            "input_audio_format": "pcm16", "turn_detection": None,
            "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en", "prompt": "x"}})
        updated = await events.next("transcription_session.updated", 0)
        assert updated.session.turn_detection is None
        assert updated.session.input_audio_transcription.language == "en"
        committed = []
        for utt in utts:
            for piece in chunks(pcm24(concat(read_wav(utt.path), silence(0.4)))):
                await conn.input_audio_buffer.append(audio=b64(piece))
            mark = len(events.items)
            await conn.input_audio_buffer.commit()
            committed.append(await events.next("input_audio_buffer.committed", mark))
        await events.until(lambda: len(events.of(COMPLETED)) == len(utts))
        events.task.cancel()

    assert not events.of("input_audio_buffer.speech_started"), "no VAD events without turn detection"
    assert [c.item_id for c in committed] == [e.item_id for e in events.of(COMPLETED)]
    assert committed[0].previous_item_id is None and committed[1].previous_item_id == committed[0].item_id
    total = WerCounts(0, 0)
    for utt, done in zip(utts, events.of(COMPLETED)):
        counts = word_errors(utt.reference, done.transcript)
        print(f"OpenAI beta SDK, manual commit: {utt.id} WER {counts.wer:.3f}: {done.transcript!r}")
        assert counts.wer <= 0.3, (utt.reference, done.transcript)
        total += counts
    assert total.wer <= 0.25


async def beta_events(conn, until: str) -> list[dict]:
    """Raw events (JSON) of an SDK connection up to the first of type ``until``."""
    seen: list[dict] = []
    while not seen or seen[-1]["type"] != until:
        seen.append(json.loads(await asyncio.wait_for(conn.recv_bytes(), 30)))
    return seen


async def test_beta_events_pass_the_sdk_models_strictly(idle_worker, speech_by_id):
    """openai-python's beta models, validated strictly: transcription_session.* carry the required
    client_secret; a conversation-style beta client (no intent) gets session.created and its transcript."""
    from openai.types.beta.realtime.conversation_item_input_audio_transcription_completed_event import (
        ConversationItemInputAudioTranscriptionCompletedEvent,
    )
    from openai.types.beta.realtime.conversation_item_input_audio_transcription_delta_event import (
        ConversationItemInputAudioTranscriptionDeltaEvent,
    )
    from openai.types.beta.realtime.input_audio_buffer_committed_event import InputAudioBufferCommittedEvent
    from openai.types.beta.realtime.session_created_event import SessionCreatedEvent
    from openai.types.beta.realtime.session_updated_event import SessionUpdatedEvent
    from openai.types.beta.realtime.transcription_session import TranscriptionSession
    from openai.types.beta.realtime.transcription_session_updated_event import TranscriptionSessionUpdatedEvent

    utt = speech_by_id["1688-142285-0003"]
    async with client_for(idle_worker).beta.realtime.connect(
            model="gpt-4o-transcribe", extra_query={"intent": "transcription"}) as conn:
        created = (await beta_events(conn, "transcription_session.created"))[0]
        TranscriptionSession.model_validate(created["session"], strict=True)
        await conn.transcription_session.update(session={"input_audio_transcription": {"model": "whisper-1"}})
        updated = (await beta_events(conn, "transcription_session.updated"))[-1]
        TranscriptionSessionUpdatedEvent.model_validate(updated, strict=True)

    async with client_for(idle_worker).beta.realtime.connect(model="gpt-4o-realtime-preview") as conn:
        first = (await beta_events(conn, "session.created"))
        assert len(first) == 1, "session.created is the first event"
        SessionCreatedEvent.model_validate(first[0], strict=True)
        await conn.session.update(session={"input_audio_transcription": {"model": "whisper-1", "language": "en"},
                                           "turn_detection": None})
        SessionUpdatedEvent.model_validate((await beta_events(conn, "session.updated"))[-1], strict=True)
        for piece in chunks(pcm24(concat(read_wav(utt.path), silence(0.3)))):
            await conn.input_audio_buffer.append(audio=b64(piece))
        await conn.input_audio_buffer.commit()
        turn = await beta_events(conn, COMPLETED)
    models = {"input_audio_buffer.committed": InputAudioBufferCommittedEvent,
              DELTA: ConversationItemInputAudioTranscriptionDeltaEvent,
              COMPLETED: ConversationItemInputAudioTranscriptionCompletedEvent}
    for event in turn:
        models[event["type"]].model_validate(event, strict=True)
    assert turn[0]["type"] == "input_audio_buffer.committed", [e["type"] for e in turn]
    assert word_errors(utt.reference, turn[-1]["transcript"]).wer <= 0.3, turn[-1]["transcript"]


async def test_manual_clear_drops_the_uncommitted_audio(idle_worker, speech_by_id):
    """clear before commit: the next committed item has the later speech only."""
    dropped, kept = speech_by_id["1998-15444-0007"], speech_by_id["533-1066-0009"]
    async with client_for(idle_worker).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        events = Events(conn)
        await events.next("session.created", 0)
        await conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        await events.next("session.updated", 0)
        for piece in chunks(pcm24(concat(read_wav(dropped.path), silence(0.8)))):  # ends as a VAD utterance
            await conn.input_audio_buffer.append(audio=b64(piece))
        await conn.input_audio_buffer.clear()
        await events.next("input_audio_buffer.cleared", 0)
        for piece in chunks(pcm24(concat(read_wav(kept.path), silence(0.3)))):
            await conn.input_audio_buffer.append(audio=b64(piece))
        await conn.input_audio_buffer.commit()
        done = await events.next(COMPLETED, 0, timeout=30)
        await asyncio.sleep(0.3)
        events.task.cancel()
    assert len(events.of(COMPLETED)) == 1
    assert word_errors(kept.reference, done.transcript).wer <= 0.3, done.transcript
    assert "emetic" not in done.transcript.lower()


async def test_doc_snippet_runs_against_the_server(idle_worker, speech_by_id):
    """The README snippet in docs/compat-openai.md, executed as written."""
    utt = speech_by_id["librivox-sas01-0880"]
    text = await run_compat_snippet("openai", utt, idle_worker)
    assert word_errors(utt.reference, text).wer <= 0.25, text


async def test_g711_ulaw_chosen_at_connect(idle_worker, speech_by_id):
    """?input_audio_format=g711_ulaw (8 kHz μ-law), beta header: the raw wire format, one commit."""
    utt = speech_by_id["1688-142285-0003"]
    url = f"{idle_worker.url}/v1/realtime?intent=transcription&model=whisper-1&input_audio_format=g711_ulaw"
    async with connect(url, additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        created = json.loads(await ws.recv())
        assert created["type"] == "transcription_session.created"
        assert created["session"]["input_audio_format"] == "g711_ulaw"
        assert created["session"]["input_audio_transcription"]["model"] == "whisper-1"
        await ws.send(json.dumps({"type": "transcription_session.update", "session": {
            "input_audio_format": "g711_ulaw", "turn_detection": None}}))
        assert json.loads(await ws.recv())["type"] == "transcription_session.updated"
        for piece in chunks(mulaw8k(concat(read_wav(utt.path), silence(0.3))), 1600):
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(piece)}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "evt_c"}))
        seen = []
        while not seen or seen[-1]["type"] != COMPLETED:
            seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    # Manual mode: the commit names the item, so it comes before the item's deltas (the server has
    # been decoding the audio while it was appended; what it had is sent right after the commit).
    turn = [m for m in seen if m["type"] != DELTA]
    assert [m["type"] for m in turn] == ["input_audio_buffer.committed", COMPLETED]
    assert seen[0]["type"] == "input_audio_buffer.committed"
    assert seen[-1]["transcript"].startswith("".join(m["delta"] for m in seen if m["type"] == DELTA))
    assert {m["item_id"] for m in seen} == {turn[0]["item_id"]}
    assert abs(seen[-1]["usage"]["seconds"] - (utt.duration + 0.3)) < 0.05
    counts = word_errors(utt.reference, seen[-1]["transcript"])
    print(f"g711_ulaw 8 kHz: WER {counts.wer:.3f}: {seen[-1]['transcript']!r}")
    assert counts.wer <= 0.3


BAD_EVENTS = [
    ("{not json", "invalid_json", None, None),
    ("[1, 2]", "invalid_type", None, None),
    ('{"event_id": "evt_1"}', "missing_required_parameter", "type", "evt_1"),
    ('{"type": "bogus.event", "event_id": "evt_2"}', "invalid_value", "type", "evt_2"),
    ('{"type": "response.create", "event_id": "evt_3"}', "invalid_value", "type", "evt_3"),
    ('{"type": "input_audio_buffer.append", "audio": "%%not base64%%", "event_id": "evt_4"}',
     "invalid_value", "audio", "evt_4"),
    ('{"type": "input_audio_buffer.append", "audio": 5, "event_id": "evt_5"}', "invalid_type", "audio", "evt_5"),
    ('{"type": "input_audio_buffer.append", "event_id": "evt_6"}', "missing_required_parameter", "audio", "evt_6"),
    ('{"type": "session.update", "event_id": "evt_7", "session": {"type": "transcription", '
     '"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}',
     "unsupported_format_change", "session.audio.input.format", "evt_7"),
    ('{"type": "transcription_session.update", "event_id": "evt_8", "session": {"input_audio_format": "flac"}}',
     "invalid_value", "session.input_audio_format", "evt_8"),
    ('{"type": "session.update", "event_id": "evt_9", "session": {"turn_detection": {"type": "push_to_talk"}}}',
     "invalid_value", "session.turn_detection.type", "evt_9"),
    ('{"type": "session.update", "event_id": "evt_10", "session": {"type": "realtime"}}',
     "invalid_value", "session.type", "evt_10"),
    ('{"type": "session.update", "event_id": "evt_11", "session": "x"}', "invalid_type", "session", "evt_11"),
    ('{"type": "input_audio_buffer.commit", "event_id": "evt_12"}', "input_audio_buffer_commit_empty", None, "evt_12"),
    ('{"type": {"a": 1}, "event_id": "evt_13"}', "invalid_type", "type", "evt_13"),
    ('{"type": "x\\ud800", "event_id": "evt_14"}', "invalid_value", "type", "evt_14"),  # lone surrogate echoed
    ('{"type": "session.update", "event_id": "evt_15", "session": {"input_audio_transcription": '
     '{"model": "\\udc00", "language": 7}}}', "invalid_value", "session.input_audio_transcription.language", "evt_15"),
    ("[" * 100 + "]" * 100, "invalid_json", None, None),
]


async def test_malformed_events_get_openai_errors(idle_worker):
    async with connect(f"{idle_worker.url}/v1/realtime?intent=transcription") as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        for raw, code, param, event_id in BAD_EVENTS:
            await ws.send(raw)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["type"] == "error" and reply["event_id"].startswith("event_"), (raw, reply)
            assert reply["error"]["type"] == "invalid_request_error", (raw, reply)
            assert (reply["error"]["code"], reply["error"]["param"], reply["error"]["event_id"]) == \
                   (code, param, event_id), (raw, reply)
            assert reply["error"]["message"]
        await ws.send(b"\xff\xfe binary")
        assert json.loads(await ws.recv())["error"]["code"] == "invalid_json"
        # A language no variant serves: applied as native config, refused by the session.
        await ws.send(json.dumps({"type": "session.update", "event_id": "evt_lang", "session": {
            "type": "transcription", "audio": {"input": {"transcription": {"language": "zz"}}}}}))
        assert json.loads(await ws.recv())["type"] == "session.updated"
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "error" and reply["error"]["code"] == "invalid_config", reply
        assert reply["error"]["param"] == "session.audio.input.transcription.language"
        assert reply["error"]["event_id"] == "evt_lang"
        # The session is still usable.
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\0\0" * 2400)}))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert json.loads(await ws.recv())["type"] == "input_audio_buffer.cleared"


@pytest.mark.parametrize("query, param", [("intent=conversation", "intent"),
                                          ("intent=transcription&input_audio_format=opus", "input_audio_format")])
async def test_bad_connect_parameters_are_refused(idle_worker, query, param):
    async with connect(f"{idle_worker.url}/v1/realtime?{query}") as ws:
        reply = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert reply["type"] == "error" and reply["error"]["code"] == "invalid_config"
    assert reply["error"]["param"] == param
    assert ws.close_code == 1008


# --- the dialect alone ---------------------------------------------------------------------


def started(d: OpenAIRealtimeDialect, query=None, headers=None) -> OpenAIRealtimeDialect:
    d.configure(query or {"intent": "transcription"}, headers or {})
    d.outgoing({"type": "session.begin", "session_id": "sess_x"})
    return d


def test_configure_maps_formats_models_and_language():
    d = OpenAIRealtimeDialect()
    # OpenAI's default turn detection is server_vad with 500 ms of silence: the native silence timer.
    silence = {"endpointing": "silence", "silence_ms": "500"}
    assert d.configure({"intent": "transcription", "model": "gpt-4o-mini-transcribe"}, {}) == {
        "encoding": "pcm_s16le", "sample_rate": "24000", "channels": "1", "enable_vad": "true", **silence}
    assert d.transcription["model"] == "gpt-4o-mini-transcribe"
    native = OpenAIRealtimeDialect().configure({"model": "accurate", "input_audio_format": "audio/pcma",
                                                "language": "en", "api_key": "k"}, {})
    assert native == {"encoding": "alaw", "sample_rate": "8000", "channels": "1", "enable_vad": "true",
                      "model": "accurate", "language": "en", "api_key": "k", **silence}


def test_deltas_extend_sent_text_and_skip_revisions():
    d = started(OpenAIRealtimeDialect())
    out = d.outgoing({"type": "vad.speech_start", "timestamp": 1.25})
    item = out[0]["item_id"]
    assert out[0]["audio_start_ms"] == 1250

    def delta(text, stable):
        message = {"type": "transcript.partial", "utterance_id": 0, "text": text, "stable": stable}
        return [e["delta"] for e in d.outgoing(message)]

    assert delta("Ask", "") == []  # nothing stable yet: the tail may still change
    assert delta("Ask not what", "Ask") == ["Ask"]
    assert delta("Ask not what your", "Ask not what") == [" not what"]
    assert delta("Ask not what you", "Ask not") == []  # never shorter: a stable prefix only grows
    assert delta("Ask not what your country", "Ask not what your") == [" your"]
    out = d.outgoing({"type": "vad.speech_end", "timestamp": 3.5})
    assert [e["type"] for e in out] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    out = d.outgoing({"type": "transcript.final", "utterance_id": 0, "text": "Ask not what your country"})
    assert [(e["type"], e.get("delta")) for e in out] == [(DELTA, " country"), (COMPLETED, None)]
    assert out[-1]["transcript"] == "Ask not what your country" and out[-1]["item_id"] == item
    assert out[-1]["usage"] == {"type": "duration", "seconds": 2.25}


def test_a_revised_final_keeps_the_sent_deltas():
    """A final that revises words already sent as deltas: the transcript keeps them and goes on with
    the final's words after them; with ?deltas=final nothing is sent early and the final is exact."""
    assert keep_sent("", "Mr. Hale, you") == "Mr. Hale, you"
    assert keep_sent("I don't think Mr. Hell, you", "I don't think Mr. Hale, you have done right.") == \
        "I don't think Mr. Hell, you have done right."
    assert keep_sent("At the", "Epimorphine is not allied.") == "At the not allied."
    assert keep_sent("He said so", "He said.") == "He said so"
    for deltas, expected in (("live", "I don't think Mr. Hell, you have done right."),
                             ("final", "I don't think Mr. Hale, you have done right.")):
        d = OpenAIRealtimeDialect()
        d.configure({"deltas": deltas}, {})
        d.outgoing({"type": "session.begin", "session_id": "sess_x"})
        d.outgoing({"type": "vad.speech_start", "timestamp": 0.0})
        early = d.outgoing({"type": "transcript.partial", "utterance_id": 0, "text": "I don't think Mr. Hell, you",
                            "stable": "I don't think Mr. Hell,"})
        assert [e.get("delta") for e in early] == (["I don't think Mr. Hell,"] if deltas == "live" else [])
        d.outgoing({"type": "vad.speech_end", "timestamp": 2.0})
        out = d.outgoing({"type": "transcript.final", "utterance_id": 0, "text": "I don't think Mr. Hale, you have done right."})
        sent = "".join(e.get("delta", "") for e in [*early, *out] if e["type"] == DELTA)
        assert out[-1]["transcript"] == expected and sent == expected
    with pytest.raises(ConfigError):
        OpenAIRealtimeDialect().configure({"deltas": "sometimes"}, {})


def test_empty_and_failed_turns_are_completed():
    d = started(OpenAIRealtimeDialect())
    ids = []
    for uid in range(3):
        ids.append(d.outgoing({"type": "vad.speech_start", "timestamp": uid})[0]["item_id"])
        d.outgoing({"type": "vad.speech_end", "timestamp": uid + 0.5})
    # Utterance 0 was empty (no final); utterance 1 failed; utterance 2 has a final.
    out = d.outgoing({"type": "error", "code": "internal_error", "recoverable": True, "utterance_id": 1,
                      "message": "transcription of utterance 1 failed: RuntimeError"})
    assert [(e["type"], e["item_id"]) for e in out] == [(COMPLETED, ids[0]),
                                                        ("conversation.item.input_audio_transcription.failed", ids[1])]
    assert out[0]["transcript"] == ""
    out = d.outgoing({"type": "transcript.final", "utterance_id": 2, "text": "Hi."})
    assert [(e["type"], e["item_id"]) for e in out if e["type"] == COMPLETED] == [(COMPLETED, ids[2])]
    assert d.outgoing({"type": "session.end"}) == []


def test_server_vad_clear_drops_the_open_turn():
    d = started(OpenAIRealtimeDialect())
    d.outgoing({"type": "vad.speech_start", "timestamp": 0.2})
    natives, replies = d.incoming('{"type": "input_audio_buffer.clear"}')
    assert natives == [{"type": "clear"}] and replies[0]["type"] == "input_audio_buffer.cleared"
    assert d.outgoing({"type": "vad.speech_end", "timestamp": 0.9}) == []  # the clear's own speech_end
    natives, replies = d.incoming('{"type": "input_audio_buffer.commit"}')
    assert natives == [] and replies[0]["error"]["code"] == "input_audio_buffer_commit_empty"


def test_manual_mode_joins_finals_until_commit():
    d = started(OpenAIRealtimeDialect())
    d.incoming('{"type": "session.update", "session": {"turn_detection": null}}')
    assert d.outgoing({"type": "vad.speech_start", "timestamp": 0.1}) == []
    # Before the commit names the item, its text is held back.
    assert d.outgoing({"type": "transcript.partial", "utterance_id": 0, "text": "One tw", "stable": "One"}) == []
    d.outgoing({"type": "vad.speech_end", "timestamp": 1.0})
    assert d.outgoing({"type": "transcript.final", "utterance_id": 0, "text": "One."}) == []
    d.incoming(json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\0" * 48000)}))
    d.outgoing({"type": "vad.speech_start", "timestamp": 1.5})
    d.outgoing({"type": "transcript.partial", "utterance_id": 1, "text": "Two", "stable": ""})
    natives, replies = d.incoming('{"type": "input_audio_buffer.commit"}')
    assert natives == [{"type": "flush"}]
    assert [(e["type"], e.get("delta")) for e in replies] == [("input_audio_buffer.committed", None), (DELTA, "One.")]
    item = replies[0]["item_id"]
    d.outgoing({"type": "vad.speech_end", "timestamp": 2.0})
    final = d.outgoing({"type": "transcript.final", "utterance_id": 1, "text": "Two."})
    assert [e["delta"] for e in final] == [" Two."]
    out = d.outgoing({"type": "flush.done"})
    assert [e["type"] for e in out] == [COMPLETED]
    assert out[-1]["type"] == COMPLETED and out[-1]["item_id"] == item
    assert out[-1]["transcript"] == "One. Two." and out[-1]["usage"]["seconds"] == 1.0
