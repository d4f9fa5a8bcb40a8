"""Silero VAD for realtime-engine-host (plugin component ``silero``).

Uses the model files shipped in the ``silero-vad`` package. Three backends:

- ``numpy`` (default): the 16 kHz network computed with numpy from the ONNX file's weights
  (:mod:`.numpy_model`). It encodes all waiting windows of all streams at once and steps only
  the LSTM one window at a time, about 2x cheaper than onnxruntime under load.
- ``onnx``: the ONNX model with onnxruntime (one shared session; per-session recurrent state
  and 64-sample context), one window per stream per run.
- ``jit``: the package's TorchScript model (imports torch; the slowest).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from host.hookspecs import hookimpl

from .numpy_model import CONTEXT, SAMPLE_RATE, WINDOW, NumpySilero

OPTIONS_SCHEMA = {
    "type": "object",
    "properties": {
        "backend": {"enum": ["numpy", "onnx", "jit"], "default": "numpy",
                    "description": "numpy (default; the ONNX weights computed with numpy), onnx "
                                   "(onnxruntime) or jit (TorchScript, imports torch)."},
        "model_file": {"type": ["string", "null"], "default": None,
                       "description": "An ONNX/TorchScript file to use instead of the packaged model."},
    },
    "additionalProperties": False,
}


def packaged_model(name: str) -> Path:
    """Path of a model file inside the installed silero-vad package, found without importing it
    (its ``__init__`` imports torch, which costs a second of start-up)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the silero-vad package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the silero-vad package")
    return path


class OnnxSilero:
    """The ONNX model; one onnxruntime session shared by all streams (run() is thread-safe)."""

    window_samples = WINDOW

    def __init__(self, path: Path):
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        # One window is tiny: extra threads only add synchronization cost.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def open_stream(self) -> OnnxStream:
        return OnnxStream(self)

    def batch_probabilities(self, streams: list[OnnxStream], windows: np.ndarray) -> np.ndarray:
        """One window for each of several streams in one run: the model takes a batch dimension,
        and per-call overhead dominates a model this small."""
        x = np.concatenate([np.concatenate([s.context for s in streams]), windows], axis=1)
        state = np.concatenate([s.state for s in streams], axis=1)
        prob, state = self.session.run(None, {"input": x, "state": state, "sr": self._sr})
        for i, stream in enumerate(streams):
            stream.state = state[:, i:i + 1, :]
            stream.context = x[i:i + 1, -CONTEXT:]
        return prob[:, 0]


class OnnxStream:
    def __init__(self, model: OnnxSilero):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros((1, CONTEXT), dtype=np.float32)

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        out = np.empty(len(windows), dtype=np.float32)
        run = self.model.session.run
        for i, window in enumerate(windows):
            x = np.concatenate([self.context, window[None, :]], axis=1)
            prob, self.state = run(None, {"input": x, "state": self.state, "sr": self.model._sr})
            self.context = x[:, -CONTEXT:]
            out[i] = prob[0, 0]
        return out


class JitSilero:
    """The TorchScript model. Its state lives inside the module, so each stream gets its own copy."""

    window_samples = WINDOW

    def __init__(self, path: Path):
        import torch

        self._torch = torch
        self._path = path
        self._lock = threading.Lock()
        torch.set_num_threads(1)

    def open_stream(self) -> JitStream:
        with self._lock:
            return JitStream(self._torch, self._torch.jit.load(str(self._path)))


class JitStream:
    def __init__(self, torch, module):
        self.torch = torch
        self.module = module.eval()

    def reset(self) -> None:
        self.module.reset_states()

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return np.array(
                [self.module(self.torch.from_numpy(np.ascontiguousarray(w)), SAMPLE_RATE).item() for w in windows],
                dtype=np.float32,
            )


def build(options: dict, context) -> NumpySilero | OnnxSilero | JitSilero:
    backend = options.get("backend", "numpy")
    custom = options.get("model_file")
    if backend == "numpy":
        path = Path(custom) if custom else packaged_model("silero_vad.onnx")
        return context.shared(("silero", "numpy", str(path)), lambda: NumpySilero.load(path))
    if backend == "onnx":
        path = Path(custom) if custom else packaged_model("silero_vad.onnx")
        return context.shared(("silero", "onnx", str(path)), lambda: OnnxSilero(path))
    path = Path(custom) if custom else packaged_model("silero_vad.jit")
    return JitSilero(path)


@hookimpl
def register_vad(register):
    register("silero", build, OPTIONS_SCHEMA)
