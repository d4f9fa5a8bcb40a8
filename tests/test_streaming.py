"""Streaming ASR (contract v2 ``open_stream``): the host feeds each utterance's audio to one stream,
in order and without a hole, and asks it for the final once. The test recognizer is a real
component: its stream keeps the pieces it was given and decodes them with the real tiny.en model."""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import pytest

from engine_host_asr_faster_whisper import OPTIONS_SCHEMA as WHISPER_OPTIONS
from engine_host_asr_faster_whisper import build as build_whisper
from host.asr import ComponentFailure, StreamState
from host.client import concat, read_wav, session_url, silence, stream
from host.contracts import AsrResult, AsrStream, SessionOptions, Word
from host.hookspecs import hookimpl
from host.plugins import load_plugins
from host.server import Worker
from host.settings import Settings
from host.wer import word_errors

from .test_batching import batched_engines  # noqa: F401 - the fixture, reused with another plugin

COMPONENT = "asr 'streaming-whisper' (plugin tests.test_streaming)"


class WhisperStream:
    """One utterance: keeps every piece; a hypothesis of the audio so far on each, the final at finish."""

    def __init__(self, model: Any, language: str | None, word_timestamps: bool, options: SessionOptions):
        self.model, self.language, self.word_timestamps, self.options = model, language, word_timestamps, options
        self.pieces: list[np.ndarray] = []
        self.finished = 0
        self.closed = False

    def accept(self, audio: np.ndarray) -> AsrResult | None:
        assert not self.finished, "a piece after finish()"
        self.pieces.append(audio.copy())
        heard = np.concatenate(self.pieces)
        if len(heard) < 8000:
            return None
        return self.model.transcribe(heard, language=self.language, word_timestamps=False, partial=True)

    def finish(self) -> AsrResult:
        self.finished += 1
        heard = np.concatenate(self.pieces) if self.pieces else np.zeros(0, dtype=np.float32)
        return self.model.transcribe(heard, language=self.language, word_timestamps=self.word_timestamps)

    def close(self) -> None:
        self.closed = True


class StreamingWhisper:
    """A streaming recognizer over a real faster-whisper variant; ``transcribe`` must never be used."""

    chunk_s = 0.4

    def __init__(self, inner: Any):
        self.inner = inner
        self.key = ("streaming", *inner.key)
        self.parallelism = 2
        self.languages = inner.languages
        self.streams: list[WhisperStream] = []

    def transcribe(self, audio, *, language, word_timestamps, partial=False, options=None) -> AsrResult:
        raise AssertionError("a streaming model is fed through its streams")

    def open_stream(self, *, language, word_timestamps, options) -> WhisperStream:
        s = WhisperStream(self.inner, language, word_timestamps, options)
        self.streams.append(s)
        return s


BUILT: list[StreamingWhisper] = []


class StreamingEngine:
    def __init__(self, variants: dict[str, StreamingWhisper]):
        self.variants = variants


@hookimpl
def register_asr(register):
    def build(options: dict, context) -> StreamingEngine:
        variants = {name: StreamingWhisper(v) for name, v in build_whisper(options, context).variants.items()}
        BUILT.extend(variants.values())
        return StreamingEngine(variants)

    register("batched-whisper", build, WHISPER_OPTIONS)  # the name the reused engines fixture names


async def test_each_utterance_is_one_stream_fed_in_order_without_a_hole(batched_engines, speech_by_id):  # noqa: F811
    BUILT.clear()
    worker = Worker(Settings(host="127.0.0.1", port=0, engines_dir=batched_engines), load_plugins(
        env={"ENGINE_HOST_PLUGINS": "vad_silero,asr_faster_whisper,turn_smart"}, extra=[sys.modules[__name__]]))
    await worker.start()
    try:
        first, second = speech_by_id["jfk"], speech_by_id["1688-142285-0002"]
        audio = concat(silence(0.5), read_wav(first.path), silence(1.5), read_wav(second.path), silence(1.5))
        result = await stream(session_url(f"ws://127.0.0.1:{worker.port}"), audio, speed=4.0)
    finally:
        await worker.shutdown()
    assert result.end is not None and not result.of("error"), result.of("error")
    (model,) = BUILT
    finals = result.finals
    reference = f"{first.reference} {second.reference}"
    assert word_errors(reference, result.end["transcript"]).wer <= 0.3, result.end["transcript"]
    assert len(model.streams) == len(finals) >= 2  # one stream per utterance
    sent = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768.0
    for s, final in zip(model.streams, finals):
        assert s.finished == 1 and not s.closed
        heard = np.concatenate(s.pieces)
        start = round(final["start"] * 16000)  # without word timestamps a final spans its utterance
        length = round(final["end"] * 16000) - start
        # The whole utterance, then at most the endpoint silence: the end is known only after it.
        assert length <= len(heard) <= length + 1.2 * 16000, (length, len(heard))
        assert np.array_equal(heard, sent[start:start + len(heard)])  # exactly the session's audio, in order
    assert max(len(s.pieces) for s in model.streams) > 1, "fed piece by piece as the audio came"
    assert result.of("transcript.partial"), "the stream's hypotheses are shown as partials"
    final_of = {f["utterance_id"]: i for i, f in enumerate(result.messages) if f["type"] == "transcript.final"}
    assert all(i < final_of[p["utterance_id"]] for i, p in enumerate(result.messages) if p["type"] == "transcript.partial")


# --- StreamState, without a worker ----------------------------------------------------------------


class Recorder:
    """A stream that records what it is given, and can be told to fail."""

    def __init__(self, fail_on: int | None = None):
        self.seen: list[float] = []
        self.fail_on = fail_on

    def accept(self, audio):
        if self.fail_on is not None and len(self.seen) == self.fail_on:
            raise RuntimeError("decoder state lost")
        self.seen.append(float(audio[0]))
        return None

    def finish(self):
        return AsrResult(" ".join(map(str, self.seen)), [Word(" x", 0.0, len(self.seen) * 0.1, 1.0)])


class OneStream:
    parallelism, key = 1, ("one",)

    def __init__(self, stream: Recorder):
        self.stream = stream

    def open_stream(self, *, language, word_timestamps, options):
        return self.stream


def piece(value: float) -> np.ndarray:
    return np.full(1600, value, dtype=np.float32)


def state_of(stream: Recorder) -> StreamState:
    return StreamState(OneStream(stream), COMPONENT, language="en", word_timestamps=True, options=SessionOptions())


def test_a_later_job_waits_for_an_earlier_one_whatever_thread_runs_first():
    recorder = Recorder()
    state = state_of(recorder)
    first, final = state.job(piece(1)), state.job(piece(2), finish=True)
    results: list[Any] = []
    runner = threading.Thread(target=lambda: results.append(final()))
    runner.start()
    with state._cv:
        assert state._cv.wait_for(lambda: final.seq in state._claimed, 30)  # it is waiting for its turn
    assert recorder.seen == []
    first()
    runner.join(30)
    assert recorder.seen == [1.0, 2.0] and results[0].text == "1.0 2.0"
    assert isinstance(recorder, AsrStream)


def test_a_skipped_piece_is_not_fed_and_does_not_hold_up_the_next():
    recorder = Recorder()
    state = state_of(recorder)
    withdrawn, final = state.job(piece(1)), state.job(piece(2), finish=True)
    assert state.skip(withdrawn)
    assert final().text == "2.0"
    assert withdrawn() is None and recorder.seen == [2.0]  # a thread that picked it up anyway does nothing


def test_a_failed_stream_names_its_component_and_is_not_fed_again():
    state = state_of(Recorder(fail_on=1))
    assert state.job(piece(1))() is None
    with pytest.raises(ComponentFailure, match=r"asr 'streaming-whisper' .*stream accept raised RuntimeError"):
        state.job(piece(2))()
    with pytest.raises(ComponentFailure, match="decoder state lost"):
        state.job(piece(3), finish=True)()
    assert state.job(piece(4), close=True)() is None
