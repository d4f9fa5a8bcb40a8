"""Silence around a final's audio (the faster-whisper plugin's ``final_padding_s``): which decodes get
it, and that word times stay on the utterance's own audio. Real Whisper base on real speech. The
default engine no longer pads (``encoder_fill`` gains as much for less); operators still may."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from host.client import read_wav


@pytest.fixture(scope="module")
def variants(default_engine):
    return default_engine.asr.variants


@pytest.fixture(scope="module")
def accurate(variants):
    """Whisper base, beam 5, padding English finals as stop 28 shipped it (the encoder fill replaced it)."""
    return dataclasses.replace(variants["accurate"], padding=(0.5, 1.0), padded_languages=frozenset({"en"}))


def test_which_decodes_are_padded(accurate):
    assert accurate.pads("en", partial=False)
    assert not accurate.pads("en", partial=True)  # partials stay as fast as they were
    assert not accurate.pads("de", partial=False)  # FLEURS streamed worse padded
    assert dataclasses.replace(accurate, padded_languages=None).pads("de", partial=False)
    assert not dataclasses.replace(accurate, padding=(0.0, 0.0)).pads("en", partial=False)


def test_the_shipped_engine_pads_nothing(variants):
    # Silence in the encoder window (encoder_fill) gains as much for less compute.
    assert not any(v.pads("en", partial=False) for v in variants.values())


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
