"""Where the speech of a clean clip begins and ends, from the clip's own energy: the bench's ground truth.

``engine-host bench`` measures latency from the *true* end (and onset) of each reference
utterance, not from what the server's VAD decided, so that the endpointing delay is part of the
figure. The truth comes from the clean clip alone (never from the system under test):

1. Cut the clip into 10 ms frames (160 samples at 16 kHz; stereo is averaged).
2. Each frame's energy in dB, counting only frequencies from 300 Hz up (Hann window, FFT of the
   frame, bins < 300 Hz dropped). Several LibriSpeech test-other readers have low-frequency rumble
   and thumps at 30-35 dB below their loudest vowel: in full-band energy those "silences" are as
   loud as soft speech, and a clip looked like speech from its first to its last sample.
3. The threshold is the loudest frame minus 38 dB (the "within 35-40 dB of the peak" rule),
   raised to 6 dB above the clip's noise floor (the 10th percentile of its frames) when the floor
   is that loud, but never above 25 dB under the peak (a clip with hardly any silence has a
   "floor" that is really quiet speech).
4. Speech is every run of at least 5 consecutive frames (50 ms) at or above the threshold: a
   click or a short noise burst does not count. The onset is the start of the first run, the end
   the end of the last run, in seconds from the clip's first sample (10 ms resolution).

Checked against Silero VAD on the 48 clips of ../shared/speech (its first and last 32 ms window at
probability 0.5, the clip after 1.5 s of silence; ``tests/test_bench.py``): the end lies 0.0-0.21 s
(median 0.09 s) before Silero's, whose probability hangs on after the last phoneme (0.02 s after
it on two clips). The onset lies within 0.05 s of Silero's, except where a reader audibly breathes
in just before speaking (four 1688-142285 clips, 533-1066-0003, librivox-sas01-0870: 0.17-0.38 s
early; a breath is as loud as soft speech) and on mfa-cold_corpus, whose background has bursts
30 dB under the speech (0.75 s early).
"""

from __future__ import annotations

import numpy as np

from host.client import Audio

FRAME_S = 0.01
HIGHPASS_HZ = 300.0
PEAK_DROP_DB = 38.0
FLOOR_MARGIN_DB = 6.0
FLOOR_PERCENTILE = 10.0
MAX_THRESHOLD_DB = 25.0  # the threshold stays at least this far under the peak
MIN_RUN_FRAMES = 5


def frame_energies_db(audio: Audio) -> np.ndarray:
    """Energy (dB, arbitrary reference) above ``HIGHPASS_HZ`` of each whole 10 ms frame of ``audio``."""
    x = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float64)
    if audio.channels > 1:
        x = x[: x.size - x.size % audio.channels].reshape(-1, audio.channels).mean(axis=1)
    size = max(1, round(audio.sample_rate * FRAME_S))
    n = x.size // size
    if n == 0:
        return np.zeros(0)
    frames = x[: n * size].reshape(n, size) * np.hanning(size)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    keep = np.fft.rfftfreq(size, 1.0 / audio.sample_rate) >= HIGHPASS_HZ
    return 10.0 * np.log10(power[:, keep].sum(axis=1) + 1e-10)


def speech_bounds(audio: Audio) -> tuple[float, float] | None:
    """(onset, end) of the speech in ``audio``, seconds from its start, by the rule in the module
    docstring; None when no 30 ms of it stands out (silence, or a clip shorter than 30 ms)."""
    db = frame_energies_db(audio)
    if db.size < MIN_RUN_FRAMES:
        return None
    peak = float(db.max())
    floor = float(np.percentile(db, FLOOR_PERCENTILE))
    threshold = min(max(peak - PEAK_DROP_DB, floor + FLOOR_MARGIN_DB), peak - MAX_THRESHOLD_DB)
    above = (db >= threshold).astype(np.int64)
    # runs[i]: frames i .. i + MIN_RUN_FRAMES - 1 are all above the threshold
    runs = np.flatnonzero(np.convolve(above, np.ones(MIN_RUN_FRAMES, dtype=np.int64), "valid") == MIN_RUN_FRAMES)
    if runs.size == 0 or peak - floor < FLOOR_MARGIN_DB:
        return None  # nothing stands out of the floor: silence or steady noise
    frame = round(audio.sample_rate * FRAME_S) / audio.sample_rate
    return round(float(runs[0]) * frame, 3), round(float(runs[-1] + MIN_RUN_FRAMES) * frame, 3)
