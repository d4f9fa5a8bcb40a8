"""The Smart Turn v3.2 ONNX model behind the host's ``TurnDetector`` contract."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import features

INPUT = "input_features"


class UnsupportedModel(ValueError):
    """The ONNX file does not take Smart Turn's ``input_features`` of shape (batch, 80, 800)."""


class SmartTurnDetector:
    """Smart Turn v3.2: the audio of the open turn → probability that the speaker has finished.

    One onnxruntime session, shared by every session of every engine that names the same file
    and thread count (``InferenceSession.run`` is thread-safe). The model takes the last 8 s of
    the turn as an 80×800 Whisper log-mel spectrogram (:mod:`.features`) and ends in a sigmoid.
    """

    max_audio_s = float(features.SECONDS)
    """The model hears the last 8 s; the host need not pass more."""

    def __init__(self, path: Path, *, threads: int = 1, max_batch: int = 16):
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.threads = threads
        self.session = onnxruntime.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT not in inputs:
            raise UnsupportedModel(f"{self.path.name} has no input {INPUT!r} (inputs: {sorted(inputs)}): not a Smart Turn model")
        shape = list(inputs[INPUT].shape)
        if len(shape) != 3 or shape[1:] != [features.N_MELS, features.N_FRAMES]:
            raise UnsupportedModel(f"{self.path.name}: {INPUT} has shape {shape}, expected "
                                   f"[batch, {features.N_MELS}, {features.N_FRAMES}]")
        # The batch dimension is symbolic ('s6') in v3.2's file: several turns run in one call.
        # A file with a fixed batch of 1 still works, one run per turn.
        self.dynamic_batch = not isinstance(shape[0], int)
        self.max_batch = max_batch if self.dynamic_batch else 1
        """The most turns :meth:`probabilities` puts in one onnxruntime run."""
        self._output = self.session.get_outputs()[0].name
        self._lock = threading.Lock()
        self.calls = 0
        """onnxruntime runs so far (for tests and benchmarks)."""

    def probability(self, audio: np.ndarray) -> float:
        """Probability (0-1) that the turn in float32 16 kHz mono ``audio`` is complete.

        ``audio`` is the turn from its start up to now, trailing silence included; only its last
        8 s are used, and shorter audio is left-padded with zeros (empty audio gives a float too).
        Blocking (~tens of ms on one CPU thread); call it off the event loop."""
        return self.probabilities([audio])[0]

    def probabilities(self, audios: Sequence[np.ndarray]) -> list[float]:
        """:meth:`probability` for several turns at once: one onnxruntime run per ``max_batch`` turns.

        The model's batch dimension is dynamic and its int8 quantization is static (fixed scales),
        so each turn's probability is the same as alone, whatever else is in the batch."""
        out: list[float] = []
        for start in range(0, len(audios), self.max_batch):
            x = features.features(audios[start:start + self.max_batch])
            out.extend(self._run(x))
        return out

    def run_features(self, x: np.ndarray) -> list[float]:
        """The model alone on ready ``(batch, 80, 800)`` features (for benchmarks)."""
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    def _run(self, x: np.ndarray) -> list[float]:
        if not self.dynamic_batch and len(x) > 1:
            return [p for i in range(len(x)) for p in self._run(x[i:i + 1])]
        (prob,) = self.session.run([self._output], {INPUT: x})
        with self._lock:
            self.calls += 1
        return [float(p) for p in np.asarray(prob, dtype=np.float64).reshape(len(x), -1)[:, 0]]

    def memory(self) -> dict[str, Any]:
        """What the model holds: its device and the size of its ONNX file."""
        return {"devices": ["cpu"], "bytes": self.path.stat().st_size, "model": self.path.name}
