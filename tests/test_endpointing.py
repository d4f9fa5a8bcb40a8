"""The endpointing state machine on probability sequences, and the Silero plugin on real audio."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from host.client import read_wav
from host.endpointing import Endpointer, EndpointingOptions, SpeechEnd, SpeechLikely, SpeechPause, SpeechResume, SpeechStart

W = 512  # 32 ms windows
SR = 16000


def run(probs, pauses=False, **opts):
    ep = Endpointer(EndpointingOptions(**opts), W)
    events = []
    for p in probs:
        events.extend(ep.push(p))
    events = [e for e in events if not isinstance(e, SpeechLikely)]
    if not pauses:
        events = [e for e in events if not isinstance(e, (SpeechPause, SpeechResume))]
    return ep, events


def test_speech_is_likely_before_it_is_an_utterance_and_blips_say_so_too():
    """SpeechLikely comes after early_partial_s of speech, at the start SpeechStart will have."""
    ep = Endpointer(EndpointingOptions(min_speech_s=0.25, early_partial_s=0.1, preroll_s=0.3), W)
    events = [e for p in [0.0] * windows(1.0) + [0.9] * windows(1.0) for e in ep.push(p)]
    assert [type(e) for e in events] == [SpeechLikely, SpeechStart]
    assert events[0].sample == events[1].sample
    blip = Endpointer(EndpointingOptions(min_speech_s=0.25, early_partial_s=0.1), W)
    events = [e for p in [0.9] * windows(0.15) + [0.0] * windows(1.0) for e in blip.push(p)]
    assert [type(e) for e in events] == [SpeechLikely] and not blip.pending and not blip.in_speech
    off = Endpointer(EndpointingOptions(early_partial_s=0.0), W)
    assert not any(isinstance(e, SpeechLikely) for p in [0.9] * windows(1.0) for e in off.push(p))


def windows(seconds: float) -> int:
    return round(seconds * SR / W)


def test_speech_then_silence_gives_one_utterance_with_preroll():
    probs = [0.0] * windows(1.0) + [0.9] * windows(1.0) + [0.0] * windows(1.0)
    _ep, events = run(probs, preroll_s=0.3, endpoint_silence_s=0.5, postroll_s=0.2)
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
    assert kinds == [SpeechStart, SpeechPause, SpeechResume, SpeechPause, SpeechEnd]
    assert events[1].sample < events[3].sample == events[4].sample
    # The resume is reported at the first speech window after the pause.
    assert events[2].sample == (windows(1.0) + windows(0.3)) * W


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


def test_short_utterance_waits_for_the_longer_silence():
    short = [0.9] * windows(1.0) + [0.0] * windows(0.7) + [0.9] * windows(1.0) + [0.0] * windows(1.5)
    _, events = run(short, endpoint_silence_s=0.5)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd, SpeechStart, SpeechEnd]
    _, events = run(short, endpoint_silence_s=0.5, short_utterance_s=2.0, short_endpoint_silence_s=1.0)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]  # the 0.7 s pause no longer cuts
    # Once the utterance holds enough speech, the normal endpoint applies again.
    long = [0.9] * windows(2.5) + [0.0] * windows(0.7) + [0.9] * windows(1.0) + [0.0] * windows(1.5)
    _, events = run(long, endpoint_silence_s=0.5, short_utterance_s=2.0, short_endpoint_silence_s=1.0)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd, SpeechStart, SpeechEnd]


def test_short_utterance_speculates_the_same_time_before_its_endpoint():
    def emitted_at(**opts):
        ep = Endpointer(EndpointingOptions(endpoint_silence_s=0.5, speculate_after_s=0.2, **opts), W)
        when = {}
        for i, p in enumerate([0.9] * windows(1.0) + [0.0] * windows(2.0)):
            for e in ep.push(p):
                when.setdefault(type(e), i)
        return when

    normal = emitted_at()
    short = emitted_at(short_utterance_s=2.0, short_endpoint_silence_s=1.0)
    assert short[SpeechEnd] - normal[SpeechEnd] == pytest.approx(windows(0.5), abs=1)
    # Speculation moves with the endpoint: still 0.3 s ahead of it, not 0.2 s after the speech.
    assert short[SpeechEnd] - short[SpeechPause] == pytest.approx(normal[SpeechEnd] - normal[SpeechPause], abs=1)


def test_earliest_needed_sample_covers_preroll():
    ep, _ = run([0.0] * windows(2.0), preroll_s=0.3)
    assert ep.earliest_needed_sample() == ep.position - int(0.3 * SR)


def _silero(backend: str, model_file: str | None = None):
    from engine_host_vad_silero import build
    from host.contracts import LoadContext

    cache = {}
    return build({"backend": backend, "model_file": model_file},
                 LoadContext(shared=lambda k, f: cache.setdefault(k, f()), engine_id="t"))


@pytest.fixture(scope="module", params=["numpy", "onnx"])
def silero(request):
    return _silero(request.param)


def test_silero_finds_speech_in_real_audio(silero, speech_by_id):
    audio = read_wav(speech_by_id["jfk"].path)
    samples = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768
    silent = np.zeros(SR, dtype=np.float32)
    samples = np.concatenate([silent, samples, silent])
    n = len(samples) // W
    probs = silero.open_stream().probabilities(samples[: n * W].reshape(n, W))
    assert probs[: windows(0.9)].max() < 0.3  # leading digital silence
    assert (probs > 0.5).mean() > 0.4
    _ep, events = run(probs)
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


def test_silero_numpy_backend_matches_onnxruntime(speech_by_id):
    """The numpy backend computes the ONNX model's own weights: same probabilities, for one stream
    fed in uneven chunks and for ragged batches of several streams in one call."""
    numpy_model, onnx_model = _silero("numpy"), _silero("onnx")
    audio = read_wav(speech_by_id["jfk"].path)
    samples = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768
    n = samples.size // W
    wins = samples[: n * W].reshape(n, W)
    reference = onnx_model.open_stream().probabilities(wins)
    stream, cuts = numpy_model.open_stream(), [0, 1, 4, 5, 13, 40, 41, n]
    ours = np.concatenate([stream.probabilities(wins[a:b]) for a, b in itertools.pairwise(cuts)])
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert (reference > 0.5).mean() > 0.4  # real speech, not a trivially silent comparison

    streams = [numpy_model.open_stream() for _ in range(3)]
    starts, done = [0, n // 3, 2 * n // 3], [[], [], []]
    for sizes in ([1, 2, 0], [3, 1, 1], [0, 0, 2], [2, 3, 1], [1, 1, 1]):
        pieces = [wins[s:s + k] for s, k in zip(starts, sizes)]
        for i, probs in enumerate(numpy_model.run_batch(streams, pieces)):
            assert len(probs) == sizes[i]
            done[i].append(probs)
        starts = [s + k for s, k in zip(starts, sizes)]
    for i, first in enumerate([0, n // 3, 2 * n // 3]):
        alone = onnx_model.open_stream().probabilities(wins[first:starts[i]])
        np.testing.assert_allclose(np.concatenate(done[i]), alone, atol=1e-4)


def test_silero_numpy_backend_refuses_another_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from engine_host_vad_silero.numpy_model import UnsupportedModel

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "other",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 512])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(UnsupportedModel, match=r"other\.onnx .*not a Silero v5 model"):
        _silero("numpy", str(path))


@pytest.mark.parametrize("interval_s", [0.0, 0.005])
async def test_vad_batcher_gives_each_session_its_own_probabilities(speech_by_id, interval_s):
    """Requests that wait together run in one ``run_batch`` call, each stream in order, also when
    a busy batcher holds batches apart."""
    from concurrent.futures import ThreadPoolExecutor

    from host.vad import VadBatcher

    model, reference = _silero("numpy"), _silero("onnx")
    samples = _samples(speech_by_id["jfk"])[: 120 * W].reshape(4, 30, W)
    with ThreadPoolExecutor(1) as pool:
        batcher = VadBatcher(model, pool, interval_s=interval_s)
        for i in range(1000):  # a busy last second
            batcher.count_arrival(asyncio.get_running_loop().time() - 1, i % 10)
        streams = [model.open_stream() for _ in range(4)]

        async def session(i: int) -> np.ndarray:
            chunks = np.array_split(samples[i], 10)
            return np.concatenate([await batcher.probabilities(streams[i], c) for c in chunks])

        results = await asyncio.gather(*(session(i) for i in range(4)))
    for i, probs in enumerate(results):
        np.testing.assert_allclose(probs, reference.open_stream().probabilities(samples[i]), atol=1e-4)
    assert batcher.windows == 120
    assert batcher.calls < 40  # 40 requests; the ones that waited together shared a call
    assert batcher.cpu_seconds > 0


def test_vad_batcher_holds_batches_apart_only_under_load():
    from host.vad import VadBatcher

    batcher = VadBatcher(model=None, executor=None, interval_s=0.02)
    for i in range(150):
        batcher.count_arrival(10 + i / 150, i % 10)
    batcher.count_arrival(11.0, 0)
    assert not batcher.busy()  # 150 requests a second: 3 per 20 ms interval
    for i in range(300):
        batcher.count_arrival(11 + i / 300, i % 10)
    batcher.count_arrival(12.0, 0)
    assert batcher.busy()  # 6 per interval, from 10 sessions
    batcher.count_arrival(14.5, 0)
    assert not batcher.busy()  # nothing came in the second before
    for i in range(1000):
        batcher.count_arrival(15 + i / 1000, 7)
    batcher.count_arrival(16.0, 7)
    assert not batcher.busy()  # one session faster than real time waits for nobody
    never = VadBatcher(model=None, executor=None, interval_s=0)
    for i in range(1000):
        never.count_arrival(1 + i / 1000, i % 10)
    never.count_arrival(2.0, 0)
    assert not never.busy()


async def test_busy_vad_batcher_holds_a_batch_for_other_sessions_not_for_a_lone_one(speech_by_id):
    from concurrent.futures import ThreadPoolExecutor

    from host.vad import VadBatcher

    model = _silero("numpy")
    windows = _samples(speech_by_id["jfk"])[: 3 * W].reshape(3, W)
    with ThreadPoolExecutor(1) as pool:
        batcher = VadBatcher(model, pool, interval_s=0.005)
        now = asyncio.get_running_loop().time()
        # Ten sessions were busy in the last second. The load is counted per whole second of the
        # loop's clock; seeding this second too keeps it "the last second" if the requests below
        # fall into the next one on a slow machine.
        for i in range(1000):
            batcher.count_arrival(now - 1, i % 10)
        for i in range(1000):
            batcher.count_arrival(now, i % 10)
        stream = model.open_stream()
        for _ in range(3):
            await batcher.probabilities(stream, windows)
        assert batcher.holds >= 1  # the other nine might have sent something

        lone = VadBatcher(model, pool, interval_s=0.005)
        for _ in range(1000):  # one session, faster than real time
            lone.count_arrival(now - 1, id(stream))
        for _ in range(3):
            await lone.probabilities(stream, windows)
        assert lone.holds == 0


def _samples(utt) -> np.ndarray:
    return np.frombuffer(read_wav(utt.path).pcm, dtype="<i2").astype(np.float32) / 32768


def _first_start_in(vad, head: np.ndarray, tail: np.ndarray) -> float:
    """Seconds into ``tail`` where the first utterance that starts in it begins."""
    events = []
    stream = np.concatenate([head, np.zeros(SR, np.float32), tail])
    for i in range(0, stream.size, 800):
        events += vad.feed(stream[i:i + 800])
    offset = head.size + SR
    starts = [e.sample for e in events if isinstance(e, SpeechStart) and e.sample >= offset - SR // 2]
    return (starts[0] - offset) / SR if starts else float("inf")


def test_vad_state_reset_at_endpoints_keeps_hearing_the_next_speaker(silero, speech_by_id):
    """Silero's state after 25 s of one recording hears the next one (another room, a cold) only
    8 s late; reset and re-warmed at the endpoint it hears it at once."""
    from host.vad import VadStage

    if "mfa-acoustic_corpus" not in speech_by_id or "mfa-cold_corpus" not in speech_by_id:
        pytest.skip("the mfa-* recordings are not in ../shared/speech")
    head, tail = _samples(speech_by_id["mfa-acoustic_corpus"]), _samples(speech_by_id["mfa-cold_corpus"])
    fresh = _first_start_in(VadStage(silero, EndpointingOptions()), np.zeros(0, np.float32), tail)
    assert fresh < 2.0  # the speaker starts 1.5 s into the recording
    drifted = VadStage(silero, EndpointingOptions(reset_state_at_endpoint=False))
    reset = VadStage(silero, EndpointingOptions())
    assert _first_start_in(reset, head, tail) < fresh + 0.5
    assert reset.resets >= 1
    assert _first_start_in(drifted, head, tail) > fresh + 3.0


def test_vad_reset_warmup_windows_are_not_endpointed(silero, speech_by_id):
    from host.vad import VadStage

    samples = np.concatenate([_samples(speech_by_id["jfk"])[: 3 * SR], np.zeros(2 * SR, np.float32)])
    vad = VadStage(silero, EndpointingOptions())
    for i in range(0, samples.size, 800):
        vad.feed(samples[i:i + 800])
    assert vad.resets == 1
    assert vad.windows == vad.position // W == samples.size // W  # warm-up windows not counted


def test_vad_stream_without_reset_is_reopened(speech_by_id):
    from host.vad import VadStage

    class Model:
        window_samples = W
        opened = 0

        def open_stream(self):
            Model.opened += 1
            return Stream()

    class Stream:
        def probabilities(self, windows):
            return (np.abs(windows).max(axis=1) > 0.01).astype(np.float32)

    vad = VadStage(Model(), EndpointingOptions())
    loud = np.full(SR, 0.5, np.float32)
    for part in (loud, np.zeros(SR, np.float32), loud):
        vad.feed(part)
    assert vad.resets == 1 and Model.opened == 2
