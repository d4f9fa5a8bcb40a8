"""Cost of the Smart Turn v3.2 turn detector (plugin ``turn_smart``) on real speech, per batch size.

Usage: .venv/bin/python bench/turn_cost.py [--sizes 1 2 4 8 16] [--threads 1] [--rounds 3]

Each turn is a clip of ../shared/speech (the model hears its last 8 s). For each batch size B it
times ROUNDS rounds through all clips in batches of B (the best round counts):

- features: the 80x800 log-mel of B turns (``features.features``, numpy, one thread);
- model: one onnxruntime run of the int8 model on the B ready feature sets (``threads`` intra-op);
- total: ``probabilities`` (both), what the host's batcher pays when B sessions ask at once.

Printed per call and per turn, in ms, with warm caches.

Measured on 2026-12-02 on the 2-core development machine (onnxruntime 1.32, numpy 2.4, threads=1,
best of 3 rounds over the 48 clips; another engineer's tests ran at the same time, load ~1-2):

    ms per call (wall) and per turn (wall, and CPU of the whole process)
                  features                   model            total (probabilities)
    batch     call    turn     cpu     call    turn     cpu     call    turn     cpu
        1      3.0     3.0     2.9     55.7    55.7    53.8     63.2    63.2    61.6
        2      5.8     2.9     2.9    109.3    54.6    52.7    109.6    54.8    54.3
        4     11.3     2.8     2.8    221.2    55.3    54.5    198.2    49.6    48.6
        8     24.1     3.0     3.0    422.1    52.8    51.9    424.5    53.1    52.3
       16     42.3     2.6     2.6    919.9    57.5    56.3    987.2    61.7    59.8

The model is compute-bound on one CPU thread: ~50-57 ms a turn at every batch size, so a batch
saves onnxruntime calls (and the host's queueing), not CPU. Features are ~3 ms a turn (5 % of
the total). With ``--threads 2`` one turn's model run took 34 ms wall for 63 ms of CPU (under the
same load).
"""

from __future__ import annotations

import os

# numpy's BLAS on one thread, as host/__init__.py sets it in a worker (the mel filterbank is a
# matrix product); numpy reads it when it loads, so before any import that loads numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from engine_host_turn_smart import build
from engine_host_turn_smart import features as F
from host.client import read_wav
from host.contracts import LoadContext

SPEECH = Path("../shared/speech")


def load_turns() -> list[np.ndarray]:
    with open(SPEECH / "manifest.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [np.frombuffer(read_wav(SPEECH / r["path"]).pcm, "<i2").astype(np.float32) / 32768 for r in rows]


def batches(items: list, size: int) -> list[list]:
    """All items in batches of ``size``, the last one completed from the start so every batch is full."""
    out = []
    for start in range(0, len(items), size):
        batch = items[start:start + size]
        out.append(batch + items[:size - len(batch)])
    return out


def timed(fn, groups: list, rounds: int) -> tuple[float, float]:
    """Seconds per call of ``fn`` over ``groups``: wall time and process CPU time, each the best of
    ``rounds`` rounds (the least disturbed by whatever else runs on the machine)."""
    fn(groups[0])  # warm-up
    wall, cpu = [], []
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        for g in groups:
            fn(g)
        wall.append((time.perf_counter() - w0) / len(groups))
        cpu.append((time.process_time() - c0) / len(groups))
    return min(wall), min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    turns = load_turns()
    detector = build({"model": "model:smart-turn-v3.2", "threads": args.threads, "max_batch": max(args.sizes)},
                     LoadContext(shared=lambda key, loader: loader(), engine_id="bench"))
    print(f"{len(turns)} turns from {SPEECH}, threads={args.threads}, rounds={args.rounds}, model {detector.path.name}")
    print("ms per call (wall) and per turn (wall, and CPU of the whole process)")
    print(f"{'':5s}  {'features':^23s}  {'model':^23s}  {'total (probabilities)':^23s}")
    print(f"{'batch':>5s}" + "  {:>7s} {:>7s} {:>7s}".format("call", "turn", "cpu") * 3)
    for size in args.sizes:
        audio_groups = batches(turns, size)
        feature_groups = [F.features(g) for g in audio_groups]
        cells = []
        for fn, groups in ((F.features, audio_groups), (detector.run_features, feature_groups),
                           (detector.probabilities, audio_groups)):
            wall, cpu = timed(fn, groups, args.rounds)
            cells.append(f"  {wall * 1e3:7.1f} {wall * 1e3 / size:7.1f} {cpu * 1e3 / size:7.1f}")
        print(f"{size:5d}" + "".join(cells))


if __name__ == "__main__":
    main()
