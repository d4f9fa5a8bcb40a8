"""Property tests of the audio decoder (hypothesis), and real speech in every wire format through a worker.

Complements tests/test_audio.py: there a few fixed cases, here drawn splits, samples, rates and
frequencies, independent reference encoders, and the transcript quality each format delivers.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import warnings

import numpy as np
import pytest
import soxr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from host.audio import ENCODINGS, AudioDecoder, InvalidAudio
from host.client import concat, read_wav, session_url, silence, stream
from host.wer import word_errors

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop  # deprecated, gone in 3.13: only a second, independent G.711 reference
    except ImportError:  # pragma: no cover
        audioop = None

# No example database: nothing is written into the checkout, and every run draws afresh.
PROPERTY = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
RATES = (8000, 16000, 22050, 44100, 48000)
OUT_RATE = 16000

# ---------------------------------------------------------------- reference encoders (ITU-T G.711, as Sun's g711.c)

_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """16-bit linear → G.711 mu-law bytes."""
    v = np.asarray(pcm, dtype=np.int32) >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), 8159) + 0x21
    seg = np.searchsorted(_ULAW_SEG_END, v)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((v >> (seg + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8).tobytes()


def alaw_encode(pcm: np.ndarray) -> bytes:
    """16-bit linear → G.711 A-law bytes."""
    v = np.asarray(pcm, dtype=np.int32) >> 3
    mask = np.where(v >= 0, 0xD5, 0x55)
    v = np.where(v >= 0, v, -v - 1)
    seg = np.searchsorted(_ALAW_SEG_END, v)
    mantissa = np.where(seg < 2, v >> 1, v >> np.maximum(seg, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (seg << 4) | mantissa)
    return (code ^ mask).astype(np.uint8).tobytes()


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 32768), -32768, 32767).astype(np.int16)


def encode(encoding: str, x: np.ndarray) -> bytes:
    """Float samples (interleaved if stereo) → bytes in ``encoding``."""
    if encoding == "pcm_s16le":
        return to_int16(x).astype("<i2").tobytes()
    if encoding == "pcm_f32le":
        return np.asarray(x, dtype="<f4").tobytes()
    return (ulaw_encode if encoding == "mulaw" else alaw_encode)(to_int16(x))


# ---------------------------------------------------------------- decoding helpers


def interleave(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.stack([left, right], axis=1).reshape(-1)


def decode_frames(decoder: AudioDecoder, frames: list[bytes]) -> np.ndarray:
    """Every frame's output, then the final flush, concatenated."""
    return np.concatenate([decoder.decode(f) for f in frames] + [decoder.finish()])


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, taken modulo its length + 1; repeats give empty frames)."""
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def sine(freq: float, rate: int, seconds: float, amp: float) -> np.ndarray:
    """A sine with 10 ms raised-cosine fades, so its only sharp edges would be the decoder's."""
    n = int(rate * seconds)
    x = amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)
    fade = int(0.01 * rate)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    x[:fade] *= ramp
    x[n - fade:] *= ramp[::-1]
    return x.astype(np.float32)


cut_lists = st.lists(st.integers(0, 40_000), max_size=12)  # frame boundaries, taken modulo the length + 1


# ---------------------------------------------------------------- 1. decoder properties


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@settings(max_examples=25, **PROPERTY)
@given(seed=st.integers(0, 2**32 - 1), n_bytes=st.integers(0, 24_000), cuts=cut_lists)
def test_any_split_decodes_like_one_frame(encoding, rate, channels, seed, n_bytes, cuts):
    """Cut points anywhere (inside a sample, inside a stereo pair, empty frames) change nothing."""
    rng = np.random.default_rng(seed)
    if encoding == "pcm_f32le":  # finite and within ±64 (beyond ±1 is clipped), else the frame is refused
        data = rng.uniform(-1.5, 1.5, n_bytes // 4 + 1).astype("<f4").tobytes()[:n_bytes]
    else:
        data = rng.integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    whole = decode_frames(AudioDecoder(encoding, rate, channels), [data])
    pieces = decode_frames(AudioDecoder(encoding, rate, channels), split_at(data, cuts))
    assert pieces.dtype == np.float32 and pieces.shape == whole.shape
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-6)
    # The whole samples were all used: the output covers the input's duration.
    in_samples = n_bytes // (ENCODINGS[encoding] * channels)
    assert abs(whole.size - in_samples * OUT_RATE / rate) <= 1


@settings(max_examples=100, **PROPERTY)
@given(x=hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1, 1, width=32)))
def test_pcm_s16le_round_trip(x):
    """int16 LE at 16 kHz mono: each sample comes back within half a quantization step (scale 1/32768)."""
    out = AudioDecoder("pcm_s16le").decode(encode("pcm_s16le", x))
    expected = np.clip(x.astype(np.float64), -1, 32767 / 32768)  # +1.0 has no int16: it clips
    np.testing.assert_allclose(out, expected, rtol=0, atol=0.5 / 32768 + 1e-7)


@settings(max_examples=100, **PROPERTY)
@given(x=hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-64, 64, width=32)))
def test_pcm_f32le_round_trip(x):
    """float32 LE comes back bit for bit in [-1, 1]; samples up to ±64 are clipped, not refused."""
    out = AudioDecoder("pcm_f32le").decode(encode("pcm_f32le", x))
    np.testing.assert_array_equal(out, np.clip(x, -1, 1))


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
@settings(max_examples=100, **PROPERTY)
@given(pcm=hnp.arrays(np.int16, st.integers(1, 300)))
def test_g711_round_trip(encoding, pcm):
    """G.711 bytes from an independent encoder decode to within the codec's step (|x|/32 + 8 LSB)."""
    data = (ulaw_encode if encoding == "mulaw" else alaw_encode)(pcm)
    out = AudioDecoder(encoding, OUT_RATE).decode(data)
    err = np.abs(out.astype(np.float64) * 32768 - pcm)
    assert (err <= np.abs(pcm.astype(np.float64)) / 32 + 8).all(), (pcm[err.argmax()], err.max())
    if audioop is not None:  # a second reference: CPython's own G.711, both ways
        to_law, from_law = ("lin2ulaw", "ulaw2lin") if encoding == "mulaw" else ("lin2alaw", "alaw2lin")
        assert data == getattr(audioop, to_law)(pcm.astype("<i2").tobytes(), 2)
        np.testing.assert_array_equal(out * 32768, np.frombuffer(getattr(audioop, from_law)(data, 2), dtype="<i2"))


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_g711_every_code_re_encodes_to_itself(encoding):
    """Decoding then re-encoding each of the 256 codes gives the code back (mu-law's -0 becomes +0)."""
    codes = np.arange(256, dtype=np.uint8)
    out = AudioDecoder(encoding, OUT_RATE).decode(codes.tobytes())
    again = np.frombuffer(encode(encoding, out), dtype=np.uint8)
    expected = codes.copy()
    if encoding == "mulaw":
        expected[0x7F] = 0xFF
    np.testing.assert_array_equal(again, expected)


@settings(max_examples=50, **PROPERTY)
@given(
    rate=st.sampled_from([8000, 11025, 22050, 32000, 44100, 48000]),
    freq=st.floats(100, 3500),
    encoding=st.sampled_from(["pcm_s16le", "pcm_f32le"]),
    gains=st.one_of(st.tuples(st.floats(0.1, 0.9)), st.tuples(st.floats(0.1, 0.9), st.floats(0.1, 0.9))),
    seed=st.integers(0, 2**32 - 1),
)
def test_resampled_sine_keeps_frequency_level_and_has_no_clicks(rate, freq, encoding, gains, seed):
    """A 1 s sine at any input rate, mono or stereo, in uneven frames → same frequency, level, no click."""
    channels = len(gains)
    tone = sine(freq, rate, 1.0, 1.0)
    x = tone * gains[0] if channels == 1 else interleave(tone * gains[0], tone * gains[1])
    data = encode(encoding, x)
    rng = random.Random(seed)
    cuts = list(np.cumsum([rng.randint(1, 4000) for _ in range(len(data) // 1000)]))
    out = decode_frames(AudioDecoder(encoding, rate, channels), split_at(data, cuts))
    whole = decode_frames(AudioDecoder(encoding, rate, channels), [data])
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-6)

    assert abs(out.size - OUT_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    peak_hz = np.argmax(spectrum) * OUT_RATE / out.size
    assert abs(peak_hz - freq) <= OUT_RATE / out.size, (peak_hz, freq)  # within one bin
    amp = float(np.mean(gains))  # stereo is averaged
    middle = out[int(0.1 * OUT_RATE):int(0.9 * OUT_RATE)]
    assert abs(np.sqrt(np.mean(middle.astype(np.float64) ** 2)) - amp / np.sqrt(2)) <= 0.03 * amp
    # No click: no step between neighbours beyond what the sine's slope allows.
    max_step = 2 * np.pi * freq / OUT_RATE * amp
    assert np.abs(np.diff(out)).max() <= 1.05 * max_step + 2e-4


@settings(max_examples=100, **PROPERTY)
@given(
    rate=st.sampled_from(RATES),
    channels=st.sampled_from([1, 2]),
    bad=st.sampled_from([np.nan, np.inf, -np.inf, 64.5, -1e30]),
    n=st.integers(1, 2000),
    where=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_bad_f32_frame_is_refused_and_leaves_no_trace(rate, channels, bad, n, where, seed):
    """A frame completing a NaN/inf/out-of-range sample raises InvalidAudio and changes nothing: the
    partial sample pending before it is kept, so re-sending the frame corrected gives the clean stream."""
    n *= channels  # whole stereo pairs: a bad sample in an unfinished pair is not decoded yet
    good = np.random.default_rng(seed).uniform(-1, 1, n).astype("<f4")
    j = min(int(where[0] * n), n - 1)
    poisoned = good.copy()
    poisoned[j] = bad
    good_bytes, bad_bytes = good.tobytes(), poisoned.tobytes()
    p = int(where[1] * 4 * j)  # the bad frame starts at or before the bad sample (maybe inside another) ...
    pair_end = 4 * channels * (j // channels + 1)
    q = pair_end + int(where[2] * (4 * n - pair_end))  # ... and ends at or after it (and its pair)
    dec = AudioDecoder("pcm_f32le", rate, channels)
    before = dec.decode(good_bytes[:p])
    with pytest.raises(InvalidAudio):
        dec.decode(bad_bytes[p:q])
    after = decode_frames(dec, [good_bytes[p:q], good_bytes[q:]])
    expected = decode_frames(AudioDecoder("pcm_f32le", rate, channels), [good_bytes])
    np.testing.assert_allclose(np.concatenate([before, after]), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 2. real speech in three wire formats


def odd_frames(data: bytes, bytes_per_second: float, seed: int) -> list[bytes]:
    """About 0.1 s per frame, every frame an odd number of bytes: cuts fall inside samples."""
    rng = random.Random(seed)
    frames, pos = [], 0
    while pos < len(data):
        n = int(bytes_per_second * rng.uniform(0.07, 0.13)) | 1
        frames.append(data[pos:pos + n])
        pos += n
    return frames


async def test_real_speech_in_each_wire_format(idle_worker, speech):
    """s16 16 kHz mono, mu-law 8 kHz mono and f32 48 kHz stereo transcribe (almost) equally well."""
    utts = speech[:4]
    audio = concat(*[x for u in utts for x in (read_wav(u.path), silence(1.0))])
    assert audio.sample_rate == OUT_RATE and audio.channels == 1
    reference = " ".join(u.reference for u in utts)
    x = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768

    x8 = soxr.resample(x, OUT_RATE, 8000)
    x48 = np.clip(soxr.resample(x, OUT_RATE, 48000), -1, 1)
    formats = {  # name: (encoding, rate, channels, bytes, samples per channel)
        "s16 16k mono": ("pcm_s16le", OUT_RATE, 1, audio.pcm, x.size),
        "mulaw 8k mono": ("mulaw", 8000, 1, encode("mulaw", x8), x8.size),
        "f32 48k stereo": ("pcm_f32le", 48000, 2, encode("pcm_f32le", interleave(0.9 * x48, 0.7 * x48)), x48.size),
    }

    async def one(encoding, rate, channels, data, seed):
        url = session_url(idle_worker.url, encoding=encoding, sample_rate=rate, channels=channels,
                          interim_results=False)
        frames = odd_frames(data, rate * channels * ENCODINGS[encoding], seed)
        assert b"".join(frames) == data
        return await stream(url, audio, chunks=frames, speed=None)

    results = await asyncio.gather(*(one(*f[:4], seed) for seed, f in enumerate(formats.values())))
    wers = {}
    for (name, (_, rate, _, _, samples)), result in zip(formats.items(), results):
        assert not result.of("error"), (name, result.of("error"))
        assert result.close_code == 1000, (name, result.close_code, result.close_reason)
        assert result.end is not None, name
        assert abs(result.end["total_duration"] - samples / rate) <= 0.05, (name, result.end["total_duration"])
        wers[name] = word_errors(reference, result.end["transcript"]).wer
    print("\nWER by wire format: " + ", ".join(f"{k} {v:.3f}" for k, v in wers.items()))
    base = wers["s16 16k mono"]
    assert base <= 0.3, wers
    assert wers["mulaw 8k mono"] <= base + 0.10, wers
    assert wers["f32 48k stereo"] <= base + 0.05, wers
