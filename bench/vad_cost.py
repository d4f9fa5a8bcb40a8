"""Cost of the VAD stage on real speech: one stream alone, and N streams batched together.

Usage: .venv/bin/python bench/vad_cost.py [WAV] [--streams 32] [--frame 0.05]
Feeds the file in --frame second frames (the bench's client sends 50 ms). "alone" runs
host.vad.VadStage per stream (windowing, Silero, endpointing) for each backend; "batched" gives
one frame of each of N streams to VadBatcher's own call at once, as a loaded worker does when N
sessions' audio waits together (``run_batch`` for the numpy backend, one ``batch_probabilities``
call per window position for onnx). Prints microseconds per 512-sample (32 ms) window and the
share of one core that N real-time sessions would cost. Warm caches, nothing else running: under a real
load the worker's own figure (``engine-host bench``, column VAD CPU %) is the one that counts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import host  # noqa: F401 - sets numpy's BLAS to one thread, as in a worker
from engine_host_vad_silero import build
from host.client import read_wav
from host.contracts import LoadContext
from host.endpointing import EndpointingOptions
from host.vad import VadBatcher, VadStage

WINDOWS_PER_S = 16000 / 512


def share(per_window_s: float, streams: int) -> str:
    return f"{per_window_s * 1e6:6.0f} us/window; {streams} sessions {per_window_s * WINDOWS_PER_S * streams * 100:5.1f} % of one core"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("wav", nargs="?", default="../shared/speech/wav/jfk.wav")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--frame", type=float, default=0.05, help="seconds of audio per request")
    args = ap.parse_args()
    audio = read_wav(args.wav)
    samples = np.tile(np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768, 3)
    step = int(16000 * args.frame)
    frames = [samples[i:i + step] for i in range(0, len(samples), step)]
    cache: dict = {}
    ctx = LoadContext(shared=lambda k, f: cache.setdefault(k, f()), engine_id="bench")

    for backend in ("numpy", "onnx", "jit"):
        model = build({"backend": backend, "model_file": None}, ctx)
        stage = VadStage(model, EndpointingOptions())
        stage.feed(frames[0])
        t0 = time.perf_counter()
        for frame in frames[1:]:
            stage.feed(frame)
        print(f"{backend:5s} alone:        {share((time.perf_counter() - t0) / stage.windows, args.streams)}")

    for backend in ("numpy", "onnx"):
        model = build({"backend": backend, "model_file": None}, ctx)
        batcher = VadBatcher(model, executor=None)  # its call itself, on this thread
        stages = [VadStage(model, EndpointingOptions()) for _ in range(args.streams)]
        t0 = time.perf_counter()
        for frame in frames:
            per_stream = [st.take_windows(frame) for st in stages]
            batcher._run([(st.stream, w, None) for st, w in zip(stages, per_stream)])
            for st, w in zip(stages, per_stream):
                st.endpoint(np.full(len(w), 0.1, dtype=np.float32))
        print(f"{backend:5s} batched ({args.streams}): {share((time.perf_counter() - t0) / batcher.windows, args.streams)}")


if __name__ == "__main__":
    main()
