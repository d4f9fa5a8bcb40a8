"""What fills the encoder window after the audio (the faster-whisper plugin's ``encoder_fill``): the
log-mel of digital silence, as openai-whisper feeds it, for the Whisper base variants; zeros, as
faster-whisper feeds it, for tiny.en. Real Whisper models on real speech."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine_host_asr_faster_whisper import _encoded, _silence_after
from host.client import read_wav


@pytest.fixture(scope="module")
def variants(default_engine):
    return default_engine.asr.variants


@pytest.fixture(scope="module")
def jfk(speech_by_id) -> np.ndarray:
    return np.frombuffer(read_wav(speech_by_id["jfk"].path).pcm, "<i2").astype(np.float32) / 32768


def test_the_filled_window_is_what_openai_whisper_feeds(variants, jfk):
    from faster_whisper.audio import pad_or_trim

    extractor = variants["accurate"].model.feature_extractor
    features = extractor(jfk)
    content = features.shape[-1] - 1  # as faster-whisper counts it
    window = pad_or_trim(features[:, :content])  # what faster-whisper encodes: zeros after the audio
    # openai-whisper pads the audio with 30 s of zeros before the log-mel, so the window's tail is
    # silence's log-mel, not zeros.
    reference = extractor(np.concatenate([jfk, np.zeros(30 * 16000, np.float32)]))[:, : window.shape[-1]]
    after = slice(content + 3, None)  # past the frames whose STFT window still holds the audio's end
    assert not np.allclose(window[:, after], reference[:, after], atol=1e-3)
    filled = _silence_after(window, content)
    assert np.allclose(filled[:, after], reference[:, after], atol=1e-4)
    assert np.array_equal(filled[:, :content], window[:, :content])  # the audio's own frames untouched


def encoded_tails(variant, audio: np.ndarray, **kwargs) -> list[np.ndarray]:
    """The last second of every window the encoder got while ``variant`` transcribed ``audio``."""
    keeper = variant.model.model  # faster-whisper's WhisperModel.model: the CTranslate2 model's wrapper
    seen: list[np.ndarray] = []

    def encode(features, **kw):
        seen.append(np.array(features)[0, :, -100:])
        return keeper._inner.encode(features, **kw)

    _encoded.last = None  # no encoding reused from an earlier test
    keeper.encode = encode
    try:
        variant.transcribe(audio, **kwargs)
    finally:
        del keeper.encode
    assert seen
    return seen


def test_base_variants_fill_with_silence_and_tiny_en_with_zeros(variants, jfk):
    accurate = variants["accurate"]
    assert accurate.fill_silence and variants["multilingual"].fill_silence
    assert not variants["fast"].fill_silence  # tiny.en decodes worse with it (13.9 -> 14.9 %)
    for tail in encoded_tails(accurate, jfk, language=None, word_timestamps=False):  # detection and decode
        assert np.all(tail != 0) and np.ptp(tail) < 1e-6
    for tail in encoded_tails(accurate, jfk, language="en", word_timestamps=False, partial=True):
        assert np.all(tail != 0)  # partials of the variant too
    for variant in (dataclasses.replace(accurate, fill_silence=False), variants["fast"]):
        for tail in encoded_tails(variant, jfk, language="en", word_timestamps=False):
            assert not np.any(tail)
    # The choice is per decode: the same loaded model, asked by the other variant afterwards, fills again.
    assert all(np.all(t != 0) for t in encoded_tails(variants["multilingual"], jfk, language="en", word_timestamps=False))


def test_silence_fill_keeps_the_decode(variants, jfk):
    text = variants["accurate"].transcribe(jfk, language="en", word_timestamps=True)
    assert "ask not what your country can do for you" in text.text.lower().replace(",", "")
    assert text.words and all(0.0 <= w.start <= w.end <= len(jfk) / 16000 for w in text.words)
