"""The endpointing state machine on probability sequences, and the Silero plugin on real audio."""

from __future__ import annotations

import numpy as np
import pytest

from host.client import read_wav
from host.endpointing import Endpointer, EndpointingOptions, SpeechEnd, SpeechPause, SpeechStart

W = 512  # 32 ms windows
SR = 16000


def run(probs, pauses=False, **opts):
    ep = Endpointer(EndpointingOptions(**opts), W)
    events = []
    for p in probs:
        events.extend(ep.push(p))
    if not pauses:
        events = [e for e in events if not isinstance(e, SpeechPause)]
    return ep, events


def windows(seconds: float) -> int:
    return int(round(seconds * SR / W))


def test_speech_then_silence_gives_one_utterance_with_preroll():
    probs = [0.0] * windows(1.0) + [0.9] * windows(1.0) + [0.0] * windows(1.0)
    ep, events = run(probs, preroll_s=0.3, endpoint_silence_s=0.5, postroll_s=0.2)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    onset = windows(1.0) * W
    assert events[0].sample == onset - int(0.3 * SR)
    speech_end = onset + windows(1.0) * W
    assert events[1].sample == speech_end + int(0.2 * SR)
    assert events[1].reason == "silence"


def test_pause_predicts_the_endpoint_it_precedes():
    probs = [0.9] * windows(1.0) + [0.0] * windows(1.0)
    _, events = run(probs, pauses=True, speculate_after_s=0.2, postroll_s=0.2, endpoint_silence_s=0.5)
    assert [type(e) for e in events] == [SpeechStart, SpeechPause, SpeechEnd]
    assert events[1].sample == events[2].sample


def test_resumed_speech_gets_a_new_pause():
    probs = [0.9] * windows(1.0) + [0.0] * windows(0.3) + [0.9] * windows(1.0) + [0.0] * windows(1.0)
    _, events = run(probs, pauses=True, speculate_after_s=0.2, endpoint_silence_s=0.5)
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStart, SpeechPause, SpeechPause, SpeechEnd]
    assert events[1].sample < events[2].sample == events[3].sample


def test_speculation_off():
    _, events = run([0.9] * windows(1.0) + [0.0] * windows(1.0), pauses=True, speculate_after_s=0)
    assert not [e for e in events if isinstance(e, SpeechPause)]


def test_endpoint_waits_for_endpoint_silence():
    probs = [0.9] * windows(1.0) + [0.0] * windows(0.4) + [0.9] * windows(1.0) + [0.0] * windows(0.7)
    _, events = run(probs, endpoint_silence_s=0.5)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]  # a 0.4 s pause does not split


def test_short_blips_are_dropped():
    probs = [0.0] * 10 + [0.9] * 3 + [0.0] * windows(1.0)  # 96 ms of "speech"
    _, events = run(probs, min_speech_s=0.25)
    assert events == []


def test_hysteresis_keeps_speech_between_thresholds():
    probs = [0.9] * windows(0.5) + [0.4] * windows(2.0) + [0.0] * windows(0.6)
    _, events = run(probs, threshold=0.5, endpoint_silence_s=0.5)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    assert events[1].sample >= windows(0.5) * W


def test_max_utterance_cuts_at_quietest_recent_window():
    probs = [0.95] * windows(9.0) + [0.55] + [0.95] * windows(3.0) + [0.0] * windows(1.0)
    _, events = run(probs, max_utterance_s=10.0)
    kinds = [type(e).__name__ + ":" + getattr(e, "reason", "") for e in events]
    assert kinds == ["SpeechStart:", "SpeechEnd:max_length", "SpeechStart:", "SpeechEnd:silence"]
    cut = events[1].sample
    assert cut == windows(9.0) * W  # the dip
    assert events[2].sample == cut  # contiguous: nothing lost at the cut
    assert cut - events[0].sample <= 10 * SR


def test_flush_closes_open_and_pending_speech():
    ep, events = run([0.9] * windows(1.0))
    assert [type(e) for e in events] == [SpeechStart]
    end = ep.flush(upto=ep.position + 100)
    assert end == [SpeechEnd(ep.position + 100, "flush")]
    ep2, events2 = run([0.9] * 2, min_speech_s=0.25)  # pending, not yet confirmed
    assert events2 == []
    assert [type(e) for e in ep2.flush()] == [SpeechStart, SpeechEnd]


def test_next_utterance_never_overlaps_previous():
    probs = [0.9] * windows(1.0) + [0.0] * windows(0.55) + [0.9] * windows(1.0) + [0.0] * windows(1.0)
    _, events = run(probs, preroll_s=1.0, postroll_s=0.2)
    starts = [e.sample for e in events if isinstance(e, SpeechStart)]
    ends = [e.sample for e in events if isinstance(e, SpeechEnd)]
    assert len(starts) == 2 and starts[1] >= ends[0]


def test_earliest_needed_sample_covers_preroll():
    ep, _ = run([0.0] * windows(2.0), preroll_s=0.3)
    assert ep.earliest_needed_sample() == ep.position - int(0.3 * SR)


@pytest.fixture(scope="module")
def silero():
    from engine_host_vad_silero import build
    from host.contracts import LoadContext

    cache = {}
    return build({"backend": "onnx", "model_file": None},
                 LoadContext(shared=lambda k, f: cache.setdefault(k, f()), engine_id="t"))


def test_silero_finds_speech_in_real_audio(silero, speech_by_id):
    audio = read_wav(speech_by_id["jfk"].path)
    samples = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768
    silent = np.zeros(SR, dtype=np.float32)
    samples = np.concatenate([silent, samples, silent])
    n = len(samples) // W
    probs = silero.open_stream().probabilities(samples[: n * W].reshape(n, W))
    assert probs[: windows(0.9)].max() < 0.3  # leading digital silence
    assert (probs > 0.5).mean() > 0.4
    ep, events = run(probs)
    first = events[0]
    assert isinstance(first, SpeechStart) and 0.6 * SR <= first.sample <= 1.5 * SR


def test_silero_streams_are_independent(silero, speech_by_id):
    audio = read_wav(speech_by_id["jfk"].path)
    samples = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32)[: 50 * W] / 32768
    chunks = samples.reshape(50, W)
    a, b = silero.open_stream(), silero.open_stream()
    whole = a.probabilities(chunks)
    b.probabilities(np.zeros((7, W), dtype=np.float32))  # another session's state must not leak
    fresh = silero.open_stream()
    parts = np.concatenate([fresh.probabilities(chunks[:20]), fresh.probabilities(chunks[20:])])
    np.testing.assert_allclose(parts, whole, atol=1e-6)


def test_silero_batched_matches_one_by_one(silero, speech_by_id):
    audio = read_wav(speech_by_id["jfk"].path)
    samples = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32)[: 90 * W] / 32768
    chunks = samples.reshape(3, 30, W)  # three "sessions" with different audio
    alone = [silero.open_stream().probabilities(c) for c in chunks]
    streams = [silero.open_stream() for _ in chunks]
    batched = np.stack([silero.batch_probabilities(streams, chunks[:, k]) for k in range(30)], axis=1)
    np.testing.assert_allclose(batched, np.stack(alone), atol=1e-5)
