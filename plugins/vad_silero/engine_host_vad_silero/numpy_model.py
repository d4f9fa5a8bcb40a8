"""Silero VAD v5 (16 kHz) computed with numpy, from the weights of the packaged ONNX model.

Why: onnxruntime runs one window per stream per call, because the recurrent state is an input,
and at batch 1 that call costs ~130-250 µs per 32 ms window on the 2-core development machine,
mostly nested ``If`` subgraphs and reading 1.2 MB of weights. Only the LSTM is recurrent, though:
the STFT and the four convolutions see nothing but the window and its 64-sample context, which
are known in advance. So :meth:`NumpySilero.run_batch` encodes every window of every waiting
stream in one set of matrix products, then steps the LSTM (one small product per step, all
streams together). The STFT is an FFT (the model's basis is a Hann-windowed DFT), so its
66k-weight product is not needed at all. Results match onnxruntime to ~1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 512
CONTEXT = 64
N_FFT = 256
HOP = 128
FRAMES = (WINDOW + CONTEXT + CONTEXT - N_FFT) // HOP + 1  # 4 STFT frames per window (reflect pad 64)
HIDDEN = 128


class UnsupportedModel(ValueError):
    """The ONNX file is not the Silero v5 architecture this backend computes."""


@dataclass(frozen=True)
class ConvLayer:
    """A Conv1d (kernel 3, padding 1) + ReLU over ``(n, t_in, c_in)`` activations.

    Stored as the cheaper of two equivalent forms: the three taps side by side, ``(c_in, 3*c_out)``,
    applied to every input frame and shifted into place; or, when only a frame or two are left, one
    dense ``(t_in*c_in, t_out*c_out)`` matrix with the zero padding and the stride folded in.
    """

    matrix: np.ndarray
    bias: np.ndarray
    stride: int
    t_out: int
    dense: bool

    @classmethod
    def build(cls, weight: np.ndarray, bias: np.ndarray, stride: int, t_in: int) -> ConvLayer:
        c_out, c_in, k = weight.shape
        if k != 3:
            raise UnsupportedModel(f"expected kernel 3 convolutions, got {k}")
        t_out = (t_in + 2 - k) // stride + 1
        if t_in * c_in * t_out * c_out <= k * c_in * c_out:
            dense = np.zeros((t_in, c_in, t_out, c_out), np.float32)
            for to in range(t_out):
                for j in range(k):
                    ti = to * stride + j - 1
                    if 0 <= ti < t_in:
                        dense[ti, :, to, :] = weight[:, :, j].T
            return cls(dense.reshape(t_in * c_in, t_out * c_out), np.tile(bias, t_out).astype(np.float32),
                       stride, t_out, True)
        taps = np.ascontiguousarray(weight.transpose(1, 2, 0).reshape(c_in, k * c_out), dtype=np.float32)
        return cls(taps, bias.astype(np.float32), stride, t_out, False)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        n, t, c = h.shape
        if self.dense:
            out = h.reshape(n, t * c) @ self.matrix
            out += self.bias
            np.maximum(out, 0, out=out)
            return out.reshape(n, self.t_out, -1)
        s, t_out = self.stride, self.t_out
        y = (h.reshape(n * t, c) @ self.matrix).reshape(n, t, 3, -1)
        # Output frame o sees input frames o*s-1, o*s and o*s+1 through taps 0, 1 and 2.
        out = y[:, 0:(t_out - 1) * s + 1:s, 1] + self.bias
        out[:, 1:] += y[:, s - 1:(t_out - 1) * s:s, 0]
        last = (t - 2) // s  # the last output frame whose o*s+1 is inside the input
        out[:, :last + 1] += y[:, 1:last * s + 2:s, 2]
        np.maximum(out, 0, out=out)
        return out


@dataclass(frozen=True)
class SileroWeights:
    """The 16 kHz half of a Silero v5 model, arranged for :class:`NumpySilero`."""

    window: np.ndarray   # (256,) the STFT's Hann window
    convs: tuple[ConvLayer, ...]
    w_ih: np.ndarray     # (128, 512) LSTM input weights, see _lstm_columns
    w_hh: np.ndarray     # (128, 512)
    b: np.ndarray        # (512,) both LSTM biases
    w_out: np.ndarray    # (128,) the output 1x1 convolution
    b_out: np.float32

    @classmethod
    def from_onnx(cls, path: Path) -> SileroWeights:
        """Read the weights of the 16 kHz branch of a Silero v5 ONNX file (needs the ``onnx`` package)."""
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        branch = _branch_for_16k(graph, path.name)
        consts = {}
        for node in branch.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
                consts[node.output[0].split("__")[-1]] = numpy_helper.to_array(node.attribute[0].t)
        consts.update({i.name.split("__")[-1]: numpy_helper.to_array(i) for i in branch.initializer})

        def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
            if name not in consts:
                raise UnsupportedModel(f"{path.name} has no '{name}': not a Silero v5 model")
            value = np.asarray(consts[name], dtype=np.float32)
            if shape is not None and value.shape != shape:
                raise UnsupportedModel(f"{path.name}: '{name}' has shape {value.shape}, expected {shape}")
            return value

        basis = get("stft.forward_basis_buffer", (2 * (N_FFT // 2 + 1), 1, N_FFT))[:, 0, :]
        window = basis[0].copy()  # the zero-frequency row is the window itself
        n, k = np.arange(N_FFT), np.arange(N_FFT // 2 + 1)[:, None]
        dft = np.concatenate([window * np.cos(2 * np.pi * k * n / N_FFT), -window * np.sin(2 * np.pi * k * n / N_FFT)])
        if np.abs(dft - basis).max() > 1e-5:
            raise UnsupportedModel(f"{path.name}: the STFT basis is not a windowed DFT")

        convs, t = [], FRAMES
        for i, stride in enumerate((1, 2, 2, 1)):
            layer = ConvLayer.build(get(f"encoder.{i}.reparam_conv.weight"), get(f"encoder.{i}.reparam_conv.bias"),
                                    stride, t)
            convs.append(layer)
            t = layer.t_out
        if t != 1 or convs[-1].matrix.shape[1] != HIDDEN:
            raise UnsupportedModel(f"{path.name}: the encoder does not end in one {HIDDEN}-wide frame")
        return cls(
            window=window,
            convs=tuple(convs),
            w_ih=_lstm_columns(get("decoder.rnn.weight_ih", (4 * HIDDEN, HIDDEN)).T),
            w_hh=_lstm_columns(get("decoder.rnn.weight_hh", (4 * HIDDEN, HIDDEN)).T),
            b=_lstm_columns(get("decoder.rnn.bias_ih", (4 * HIDDEN,)) + get("decoder.rnn.bias_hh", (4 * HIDDEN,))),
            w_out=get("decoder.decoder.2.weight", (1, HIDDEN, 1))[0, :, 0].copy(),
            b_out=np.float32(get("decoder.decoder.2.bias", (1,))[0]),
        )


def _lstm_columns(m: np.ndarray) -> np.ndarray:
    """PyTorch's gate columns (i, f, g, o) as (i/2, f/2, o/2, g): one tanh over all of them then
    gives tanh(g) and, for the three sigmoid gates, tanh(x/2) = 2 sigmoid(x) - 1."""
    i, f, g, o = np.split(np.asarray(m, dtype=np.float32), 4, axis=-1)
    return np.ascontiguousarray(np.concatenate([i / 2, f / 2, o / 2, g], axis=-1))


def _branch_for_16k(graph, name: str):
    """The subgraph the model runs for ``sr == 16000`` (its top-level ``If`` on the sample rate)."""
    from onnx import numpy_helper

    nodes = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "If":
            continue
        cond = nodes.get(node.input[0])
        if cond is None or cond.op_type != "Equal" or "sr" not in cond.input:
            continue
        other = nodes.get(next(i for i in cond.input if i != "sr"))
        if other is None or other.op_type != "Constant":
            continue
        rate = int(numpy_helper.to_array(other.attribute[0].t))
        branches = {a.name: a.g for a in node.attribute}
        return branches["then_branch"] if rate == SAMPLE_RATE else branches["else_branch"]
    raise UnsupportedModel(f"{name} has no If on the sample rate at the top of its graph: not a Silero v5 model")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.negative(x)
    np.exp(out, out=out)
    out += 1
    return np.reciprocal(out, out=out)


class NumpySilero:
    """The model: shared, stateless weights; each :class:`NumpyStream` holds its own state."""

    window_samples = WINDOW

    def __init__(self, weights: SileroWeights):
        self.weights = weights

    @classmethod
    def load(cls, path: Path) -> NumpySilero:
        return cls(SileroWeights.from_onnx(path))

    def open_stream(self) -> NumpyStream:
        return NumpyStream(self)

    def run_batch(self, streams: list[NumpyStream], windows: list[np.ndarray]) -> list[np.ndarray]:
        """Advance each stream through its own windows (``(n_i, 512)`` each, n_i ≥ 0) and return
        their probabilities. A stream may appear only once per call."""
        counts = [len(w) for w in windows]
        total = sum(counts)
        if not total:
            return [np.zeros(0, np.float32) for _ in windows]
        # Row j of a stream is its window j preceded by the last 64 samples before it.
        x = np.empty((total, CONTEXT + WINDOW), np.float32)
        row = 0
        for stream, w, n in zip(streams, windows, counts):
            if n:
                x[row:row + n, CONTEXT:] = w
                x[row, :CONTEXT] = stream.context
                x[row + 1:row + n, :CONTEXT] = w[:-1, -CONTEXT:]
                stream.context = x[row + n - 1, -CONTEXT:].copy()
                row += n
        hidden = self._recur(streams, counts, self._encode(x))
        weights = self.weights
        probs = _sigmoid(np.maximum(hidden, 0) @ weights.w_out + weights.b_out)
        out, row = [], 0
        for n in counts:
            out.append(probs[row:row + n])
            row += n
        return out

    def batch_probabilities(self, streams: list[NumpyStream], windows: np.ndarray) -> np.ndarray:
        """One window for each stream (the host's older batching contract)."""
        return np.concatenate(self.run_batch(streams, [row[None, :] for row in windows]))

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """``(n, 576)`` window inputs -> ``(n, 512)`` LSTM input gates (bias included)."""
        w = self.weights
        n = len(x)
        padded = np.empty((n, WINDOW + 2 * CONTEXT), np.float32)
        padded[:, :-CONTEXT] = x
        padded[:, -CONTEXT:] = x[:, -2:-CONTEXT - 2:-1]  # reflect padding
        hops = padded.reshape(n, FRAMES + 1, HOP)
        frames = np.concatenate([hops[:, :-1], hops[:, 1:]], axis=2)  # (n, 4, 256): two hops each
        h = np.abs(np.fft.rfft(frames * w.window, axis=2)).astype(np.float32, copy=False)
        for layer in w.convs:
            h = layer(h)
        gates = h.reshape(n, HIDDEN) @ w.w_ih
        gates += w.b
        return gates

    def _recur(self, streams: list[NumpyStream], counts: list[int], gates: np.ndarray) -> np.ndarray:
        """Step the LSTM through each stream's windows, all streams together; the hidden state
        after every window, ``(n, 128)`` in the rows of ``gates``."""
        w_hh = self.weights.w_hh
        if len(streams) == 1:
            order, perm = [0], None
        else:
            # Longest first, and the rows regrouped step by step, so that the streams still
            # running at step k are a prefix and each step's rows one contiguous block.
            order = sorted(range(len(streams)), key=counts.__getitem__, reverse=True)
            starts = list(accumulate([0] + counts[:-1]))
            perm = [starts[i] + k for k in range(counts[order[0]]) for i in order if counts[i] > k]
            gates = gates[perm]
        h = np.stack([streams[i].h for i in order])
        c = np.stack([streams[i].c for i in order])
        hidden = np.empty((len(gates), HIDDEN), np.float32)
        live, row = len(order), 0
        for k in range(counts[order[0]]):
            while counts[order[live - 1]] <= k:
                live -= 1
            g = gates[row:row + live]
            g += h[:live] @ w_hh
            np.tanh(g, out=g)
            gate = g[:, :3 * HIDDEN]  # tanh(x/2) of i, f, o (weights pre-halved) -> sigmoid(x)
            gate *= 0.5
            gate += 0.5
            cell, out = c[:live], h[:live]
            cell *= g[:, HIDDEN:2 * HIDDEN]
            cell += g[:, :HIDDEN] * g[:, 3 * HIDDEN:]
            np.multiply(g[:, 2 * HIDDEN:3 * HIDDEN], np.tanh(cell), out=out)
            hidden[row:row + live] = out
            row += live
        for j, i in enumerate(order):
            streams[i].h, streams[i].c = h[j], c[j]
        if perm is None:
            return hidden
        by_stream = np.empty_like(hidden)
        by_stream[perm] = hidden
        return by_stream


class NumpyStream:
    """One session's recurrent state (h, c) and the 64 samples that precede its next window."""

    def __init__(self, model: NumpySilero):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.h = np.zeros(HIDDEN, np.float32)
        self.c = np.zeros(HIDDEN, np.float32)
        self.context = np.zeros(CONTEXT, np.float32)

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        return self.model.run_batch([self], [windows])[0]
