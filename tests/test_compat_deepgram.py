"""Deepgram live streaming compatibility (/v1/listen): the real ``deepgram-sdk`` against a real worker.

Real speech (../shared/speech) is streamed through the SDK's own socket client (pointed at the
worker with a ``DeepgramClientEnvironment``) as raw linear16 and as a WAV stream without
``encoding``; final ``Results`` are scored with the speech set's WER. Malformed messages are sent
raw and must get Deepgram's ``Error`` shape. WAV header parsing is also checked directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import struct
import wave

import numpy as np
import pytest
from deepgram import AsyncDeepgramClient
from deepgram.environment import DeepgramClientEnvironment
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import concat, read_wav, silence
from host.compat import Query
from host.compat.deepgram import DeepgramDialect, _plain, _wav_header
from host.session_config import ConfigError
from host.wer import word_errors
from tests.support import chunks, mulaw8k, pcm_at, run_compat_snippet

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
    assert [r for r in results if not r.is_final], "no interim results"
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
    async with connect(f"{idle_worker.url}/v1/listen?encoding=linear16&sample_rate=16000") as ws:
        for raw, variant in [("{not json", "INVALID_JSON"), ("[1]", "INVALID_JSON"),
                             ('{"type": "Transcribe"}', "UNKNOWN_MESSAGE"), ('{"kind": 1}', "UNKNOWN_MESSAGE"),
                             ("[" * 100 + "]" * 100, "INVALID_JSON"), ('{"type": "x\\ud800"}', "UNKNOWN_MESSAGE")]:
            await ws.send(raw)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["type"] == "Error" and reply["variant"] == variant, (raw, reply)
            assert reply["description"] and reply["message"], reply
        await ws.send(json.dumps({"type": "Configure", "keyterms": "engine host"}))  # not a list
        reply = json.loads(await ws.recv())
        assert reply["type"] == "ConfigureFailure" and "list" in reply["description"], reply
        await ws.send(json.dumps({"type": "Configure", "keyterms": ["engine host", "Dalston"]}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "ConfigureSuccess", reply
        await ws.send(json.dumps({"type": "Configure", "features": {"punctuate": True}}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "ConfigureSuccess" and reply["request_id"].startswith("sess_")
        await ws.send(b"\x01")  # half a sample: kept for the next frame, no error
        await ws.send(json.dumps({"type": "CloseStream"}))
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "Transcribe"}))  # after CloseStream: ignored
        rest = [json.loads(m) async for m in ws]
    assert [m["type"] for m in rest] == ["Metadata"], rest
    assert ws.close_code == 1000


@pytest.mark.parametrize("query, first, needle", [
    ("encoding=opus", None, "encoding: opus is not supported"),
    ("encoding=linear16&multichannel=true", None, "multichannel:"),
    ("encoding=linear16&endpointing=soon", None, "endpointing:"),
    ("encoding=linear16&sample_rate=7000", None, "sample_rate:"),
    ("encoding=linear16&language=zz", None, "language:"),
    ("encoding=linear16&model=fast&language=de", None, "language:"),
    ("", b"ID3\x04\x00 an mp3 stream", "must be a WAV stream"),
    ("", b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x55\x00\x01\x00\x80\x3e\x00\x00\x00\x7d\x00\x00\x02\x00"
         b"\x10\x00data\x00\x00\x00\x00", "WAV format 85"),
])
async def test_bad_connect_parameters_and_audio_are_refused(idle_worker, query, first, needle):
    async with connect(f"{idle_worker.url}/v1/listen?{query}") as ws:
        if first is not None:
            await ws.send(first)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert reply["type"] == "Error" and reply["variant"] == "INVALID_CONFIG", reply
    assert needle in reply["description"], reply
    assert ws.close_code == 1008


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
    assert natives == [] and answers[0]["type"] == "ConfigureFailure"
