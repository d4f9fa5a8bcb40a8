"""Silence around a final's audio (the faster-whisper plugin's ``final_padding_s``): which decodes get
it, and that word times stay on the utterance's own audio. Real Whisper base on real speech."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from host.client import read_wav
from host.offline import load_engine


@pytest.fixture(scope="module")
def variants():
    loaded = load_engine("whisper-streaming", None)
    if isinstance(loaded, str):
        pytest.fail(loaded)
    return loaded.asr.variants


@pytest.fixture(scope="module")
def accurate(variants):
    return variants["accurate"]


def test_the_shipped_engine_pads_english_finals_only(accurate):
    assert accurate.padding == (0.5, 1.0)
    assert accurate.pads("en", partial=False)
    assert not accurate.pads("en", partial=True)  # partials stay as fast as they were
    assert not accurate.pads("de", partial=False)  # FLEURS streamed worse padded
    assert not dataclasses.replace(accurate, padding=(0.0, 0.0)).pads("en", partial=False)


def test_greedy_base_pads_english_too(variants):
    assert variants["multilingual"].pads("en", partial=False) and not variants["multilingual"].pads("pt", partial=False)
    assert not variants["fast"].pads("en", partial=False)  # tiny.en loses with leading silence


def test_word_times_are_the_utterances_own(accurate, speech_by_id):
    utt = speech_by_id["jfk"]
    x = np.frombuffer(read_wav(utt.path).pcm, "<i2").astype(np.float32) / 32768
    seconds = len(x) / 16000
    padded = accurate.transcribe(x, language="en", word_timestamps=True)
    plain = dataclasses.replace(accurate, padding=(0.0, 0.0)).transcribe(x, language="en", word_timestamps=True)
    assert padded.words and plain.words
    assert all(0.0 <= w.start <= w.end <= seconds for w in padded.words)
    # Without the shift back every word would sit 0.5 s late. The bounds are positions in the audio
    # (Whisper's word alignment of the same speech), not elapsed time: half the lead either way.
    assert padded.words[0].word.strip(" ,.").lower() == plain.words[0].word.strip(" ,.").lower() == "and"
    assert abs(padded.words[0].start - plain.words[0].start) < 0.25
    assert abs(padded.words[-1].end - plain.words[-1].end) < 0.25
