"""Smart Turn's input features: an 8 s Whisper log-mel spectrogram, in numpy.

The model was trained on what ``transformers.WhisperFeatureExtractor(chunk_length=8)`` makes of
8 s of audio with ``do_normalize=True``. Written here from the definitions, step by step:

1. the last 8 s (128000 samples) of the turn, left-padded with zeros when shorter, so that the
   end of the turn, which the model judges, is always at the same place;
2. zero mean and unit variance over all 128000 samples: ``(x - mean) / sqrt(var + 1e-7)``;
3. the power spectrum ``|STFT|^2``: 400-sample periodic Hann window, hop 160, the signal centred
   (200 samples reflected at each end), which gives 801 frames of 201 bins (0-8000 Hz);
4. 80 triangular mel filters, Slaney's mel scale (linear to 1 kHz, logarithmic above) and
   Slaney's area normalization (each filter scaled by 2 / its width in Hz), 0-8000 Hz;
5. ``log10(max(mel, 1e-10))``, the last frame dropped: 800 frames of 10 ms;
6. the dynamic range clipped to 8 decades below the item's maximum (``max(x, x.max() - 8)``);
7. ``(x + 4) / 4``.

The spectrum is computed in float64 as the reference's numpy path does; the result is float32,
shape ``(80, 800)`` per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SAMPLE_RATE = 16000
SECONDS = 8
N_SAMPLES = SECONDS * SAMPLE_RATE  # 128000
N_FFT = 400
HOP = 160
N_MELS = 80
N_FRAMES = N_SAMPLES // HOP  # 800
F_MAX = SAMPLE_RATE / 2

# Slaney's mel scale (Auditory Toolbox): 3 mels per 200 Hz up to 1 kHz, then logarithmic with
# 27 mels per factor 6.4 in frequency.
_LINEAR_HZ_PER_MEL = 200.0 / 3
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _LINEAR_HZ_PER_MEL  # 15
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel of a frequency in Hz."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _LINEAR_HZ_PER_MEL
    logarithmic = _BREAK_MEL + np.log(np.maximum(hz, _BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return np.where(hz < _BREAK_HZ, linear, logarithmic)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Frequency in Hz of a Slaney mel value (the inverse of :func:`hz_to_mel`)."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _LINEAR_HZ_PER_MEL
    logarithmic = _BREAK_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _BREAK_MEL) - _BREAK_MEL))
    return np.where(mel < _BREAK_MEL, linear, logarithmic)


@cache
def mel_filters() -> np.ndarray:
    """The ``(80, 201)`` float64 filterbank over the rfft bins at ``linspace(0, 8000, 201)``.

    Filter ``i`` rises linearly from edge ``i`` to a peak at edge ``i + 1`` and falls to zero at
    edge ``i + 2``; the 82 edges are equally spaced in mel between 0 Hz and 8000 Hz. Each filter is
    scaled by ``2 / (edge[i + 2] - edge[i])`` so that its area is the same for all (Slaney)."""
    bins = np.linspace(0.0, F_MAX, N_FFT // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(F_MAX), N_MELS + 2))
    low, peak, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - low) / (peak - low)
    falling = (high - bins[None, :]) / (high - peak)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    filters = triangles * (2.0 / (high - low))
    filters.setflags(write=False)
    return filters


@cache
def hann_window() -> np.ndarray:
    """The periodic Hann window of ``N_FFT`` samples: ``0.5 - 0.5 cos(2 pi n / N_FFT)``."""
    n = np.arange(N_FFT, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    window.setflags(write=False)
    return window


def fit(audio: np.ndarray) -> np.ndarray:
    """Exactly 8 s of float32 audio: the last 128000 samples, or the audio after zeros."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if len(audio) >= N_SAMPLES:
        return audio[-N_SAMPLES:]
    out = np.zeros(N_SAMPLES, dtype=np.float32)
    if len(audio):
        out[-len(audio):] = audio
    return out


def normalize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance along the last axis (float64): ``(x - mean) / sqrt(var + 1e-7)``."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-7)


CHUNK = 100
"""Frames per STFT step in :func:`log_mel`: small temporaries (~0.3 MB) that the allocator reuses.
All 800 frames at once make ~2.5 MB ones, which glibc maps and unmaps on every call: 1,800 page
faults and twice the time (6.5 ms against 3.2 ms a turn on the development machine)."""


def log_mel(x: np.ndarray) -> np.ndarray:
    """Steps 3-7 for a ``(batch, 128000)`` array of normalized audio: ``(batch, 80, 800)`` float32."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != N_SAMPLES:
        raise ValueError(f"expected (batch, {N_SAMPLES}) audio, got shape {x.shape}")
    padded = np.pad(x, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    # The centred signal holds 801 frames; the last is dropped, so only the first 800 are computed.
    frames = sliding_window_view(padded, N_FFT, axis=-1)[:, ::HOP][:, :N_FRAMES]  # (batch, 800, 400), a view
    window, filters = hann_window(), mel_filters().T
    log_spec = np.empty((len(x), N_FRAMES, N_MELS))
    for item in range(len(x)):
        for start in range(0, N_FRAMES, CHUNK):
            spectrum = np.fft.rfft(frames[item, start:start + CHUNK] * window, axis=-1)  # (CHUNK, 201)
            power = np.square(spectrum.real)
            power += np.square(spectrum.imag)
            np.matmul(power, filters, out=log_spec[item, start:start + CHUNK])
    np.maximum(log_spec, 1e-10, out=log_spec)
    np.log10(log_spec, out=log_spec)
    peak = log_spec.max(axis=(1, 2), keepdims=True)  # each item's own maximum
    np.maximum(log_spec, peak - 8.0, out=log_spec)
    log_spec += 4.0
    log_spec /= 4.0
    return np.ascontiguousarray(log_spec.transpose(0, 2, 1), dtype=np.float32)


def features(audios: Sequence[np.ndarray]) -> np.ndarray:
    """The model's ``input_features`` for several turns: ``(len(audios), 80, 800)`` float32."""
    if not len(audios):
        return np.zeros((0, N_MELS, N_FRAMES), dtype=np.float32)
    return log_mel(normalize(np.stack([fit(a) for a in audios])))
