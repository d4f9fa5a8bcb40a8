"""Cost of the VAD stage on real speech: one stream alone, and N streams batched together.

Usage: .venv/bin/python bench/vad_cost.py [WAV] [--streams 32]
Feeds the file in 100 ms frames. "alone" runs host.vad.VadStage per stream (windowing, Silero,
endpointing); "batched" runs N streams' windows through VadBatcher's batched Silero call, as a
worker does when N sessions send audio at once. Prints microseconds per 512-sample (32 ms) window
and the share of one core that N real-time sessions cost.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from engine_host_vad_silero import build
from host.client import read_wav
from host.contracts import LoadContext
from host.endpointing import EndpointingOptions
from host.vad import VadStage

WINDOWS_PER_S = 16000 / 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("wav", nargs="?", default="../shared/speech/wav/jfk.wav")
    ap.add_argument("--streams", type=int, default=32)
    args = ap.parse_args()
    audio = read_wav(args.wav)
    samples = np.tile(np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768, 3)
    frames = [samples[i:i + 1600] for i in range(0, len(samples), 1600)]
    cache: dict = {}
    ctx = LoadContext(shared=lambda k, f: cache.setdefault(k, f()), engine_id="bench")

    for backend in ("onnx", "jit"):
        model = build({"backend": backend, "model_file": None}, ctx)
        stage = VadStage(model, EndpointingOptions())
        stage.feed(frames[0])
        t0 = time.perf_counter()
        for frame in frames[1:]:
            stage.feed(frame)
        per = (time.perf_counter() - t0) / stage.windows
        print(f"{backend:5s} alone:   {per * 1e6:6.0f} us/window; {args.streams} sessions "
              f"{per * WINDOWS_PER_S * args.streams * 100:5.1f} % of one core")

    model = build({"backend": "onnx", "model_file": None}, ctx)
    stages = [VadStage(model, EndpointingOptions()) for _ in range(args.streams)]
    t0 = time.perf_counter()
    windows = 0
    for frame in frames:
        per_stream = [st.take_windows(frame) for st in stages]
        for k in range(len(per_stream[0])):
            probs = model.batch_probabilities([st.stream for st in stages], np.stack([w[k] for w in per_stream]))
            windows += len(probs)
        for st, w in zip(stages, per_stream):
            st.endpoint(np.full(len(w), 0.1, dtype=np.float32))
    per = (time.perf_counter() - t0) / windows
    print(f"onnx  batched ({args.streams}): {per * 1e6:4.0f} us/window; {args.streams} sessions "
          f"{per * WINDOWS_PER_S * args.streams * 100:5.1f} % of one core")


if __name__ == "__main__":
    main()
