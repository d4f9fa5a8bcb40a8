"""The speculative decode's sentence-end probability (AsrResult.sentence_end) from the real
faster-whisper plugin on real speech, and how the turn policy reads it (host.turn_text)."""

from __future__ import annotations

import numpy as np
import pytest

from host.client import read_wav
from host.turn_text import TextVerdict, read

# A clip whose end the dev set's recording (bench/results/2026-12-07-turn-text-pauses-in-decode.json)
# scored far from the thresholds: sentence_end 0.99, Smart Turn 0.99 at 0.1 s of silence.
FINISHED = "1998-15444-0003"


@pytest.fixture(scope="module")
def engine(default_engine):
    return default_engine


def audio(utt) -> np.ndarray:
    return np.frombuffer(read_wav(utt.path).pcm, "<i2").astype(np.float32) / 32768


def mid_word(x: np.ndarray, fraction: float = 0.5) -> int:
    """A sample inside a word: the 10 ms frame at ``fraction`` of the clip's loud frames."""
    frames = x[: len(x) // 160 * 160].reshape(-1, 160)
    energy = 10 * np.log10((frames ** 2).mean(1) + 1e-12)
    loud = np.flatnonzero(energy > energy.max() - 20)
    return int(loud[int(fraction * len(loud))]) * 160


@pytest.mark.parametrize("silence_s", [0.0, 0.1])
def test_a_finished_sentence_reads_as_finished(engine, speech_by_id, silence_s):
    """With 0.1 s of silence after it (as the server decodes it at the text checkpoint) the decoder
    closes a segment after the last word and decodes the full stop in a second call: the probability
    still comes from the step after the word."""
    x = np.concatenate([audio(speech_by_id[FINISHED]), np.zeros(int(silence_s * 16000), np.float32)])
    result = engine.asr.variants["fast"].transcribe(x, language="en", word_timestamps=False, sentence_end=True)
    assert result.sentence_end is not None and result.sentence_end >= 0.9, result
    assert read(result, 0.9) is TextVerdict.FINISHED


def test_beam_search_cannot_say(engine, speech_by_id):
    result = engine.asr.variants["accurate"].transcribe(audio(speech_by_id[FINISHED]), language="en",
                                                        word_timestamps=False, sentence_end=True)
    assert result.text and result.sentence_end is None


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_speech_cut_inside_a_word_does_not_read_as_finished(engine, speech_by_id, fraction):
    x = audio(speech_by_id[FINISHED])
    cut = np.concatenate([x[: mid_word(x, fraction)], np.zeros(1600, np.float32)])  # 0.1 s of silence after
    result = engine.asr.variants["fast"].transcribe(cut, language="en", word_timestamps=False, sentence_end=True)
    assert result.text, "nothing decoded"
    assert read(result, 0.9) is not TextVerdict.FINISHED, result


def test_it_is_computed_only_when_asked(engine, speech_by_id):
    fast = engine.asr.variants["fast"]
    x = audio(speech_by_id[FINISHED])
    assert fast.transcribe(x, language="en", word_timestamps=False).sentence_end is None


def test_asking_does_not_change_the_text(engine, speech_by_id):
    fast = engine.asr.variants["fast"]
    x = audio(speech_by_id[FINISHED])
    plain = fast.transcribe(x, language="en", word_timestamps=True)
    asked = fast.transcribe(x, language="en", word_timestamps=True, sentence_end=True)
    assert asked.text == plain.text and [w.word for w in asked.words] == [w.word for w in plain.words]
