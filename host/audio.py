"""Audio receiver: frame decoding, resampling to 16 kHz mono, and the session's audio buffer."""

from __future__ import annotations

import numpy as np
import soxr

from host.contracts import SAMPLE_RATE
from host.protocol import ENCODINGS

"""Supported encodings and their bytes per sample."""
MIN_RATE, MAX_RATE = 8000, 48000


class InvalidAudio(ValueError):
    """A frame that cannot be decoded (the frame is dropped; the session goes on)."""


def _mulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return (np.where(sign, -magnitude, magnitude) / 32768.0).astype(np.float32)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    sign = a & 0x80
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return (np.where(sign, magnitude, -magnitude) / 32768.0).astype(np.float32)


_TABLES = {"mulaw": _mulaw_table(), "alaw": _alaw_table()}


class AudioDecoder:
    """Turns raw frames into float32 16 kHz mono samples.

    Frames may split samples anywhere: the trailing partial sample (or partial
    multi-channel frame) is kept for the next call, so any split of a byte
    stream decodes exactly like the whole stream.
    """

    def __init__(self, encoding: str = "pcm_s16le", sample_rate: int = SAMPLE_RATE, channels: int = 1):
        if encoding not in ENCODINGS:
            raise ValueError(f"unsupported encoding {encoding!r}")
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise ValueError(f"sample_rate must be {MIN_RATE}-{MAX_RATE}")
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self._frame_bytes = ENCODINGS[encoding] * channels
        self._pending = b""
        self._resampler = (
            soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if sample_rate != SAMPLE_RATE
            else None
        )
        self.bytes_in = 0

    def decode(self, data: bytes) -> np.ndarray:
        """Decode one frame. Raises :class:`InvalidAudio` (and keeps no state from the frame) when it is bad."""
        buf = self._pending + data
        usable = len(buf) - len(buf) % self._frame_bytes
        samples = self._to_float(buf[:usable])
        # Only commit the state once the frame decoded cleanly.
        self._pending = buf[usable:]
        self.bytes_in += len(data)
        if self.channels == 2:
            samples = samples.reshape(-1, 2).mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=False)
        return np.ascontiguousarray(samples, dtype=np.float32)

    def finish(self) -> np.ndarray:
        """Drain the resampler at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True).astype(np.float32)

    def _to_float(self, raw: bytes) -> np.ndarray:
        if self.encoding == "pcm_s16le":
            return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        if self.encoding == "pcm_f32le":
            samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
            if not np.isfinite(samples).all():
                raise InvalidAudio("pcm_f32le frame contains NaN or infinite samples")
            if samples.size and float(np.abs(samples).max()) > 64.0:
                raise InvalidAudio("pcm_f32le samples must lie in [-1, 1]; is the encoding really pcm_f32le?")
            return np.clip(samples, -1.0, 1.0)
        return _TABLES[self.encoding][np.frombuffer(raw, dtype=np.uint8)]


class AudioBuffer:
    """The session's recent audio, addressed by absolute session sample index."""

    def __init__(self):
        self._chunks: list[np.ndarray] = []
        self.start = 0
        """Session index of the first sample held."""
        self.end = 0
        """Session index after the last sample held (= samples received)."""

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples)
            self.end += samples.size

    def slice(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)``; the part before :attr:`start` (already dropped) is not returned."""
        data = self._joined()
        lo = max(start, self.start) - self.start
        hi = max(min(end, self.end) - self.start, lo)
        return data[lo:hi].copy()

    def discard_before(self, sample: int) -> None:
        """Release audio before ``sample``: finalized audio is not kept."""
        if sample <= self.start:
            return
        data = self._joined()
        cut = min(sample, self.end) - self.start
        rest = data[cut:]
        self._chunks = [rest] if rest.size else []
        self.start += cut

    def _joined(self) -> np.ndarray:
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)]
        return self._chunks[0]

    @property
    def held(self) -> int:
        return self.end - self.start
