"""The audio receiver: decoding, frame splits, encodings, resampling, the session buffer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from host.audio import AudioBuffer, AudioDecoder, InvalidAudio


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode_in_pieces(decoder: AudioDecoder, data: bytes, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, 999)
        out.append(decoder.decode(data[pos:pos + n]))
        pos += n
    out.append(decoder.finish())
    return np.concatenate(out)


@pytest.mark.parametrize("encoding, rate, channels", [
    ("pcm_s16le", 16000, 1), ("pcm_s16le", 44100, 2), ("pcm_f32le", 48000, 1), ("mulaw", 8000, 1), ("alaw", 8000, 1),
])
def test_any_split_decodes_like_the_whole(encoding, rate, channels):
    x = sine(440, rate, 0.5)
    if channels == 2:
        x = np.stack([x, x], axis=1).reshape(-1)
    if encoding == "pcm_s16le":
        data = (x * 32767).astype("<i2").tobytes()
    elif encoding == "pcm_f32le":
        data = x.astype("<f4").tobytes()
    else:
        data = bytes(random.Random(1).randrange(256) for _ in range(len(x)))
    whole_dec = AudioDecoder(encoding, rate, channels)
    whole = np.concatenate([whole_dec.decode(data), whole_dec.finish()])
    for seed in range(3):
        np.testing.assert_array_equal(decode_in_pieces(AudioDecoder(encoding, rate, channels), data, seed), whole)


def test_mulaw_and_alaw_known_values():
    mulaw = AudioDecoder("mulaw", 8000)._to_float(bytes([0xFF, 0x7F, 0x00, 0x80]))
    np.testing.assert_allclose(mulaw * 32768, [0, 0, -32124, 32124])
    alaw = AudioDecoder("alaw", 8000)._to_float(bytes([0xD5, 0x55, 0xAA, 0x2A]))
    np.testing.assert_allclose(alaw * 32768, [8, -8, 32256, -32256])


def test_resampled_sine_keeps_its_frequency():
    out = AudioDecoder("pcm_f32le", 48000).decode(sine(1000, 48000, 1.0).astype("<f4").tobytes())
    spectrum = np.abs(np.fft.rfft(out[2000:14000] * np.hanning(12000)))
    peak_hz = np.argmax(spectrum) * 16000 / 12000
    assert abs(peak_hz - 1000) < 3


def test_non_finite_floats_are_invalid_and_leave_state_clean():
    dec = AudioDecoder("pcm_f32le", 16000)
    with pytest.raises(InvalidAudio):
        dec.decode(np.array([0.1, np.nan], dtype="<f4").tobytes())
    assert dec.decode(np.array([0.25], dtype="<f4").tobytes()).tolist() == [0.25]


def test_odd_bytes_wait_for_the_next_frame():
    dec = AudioDecoder()
    assert dec.decode(b"\x00").size == 0
    assert dec.decode(b"\x40").tolist() == [0.5]


def test_buffer_slices_by_session_index_and_releases():
    buf = AudioBuffer()
    buf.append(np.arange(10, dtype=np.float32))
    buf.append(np.arange(10, 20, dtype=np.float32))
    assert buf.slice(5, 12).tolist() == list(range(5, 12))
    buf.discard_before(8)
    assert buf.start == 8 and buf.held == 12
    assert buf.slice(0, 10).tolist() == [8, 9]
