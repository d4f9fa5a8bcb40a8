"""Per-window cost of the VAD stage (Silero ONNX and TorchScript backends) on real speech.

Usage: .venv/bin/python bench/vad_cost.py [../shared/speech/wav/jfk.wav]
Feeds the file in 100 ms frames through host.vad.VadStage (windowing + endpointing included)
and prints microseconds per 32 ms window, i.e. per 512-sample chunk.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from engine_host_vad_silero import build
from host.client import read_wav
from host.contracts import LoadContext
from host.endpointing import EndpointingOptions
from host.vad import VadStage


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "../shared/speech/wav/jfk.wav"
    audio = read_wav(path)
    samples = np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768
    samples = np.tile(samples, 3)
    frames = [samples[i:i + 1600] for i in range(0, len(samples), 1600)]
    cache: dict = {}
    ctx = LoadContext(shared=lambda k, f: cache.setdefault(k, f()), engine_id="bench")
    for backend in ("onnx", "jit"):
        model = build({"backend": backend, "model_file": None}, ctx)
        stage = VadStage(model, EndpointingOptions())
        stage.feed(frames[0])  # warm up
        t0 = time.perf_counter()
        for frame in frames[1:]:
            stage.feed(frame)
        dt = time.perf_counter() - t0
        per = dt / stage.windows * 1e6
        print(f"{backend}: {per:.0f} us per 512-sample window, {dt / (len(samples) / 16000) * 100:.2f} % of one core "
              f"per real-time stream")


if __name__ == "__main__":
    main()
