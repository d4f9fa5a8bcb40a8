"""Deepgram live streaming compatibility (/v1/listen): the real ``deepgram-sdk`` against a real worker.

Real speech (../shared/speech) is streamed through the SDK's own socket client (pointed at the
worker with a ``DeepgramClientEnvironment``) as raw linear16 and as a WAV stream without
``encoding``; final ``Results`` are scored with the speech set's WER. Messages read raw off the
wire are validated strictly against the SDK's pydantic models. Bad connect parameters must be
refused before the upgrade (HTTP 400, ``dg-error``, the SDK's ``ApiError``), on a worker and through
the router; malformed messages must get Deepgram's ``SchemaError``. WAV header parsing is also
checked directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import json
import re
import struct
import time
import wave
from urllib.parse import parse_qsl

import numpy as np
import pytest
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import (
    ListenV1ConfigureFailure,
    ListenV1ConfigureSuccess,
    ListenV1Error,
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from host.client import concat, read_wav, silence
from host.compat import Query
from host.compat.deepgram import INTERIM_CONFIDENCE, DeepgramDialect, _plain, _spread, _wav_header
from host.session_config import ConfigError
from host.wer import word_errors
from tests.support import RedisServer, RouterProcess, WorkerProcess, chunks, http_get, mulaw8k, pcm_at, run_compat_snippet

IDS = ["librivox-sas01-0880", "librivox-sas01-0930", "1688-142285-0004"]


def client_for(url: str) -> AsyncDeepgramClient:
    http = url.replace("ws", "http", 1)
    environment = DeepgramClientEnvironment(base=http, production=url, agent=url, agent_rest=http)
    return AsyncDeepgramClient(api_key="dg-local-test", environment=environment)


def wav_bytes(pcm: bytes, rate: int, channels: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def stereo(pcm: bytes) -> bytes:
    mono = np.frombuffer(pcm, dtype="<i2")
    return np.repeat(mono, 2).tobytes()


async def collect(socket, until: str = "Metadata", timeout: float = 60.0) -> list:
    """Every message of the SDK socket up to and including the first of type ``until``."""
    out = []

    async def run():
        async for message in socket:
            out.append(message)
            if getattr(message, "type", None) == until:
                return
    await asyncio.wait_for(run(), timeout)
    return out


def of(messages, kind: str) -> list:
    return [m for m in messages if getattr(m, "type", None) == kind]


SDK_MODELS = {"Results": ListenV1Results, "Metadata": ListenV1Metadata, "Error": ListenV1Error,
              "SpeechStarted": ListenV1SpeechStarted, "UtteranceEnd": ListenV1UtteranceEnd,
              "ConfigureSuccess": ListenV1ConfigureSuccess, "ConfigureFailure": ListenV1ConfigureFailure}


def checked(raw: str) -> dict:
    """A server message off the wire, validated strictly against the SDK's model of its type."""
    message = json.loads(raw)
    SDK_MODELS[message["type"]].model_validate(message, strict=True)
    return message


async def refusal(url: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a handshake that must be refused before the upgrade."""
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, additional_headers=headers or {})
    response = refused.value.response
    return response.status_code, dict(response.headers.raw_items()), json.loads(response.body)


def assert_deepgram_refusal(status: int, headers: dict, body: dict, expected: int, needle: str) -> None:
    """Deepgram's refusal shape: the error text in dg-error and the body, one request id in both."""
    assert status == expected, (status, body)
    assert set(body) == {"err_code", "err_msg", "request_id"}, body
    assert body["err_code"] == {400: "INVALID_QUERY_PARAMETER", 401: "INVALID_AUTH"}[expected], body
    assert needle in body["err_msg"] and headers["dg-error"] == body["err_msg"], (headers, body)
    assert headers["dg-request-id"] == body["request_id"] and len(body["request_id"]) == 36, (headers, body)


async def test_sdk_linear16_interim_vad_events_and_utterance_end(idle_worker, speech_by_id):
    """Raw linear16: per utterance SpeechStarted < interims < final (speech_final) < UtteranceEnd;
    Finalize with nothing buffered gets an empty from_finalize final; CloseStream → Metadata last."""
    utts = [speech_by_id[i] for i in IDS]
    audio = concat(silence(0.5), *[part for u in utts for part in (read_wav(u.path), silence(1.2))])
    pcm = pcm_at(audio, 16000)
    async with client_for(idle_worker.url).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000, interim_results="true", punctuate="true",
            vad_events="true", utterance_end_ms="1000", language="en-US") as socket:
        receiving = asyncio.create_task(collect(socket))
        for piece in chunks(pcm, 3200):  # 100 ms at ~3x real time, so interim results come back
            await socket.send_media(piece)
            await asyncio.sleep(0.033)
        await socket.send_keep_alive()
        await socket.send_finalize()  # the trailing silence is all endpointed: nothing to finalize
        await socket.send_close_stream()
        messages = await receiving

    assert messages[-1].type == "Metadata"
    meta = messages[-1]
    assert meta.sha256 == hashlib.sha256(pcm).hexdigest() and meta.channels == 1
    assert abs(meta.duration - audio.seconds) < 0.01
    assert not of(messages, "Error"), of(messages, "Error")
    results = of(messages, "Results")
    finals = [r for r in results if r.is_final and r.channel.alternatives[0].transcript]
    assert len(finals) >= len(utts)
    assert all(r.speech_final and not r.from_finalize for r in finals)
    interims = [r for r in results if not r.is_final and r.channel.alternatives[0].transcript]
    assert interims, "no interim results"
    for r in interims:  # apps index words[0]: interims carry (estimated) words too
        alt = r.channel.alternatives[0]
        assert alt.words and alt.words[0].punctuated_word == next(t for t in alt.transcript.split() if _plain(t))
        assert r.start - 0.001 <= alt.words[0].start <= alt.words[-1].end <= r.start + r.duration + 0.001
    finalize_answer = [r for r in results if r.from_finalize]
    assert len(finalize_answer) == 1 and finalize_answer[0].channel.alternatives[0].transcript == ""
    # Each UtteranceEnd follows its utterance's final at once; each utterance opened with SpeechStarted.
    kinds = ["F" if getattr(m, "is_final", False) else m.type[0] for m in messages]
    assert kinds[0] == "S" and kinds[-2:] == ["F", "M"], kinds
    assert all(kinds[i - 1] == "F" for i, k in enumerate(kinds) if k == "U"), kinds
    assert kinds.count("U") == len(finals) <= kinds.count("S"), kinds
    last = 0.0
    for r in finals:
        alt = r.channel.alternatives[0]
        assert 0 < alt.confidence <= 1 and alt.languages == ["en"] and alt.words
        assert r.metadata.request_id == meta.request_id and r.metadata.model_uuid in meta.models
        for w in alt.words:
            assert last <= w.start <= w.end <= r.start + r.duration + 0.01 and w.start >= r.start - 0.01
            assert w.word == _plain(w.punctuated_word) and 0 <= w.confidence <= 1
            last = w.end
    for started, end in zip(of(messages, "SpeechStarted"), of(messages, "UtteranceEnd")):
        assert started.timestamp < end.last_word_end
    transcript = " ".join(r.channel.alternatives[0].transcript for r in finals)
    counts = word_errors(" ".join(u.reference for u in utts), transcript)
    print(f"Deepgram SDK, linear16: WER {counts.wer:.3f} over {counts.words} words: {transcript!r}")
    assert counts.wer <= 0.25, transcript


async def test_sdk_wav_stream_without_encoding(idle_worker, speech_by_id):
    """No encoding: a 44.1 kHz stereo WAV stream (header split over frames, a KeepAlive first);
    no punctuate: lower-case words without punctuation, as Deepgram sends them."""
    utt = speech_by_id["1688-142285-0003"]
    pcm = stereo(pcm_at(concat(read_wav(utt.path), silence(0.3)), 44100))
    data = wav_bytes(pcm, 44100, 2)
    async with client_for(idle_worker.url).listen.v1.connect(model="nova-2-meeting") as socket:
        receiving = asyncio.create_task(collect(socket))
        await socket.send_keep_alive()
        await socket.send_media(data[:20])  # part of the header only
        for piece in chunks(data[20:], 16384):
            await socket.send_media(piece)
        await socket.send_close_stream()
        messages = await receiving

    assert messages[-1].type == "Metadata" and messages[-1].channels == 2
    assert messages[-1].sha256 == hashlib.sha256(pcm).hexdigest(), "the WAV header must not count as audio"
    assert not [r for r in of(messages, "Results") if not r.is_final], "interim results are off by default"
    transcript = " ".join(r.channel.alternatives[0].transcript for r in of(messages, "Results"))
    assert transcript == transcript.lower() and not re.search(r"[.,!?;:]", transcript), transcript
    assert all(w.punctuated_word is None for r in of(messages, "Results") for w in r.channel.alternatives[0].words)
    counts = word_errors(utt.reference, transcript)
    print(f"Deepgram SDK, WAV 44.1 kHz stereo: WER {counts.wer:.3f}: {transcript!r}")
    assert counts.wer <= 0.3


async def test_doc_snippet_runs_against_the_server(idle_worker, speech_by_id):
    """The snippet in docs/compat-deepgram.md, executed as written."""
    utt = speech_by_id["librivox-sas01-0880"]
    text = await run_compat_snippet("deepgram", utt, idle_worker)
    assert word_errors(utt.reference, text).wer <= 0.25, text


async def test_mulaw_finalize_on_the_wire(idle_worker, speech_by_id):
    """encoding=mulaw (8 kHz default) with a raw client; Finalize mid-speech: from_finalize finals."""
    utt = speech_by_id["1688-142285-0003"]
    data = mulaw8k(read_wav(utt.path))
    url = f"{idle_worker.url}/v1/listen?encoding=mulaw&endpointing=false&smart_format=true"
    async with connect(url, additional_headers={"Authorization": "Token anything"}) as ws:
        for piece in chunks(data, 1600):
            await ws.send(piece)
        await ws.send(json.dumps({"type": "Finalize"}))
        messages = []
        while not messages or not messages[-1].get("from_finalize"):
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        await ws.send(b"")  # the older way to close the stream
        rest = [json.loads(m) async for m in ws]
    assert ws.close_code == 1000 and rest[-1]["type"] == "Metadata"
    finals = [m for m in messages + rest if m["type"] == "Results" and m["is_final"]]
    assert finals and not any(m["speech_final"] for m in finals), "endpointing=false: never speech_final"
    transcript = " ".join(m["channel"]["alternatives"][0]["transcript"] for m in finals)
    assert any(c in transcript for c in ".,?!"), "smart_format punctuates"
    counts = word_errors(utt.reference, transcript)
    print(f"Deepgram mulaw 8 kHz: WER {counts.wer:.3f}: {transcript!r}")
    assert counts.wer <= 0.3


async def test_malformed_messages_get_deepgram_errors(idle_worker):
    """Text messages the server cannot read get Deepgram's SchemaError, echoing the message; a Configure
    over the keyterm limit gets ConfigureFailure; the session goes on. Every message carries the
    request id the 101 announced in dg-request-id."""
    async with connect(f"{idle_worker.url}/v1/listen?encoding=linear16&sample_rate=16000") as ws:
        request_id = ws.response.headers["dg-request-id"]
        for raw, needle in [("{not json", "not valid JSON"), ("[1]", "JSON object"),
                            ('{"type": "Transcribe"}', "'Transcribe'"), ('{"kind": 1}', "None"),
                            ("[" * 100 + "]" * 100, "nested deeper"), ('{"type": "x\\ud800"}', "unknown message type"),
                            (json.dumps({"type": "Configure", "keyterms": "engine host"}), "list of strings"),
                            (json.dumps({"type": "Configure", "features": {"punctuate": 1}}), "true or false")]:
            await ws.send(raw)
            reply = checked(await asyncio.wait_for(ws.recv(), 5))
            assert reply["type"] == "Error" and reply["variant"] == "SchemaError", (raw, reply)
            assert reply["description"].startswith("Could not deserialize last text message: "), reply
            assert needle in reply["description"] and reply["message"] == raw, (raw, reply)
        await ws.send(json.dumps({"type": "Configure", "keyterms": ["x" * 60] * 10}))  # 609 characters
        reply = checked(await ws.recv())
        assert reply["type"] == "ConfigureFailure" and reply["code"] == "CONFIGURE_KEYTERM_LIMIT_EXCEEDED", reply
        await ws.send(json.dumps({"type": "Configure", "keyterms": ["engine host", "Dalston"]}))
        reply = checked(await ws.recv())
        assert reply["type"] == "ConfigureSuccess", reply
        await ws.send(json.dumps({"type": "Configure", "features": {"punctuate": True}}))
        reply = checked(await ws.recv())
        assert reply["type"] == "ConfigureSuccess" and reply["request_id"] == request_id
        await ws.send(b"\x01")  # half a sample: kept for the next frame, no error
        await ws.send(json.dumps({"type": "CloseStream"}))
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "Transcribe"}))  # after CloseStream: ignored
        rest = [checked(m) async for m in ws]
    assert [m["type"] for m in rest] == ["Metadata"], rest
    assert rest[0]["request_id"] == request_id and ws.close_code == 1000


BAD_QUERIES = [
    ("encoding=opus", "encoding: opus is not supported"),
    ("encoding=linear16&multichannel=true", "multichannel:"),
    ("encoding=linear16&endpointing=soon", "endpointing:"),
    ("encoding=linear16&sample_rate=7000", "sample_rate:"),
    ("encoding=linear16&sample_rate=fast", "sample_rate:"),
    ("encoding=linear16&language=zz", "language:"),
    ("model=fast&language=de", "language:"),  # no encoding (a WAV stream): checked before the audio all the same
    ("encoding=linear16&model=nope", "model: 'nope'"),
    ("encoding=linear16&engine=nope", "engine: unknown engine 'nope'"),
]


@pytest.mark.parametrize("query, needle", BAD_QUERIES)
async def test_bad_connect_parameters_are_refused_before_the_upgrade(idle_worker, query, needle):
    """HTTP 400 with dg-error, dg-request-id and Deepgram's JSON body, instead of a 101; the SDK
    raises its ApiError(status_code=400) from connect() instead of a ConnectionClosedError later."""
    status, headers, body = await refusal(f"{idle_worker.url}/v1/listen?{query}")
    assert_deepgram_refusal(status, headers, body, 400, needle)
    options = {"model": "nova-3", **dict(parse_qsl(query))}
    if "engine" in options:
        return  # not a parameter of the SDK's connect()
    with pytest.raises(ApiError) as raised:
        async with client_for(idle_worker.url).listen.v1.connect(**options):
            pass
    assert raised.value.status_code == 400


@pytest.mark.parametrize("first, needle", [
    (b"ID3\x04\x00 an mp3 stream", "must be a WAV stream"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x55\x00\x01\x00\x80\x3e\x00\x00\x00\x7d\x00\x00\x02\x00"
     b"\x10\x00data\x00\x00\x00\x00", "WAV format 85"),
])
async def test_audio_that_is_not_a_supported_wav_is_refused_after_the_upgrade(idle_worker, first, needle):
    """Without encoding only the audio tells its format, so that refusal comes in band: Error, close 1008."""
    async with connect(f"{idle_worker.url}/v1/listen") as ws:
        assert ws.response.headers["dg-request-id"]
        await ws.send(first)
        reply = checked(await asyncio.wait_for(ws.recv(), 5))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert reply["type"] == "Error" and reply["variant"] == "InvalidConfig", reply
    assert needle in reply["description"], reply
    assert ws.close_code == 1008


async def test_native_errors_keep_the_session(idle_worker):
    """A frame over max_frame_bytes: the native recoverable frame_too_large as Error FrameTooLarge
    (Deepgram has no in-band counterpart); the stream goes on to its Metadata."""
    async with connect(f"{idle_worker.url}/v1/listen?encoding=linear16", max_size=None) as ws:
        await ws.send(bytes((1 << 20) + 2))
        reply = checked(await asyncio.wait_for(ws.recv(), 10))
        await ws.send(json.dumps({"type": "CloseStream"}))
        rest = [checked(m) async for m in ws]
    assert reply["type"] == "Error" and reply["variant"] == "FrameTooLarge" and "message" not in reply, reply
    assert [m["type"] for m in rest] == ["Metadata"] and ws.close_code == 1000, rest


async def test_interim_results_have_estimated_words_on_the_wire(idle_worker, speech_by_id):
    """Interim Results validated strictly against the SDK's model: their words spread over the interim's
    span (consecutive, in proportion to their letters) with the typical confidence, which before the
    first final is INTERIM_CONFIDENCE and after it the mean of the finals so far."""
    utts = [speech_by_id["1688-142285-0003"], speech_by_id["librivox-sas01-0880"]]
    pcm = pcm_at(concat(*[part for u in utts for part in (read_wav(u.path), silence(1.2))]), 16000)
    url = f"{idle_worker.url}/v1/listen?encoding=linear16&sample_rate=16000&interim_results=true&punctuate=true"
    async with connect(url) as ws:
        for piece in chunks(pcm, 3200):  # 100 ms at ~3x real time, so interim results come back
            await ws.send(piece)
            await asyncio.sleep(0.033)
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = [checked(m) async for m in ws]
    results = [m for m in messages if m["type"] == "Results" and m["channel"]["alternatives"][0]["transcript"]]
    finals = []
    interims = 0
    for r in results:
        alt = r["channel"]["alternatives"][0]
        if r["is_final"]:
            finals.append(alt["confidence"])
            continue
        interims += 1
        words = alt["words"]
        tokens = [t for t in alt["transcript"].split() if _plain(t)]
        assert [w["punctuated_word"] for w in words] == tokens and [w["word"] for w in words] == list(map(_plain, tokens))
        assert words[0]["start"] == r["start"] and abs(words[-1]["end"] - (r["start"] + r["duration"])) < 0.002
        assert all(a["end"] == b["start"] for a, b in itertools.pairwise(words)), words
        expected = round(sum(finals) / len(finals), 4) if finals else INTERIM_CONFIDENCE
        assert alt["confidence"] == expected and {w["confidence"] for w in words} == {expected}, (finals, alt)
    assert interims and len(finals) >= 2, messages


# --- through the router --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_router(tmp_path_factory):
    """Redis, one worker and a router that wants the API key ``router-key``, all real processes."""
    tmp = tmp_path_factory.mktemp("dg-router")
    redis_server = RedisServer(tmp)
    worker = WorkerProcess(tmp, env={"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL_S": "0.5"}, max_sessions=2)
    router = RouterProcess(tmp, redis_server.url, api_keys="router-key")
    try:
        worker.wait_healthy()
        router.wait_healthy()
        for _ in range(200):
            if http_get(router.http + "/health")[1].get("ready_workers"):
                break
            time.sleep(0.05)
        yield router
    finally:
        router.stop()
        worker.stop()
        redis_server.stop()
    assert "Traceback" not in router.log() + worker.log(), router.log() + worker.log()


async def test_router_refuses_like_deepgram_before_the_upgrade(guarded_router, speech_by_id):
    """The router answers a missing key with Deepgram's 401 and bad parameters (the dialect's own and
    those only the worker's engine can judge) with its 400 before it picks a worker; a good session
    through it carries the 101's dg-request-id in its messages."""
    router = guarded_router
    assert_deepgram_refusal(*await refusal(f"{router.url}/v1/listen?encoding=linear16"), 401, "Invalid credentials")
    with pytest.raises(ApiError) as raised:
        async with client_for(router.url).listen.v1.connect(model="nova-3"):
            pass
    assert raised.value.status_code == 401
    key = {"Authorization": "Token router-key"}
    for query, needle in [BAD_QUERIES[0], BAD_QUERIES[3], BAD_QUERIES[5], BAD_QUERIES[6], BAD_QUERIES[7]]:
        assert_deepgram_refusal(*await refusal(f"{router.url}/v1/listen?{query}", key), 400, needle)
    pcm = pcm_at(concat(read_wav(speech_by_id["1688-142285-0003"].path), silence(0.5)), 16000)
    async with connect(f"{router.url}/v1/listen?encoding=linear16&model=fast&language=en", additional_headers=key) as ws:
        request_id = ws.response.headers["dg-request-id"]
        for piece in chunks(pcm, 16000):
            await ws.send(piece)
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = [checked(m) async for m in ws]
    assert messages[-1]["type"] == "Metadata" and ws.close_code == 1000, messages
    assert {m.get("request_id") or m["metadata"]["request_id"] for m in messages} == {request_id}
    assert any(m["type"] == "Results" and m["channel"]["alternatives"][0]["transcript"] for m in messages)


# --- the dialect alone ---------------------------------------------------------------------


def test_wav_header_parsing():
    header = wav_bytes(b"", 22050, 1)
    assert _wav_header(header) == ("pcm_s16le", 22050, 1, 44)
    for cut in (4, 12, 30, 40):
        assert _wav_header(header[:cut]) is None, cut  # more bytes needed
    # A LIST chunk before data, and WAVE_FORMAT_EXTENSIBLE with a float sub-format.
    fmt = struct.pack("<HHIIHHHHIH14s", 0xFFFE, 2, 48000, 48000 * 8, 8, 32, 22, 32, 3, 3, b"\x00" * 14)
    data = b"RIFF\0\0\0\0WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST\x03\0\0\0abc\0" + b"data\0\0\0\0"
    assert _wav_header(data) == ("pcm_f32le", 48000, 2, len(data))
    with pytest.raises(ConfigError):
        _wav_header(b"OggS\0\0\0\0\0\0\0\0")


def test_spread_shares_the_span_by_letters():
    assert _spread(["Hello,", "world", "a"], 1.0, 2.1) == [(1.0, 1.5), (1.5, 2.0), (2.0, 2.1)]
    assert _spread(["one"], 3.0, 3.0) == [(3.0, 3.0)]
    assert _spread([], 0.0, 1.0) == []


def test_plain_words_and_configure():
    assert [_plain(w) for w in ["Hello,", "don't", "U.S.A.", "well-known", "—"]] == [
        "hello", "don't", "usa", "well-known", ""]
    d = DeepgramDialect()
    assert d.configure({"encoding": "alaw", "model": "accurate", "language": "multi", "interim_results": "true"},
                       {}) == {"enable_vad": "true", "word_timestamps": "true", "interim_results": "true",
                               "model": "accurate", "language": "auto", "encoding": "alaw", "sample_rate": "8000",
                               "channels": "1"}
    assert DeepgramDialect().configure({"model": "nova-3"}, {}) is None  # a container: wait for the header


def test_keyterms_and_language_detection_map_to_native_parameters():
    query = Query([("encoding", "linear16"), ("keyterm", "Kowloon"), ("keyterm", "T. rex, king"),
                   ("keywords", "Dashwood:2"), ("keywords", "Hale"), ("detect_language", "true")])
    native = DeepgramDialect().configure(query, {})
    assert native is not None
    assert native["keyterms"] == "Kowloon,T. rex king,Dashwood,Hale" and native["language"] == "auto"
    with pytest.raises(ConfigError) as refused:
        DeepgramDialect().configure(Query([("encoding", "linear16"), *[("keyterm", "x" * 60)] * 10]), {})
    assert refused.value.param == "keyterm"
    # Configure: keyterms reach the session as a native config; a malformed message applies nothing.
    d = DeepgramDialect()
    natives, answers = d.incoming(json.dumps({"type": "Configure", "keyterms": ["Kowloon"]}))
    assert natives == [{"type": "config", "keyterms": "Kowloon"}] and answers[0]["type"] == "ConfigureSuccess"
    natives, answers = d.incoming(json.dumps({"type": "Configure", "keyterms": ["x"], "features": {"punctuate": 1}}))
    assert natives == [] and answers[0]["variant"] == "SchemaError"
