"""End to end on real speech: a real worker process, real Silero VAD and faster-whisper tiny.en."""

from __future__ import annotations

import asyncio

import pytest

from host.client import concat, read_wav, session_url, silence, stream
from host.wer import WerCounts, word_errors


def check_order(result) -> None:
    """session.begin first; per utterance speech_start < speech_end <= final; finals in order."""
    types = [m["type"] for m in result.messages]
    assert types[0] == "session.begin"
    assert types[-1] == "session.end"
    open_utt = None
    ended: set[int] = set()
    utterance = -1
    last_final_start = -1.0
    for m in result.messages:
        if m["type"] == "vad.speech_start":
            assert open_utt is None, "speech_start while an utterance is open"
            utterance += 1
            open_utt = utterance
        elif m["type"] == "vad.speech_end":
            assert open_utt is not None, "speech_end without speech_start"
            ended.add(open_utt)
            open_utt = None
        elif m["type"] == "transcript.final":
            assert m["utterance_id"] in ended, f"final before speech_end of utterance {m['utterance_id']}"
            assert m["start"] >= last_final_start
            last_final_start = m["start"]
    assert open_utt is None
    end = result.end
    finals = result.finals
    assert [s["text"] for s in end["segments"]] == [f["text"] for f in finals]
    assert end["transcript"] == " ".join(f["text"] for f in finals)


async def test_manifest_wer_and_order(idle_worker, speech):
    """Every utterance of the dev set, streamed faster than real time, two sessions at a time."""
    url = session_url(idle_worker.url, word_timestamps=True)
    sem = asyncio.Semaphore(2)
    results = {}

    async def one(utt):
        async with sem:
            audio = concat(read_wav(utt.path), silence(1.0))
            results[utt.id] = await stream(url, audio, speed=None)

    await asyncio.gather(*(one(u) for u in speech))
    totals = {"all": WerCounts(0, 0), "test-other": WerCounts(0, 0)}
    for utt in speech:
        result = results[utt.id]
        check_order(result)
        assert result.finals, f"{utt.id}: no final"
        assert len(result.of("vad.speech_start")) == len(result.of("vad.speech_end")) >= 1
        counts = word_errors(utt.reference, result.end["transcript"])
        totals["all"] += counts
        if utt.id[0].isdigit():
            totals["test-other"] += counts
        for final in result.finals:
            words = final["words"]
            assert words, f"{utt.id}: final without words"
            starts = [w["start"] for w in words]
            assert starts == sorted(starts), f"{utt.id}: word starts not monotonic"
            for w in words:
                assert final["start"] - 1e-3 <= w["start"] <= w["end"] <= final["end"] + 1e-3
            assert 0.0 <= final["confidence"] <= 1.0
    print(f"\nstreamed WER: all {totals['all'].wer:.3f}, test-other {totals['test-other'].wer:.3f}")
    assert totals["test-other"].wer <= 0.35
    assert totals["all"].wer <= 0.30


async def test_session_time_counts_silence(idle_worker, speech_by_id):
    """Two utterances 3 s apart; timestamps are positions in the sent audio, silence included."""
    a = read_wav(speech_by_id["1688-142285-0002"].path)
    b = read_wav(speech_by_id["1688-142285-0003"].path)
    lead = 2.0
    audio = concat(silence(lead), a, silence(3.0), b, silence(1.0))
    result = await stream(session_url(idle_worker.url, word_timestamps=True), audio, speed=None)
    check_order(result)
    finals = result.finals
    # The turn detector may end a clip's sentences one by one: group the finals by clip.
    of_a = [f for f in finals if f["start"] < lead + a.seconds]
    of_b = [f for f in finals if f["start"] >= lead + a.seconds]
    assert of_a and of_b, [f["text"] for f in finals]
    first, second = of_a[0], of_b[0]
    # Word times lie within the speech: the audio before each clip is digital silence, so no word
    # starts before it (the VAD's 32 ms windows allow a little), and none ends far into the silence after.
    speech_start = [m["timestamp"] for m in result.of("vad.speech_start")]
    assert first["start"] >= lead - 0.04 and first["start"] > speech_start[0]  # not the pre-roll's start
    assert of_a[-1]["end"] <= lead + a.seconds + 0.15
    assert second["start"] >= lead + a.seconds + 3.0 - 0.04
    assert of_b[-1]["end"] <= lead + a.seconds + 3.0 + b.seconds + 0.15
    for final in finals:
        assert final["start"] == final["words"][0]["start"] and final["end"] == final["words"][-1]["end"]
    assert result.end["total_duration"] == pytest.approx(audio.seconds, abs=0.01)


async def test_first_word_is_not_clipped(idle_worker, speech_by_id):
    """Speech right after silence keeps its first word (pre-roll)."""
    utt = speech_by_id["jfk"]
    audio = concat(silence(1.5), read_wav(utt.path), silence(1.0))
    result = await stream(session_url(idle_worker.url), audio, speed=None)
    words = result.end["transcript"].lower().split()
    assert words and words[0].strip(",.") == "and", result.end["transcript"]


async def test_accurate_variant(idle_worker, speech_by_id):
    utt = speech_by_id["jfk"]
    result = await stream(session_url(idle_worker.url, model="accurate"), concat(read_wav(utt.path), silence(1)),
                          speed=None)
    assert result.of("session.begin")[0]["config"]["model"] == "accurate"
    assert word_errors(utt.reference, result.end["transcript"]).wer <= 0.2


async def test_finals_without_word_timestamps_skip_alignment(idle_worker, speech_by_id):
    """word_timestamps=false (the default) decodes finals without the word-alignment pass: the
    same words as with it, no words sent, and the utterance's VAD span as the segment's times.
    (The silence timer: the turn detector cuts jfk's "Ask not" alone, a fragment whose greedy decode
    is not the same from run to run.)"""
    utt = speech_by_id["jfk"]
    audio = concat(silence(1.5), read_wav(utt.path), silence(1.0))
    with_words = await stream(session_url(idle_worker.url, word_timestamps=True, endpointing="silence"), audio, speed=None)
    without = await stream(session_url(idle_worker.url, word_timestamps=False, endpointing="silence"), audio, speed=None)
    check_order(without)
    assert len(without.finals) == len(with_words.finals)
    for final, reference in zip(without.finals, with_words.finals):
        assert final["text"] and word_errors(reference["text"], final["text"]).wer == 0  # punctuation may differ
    spans = list(zip(without.of("vad.speech_start"), without.of("vad.speech_end")))
    for final in without.finals:
        assert "words" not in final
        assert 0.0 <= final["confidence"] <= 1.0
        start, end = spans[final["utterance_id"]]
        assert (final["start"], final["end"]) == (start["timestamp"], end["timestamp"])

