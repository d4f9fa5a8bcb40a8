"""VAD stage: cuts a session's audio into windows for a VAD plugin and endpoints the result."""

from __future__ import annotations

import numpy as np

from host.contracts import VadModel, VadStream
from host.endpointing import Endpointer, EndpointingOptions, Event

DEFAULT_WINDOW = 512


class AlwaysSpeech:
    """Stands in for a VAD when a session sets ``enable_vad=false``: the client cuts utterances
    with ``flush`` and only ``max_utterance_s`` still applies."""

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        return np.ones(len(windows), dtype=np.float32)


class VadStage:
    """Per-session VAD: feed samples, get speech events with session sample positions.

    Not thread-safe; a session calls it from one task at a time (possibly in a worker thread).
    """

    def __init__(self, model: VadModel | None, options: EndpointingOptions):
        self.window = model.window_samples if model is not None else DEFAULT_WINDOW
        self._stream: VadStream = model.open_stream() if model is not None else AlwaysSpeech()
        self.endpointer = Endpointer(options, self.window)
        self._rest = np.zeros(0, dtype=np.float32)
        self.windows = 0

    def feed(self, samples: np.ndarray) -> list[Event]:
        if self._rest.size:
            samples = np.concatenate([self._rest, samples])
        n = samples.size // self.window
        self._rest = samples[n * self.window:]
        if n == 0:
            return []
        probs = self._stream.probabilities(samples[: n * self.window].reshape(n, self.window))
        self.windows += n
        events: list[Event] = []
        for p in probs:
            events.extend(self.endpointer.push(p))
        return events

    def flush(self) -> list[Event]:
        return self.endpointer.flush(upto=self.position + self._rest.size)

    def clear(self) -> list[Event]:
        return self.endpointer.clear()

    @property
    def position(self) -> int:
        """Samples endpointed so far (the last partial window is not yet counted)."""
        return self.endpointer.position
