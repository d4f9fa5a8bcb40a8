"""Offline check of where streaming loses accuracy: the VAD's cuts, and audio context for finals.

Usage: .venv/bin/python bench/segmentation.py [CONTEXT_S ...]

Builds the bench's stream (the 48 dev utterances, 1 s of silence between them), cuts it with the
engine's Silero VAD and endpointing exactly as a session does, and decodes every utterance with
the final settings (tiny.en int8, greedy, temperature fallback, word timestamps). It prints the
WER of the whole clips decoded one by one (the offline baseline), of the VAD's utterances as the
server decodes them, and, for each CONTEXT_S, of the utterances decoded with up to that many
seconds of the preceding audio in front when the previous utterance ended less than 1.5 s before
(the words that fall in the context are dropped by their timestamps).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from engine_host_asr_faster_whisper import FRAMES_PER_S, VARIANT_SCHEMA, _bucketed_model_class, resolve_model_path
from engine_host_vad_silero import build as build_vad
from host.bench import load_manifest
from host.contracts import SAMPLE_RATE, LoadContext
from host.endpointing import EndpointingOptions, SpeechEnd, SpeechStart
from host.vad import VadStage
from host.wer import WerCounts, word_errors

SPEECH = Path("../shared/speech")
ENGINE = Path("engines.d/whisper-streaming.yaml")
GAP_S = 1.0
CONTEXT_GAP_S = 1.5


def cut(stream: np.ndarray, options: dict) -> list[tuple[int, int]]:
    context = LoadContext(shared=lambda key, load: load(), engine_id="bench")
    model = build_vad({"backend": options.get("backend", "onnx")}, context)
    vad = VadStage(model, EndpointingOptions.from_options(options))
    spans, start = [], None
    events = []
    for i in range(0, stream.size, 800):
        events += vad.feed(stream[i:i + 800])
    events += vad.flush()
    for e in events:
        if isinstance(e, SpeechStart):
            start = e.sample
        elif isinstance(e, SpeechEnd) and start is not None:
            spans.append((start, e.sample))
            start = None
    return spans


def decode(model, audio: np.ndarray, keep_from_s: float = 0.0) -> str:
    segments, _ = model.transcribe(audio, language="en", beam_size=1, word_timestamps=True,
                                   condition_on_previous_text=False, no_speech_threshold=0.6,
                                   vad_filter=False)
    words = [w for s in segments for w in (s.words or [])]
    return "".join(w.word for w in words if (w.start + w.end) / 2 >= keep_from_s).strip()


def main() -> None:
    contexts = [float(a) for a in sys.argv[1:]]
    items = load_manifest(SPEECH / "manifest.tsv", None)
    clips = [np.frombuffer(it.audio.pcm, "<i2").astype(np.float32) / 32768 for it in items]
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    stream = np.concatenate([part for c in clips for part in (c, gap)])
    reference = " ".join(it.reference for it in items)
    engine = yaml.safe_load(ENGINE.read_text())
    vad_options = dict(engine["pipeline"]["vad"]["options"])
    for setting in filter(None, os.environ.get("ENDPOINTING", "").split(",")):
        key, _, value = setting.partition("=")
        vad_options[key] = float(value)
    spans = cut(stream, vad_options)
    fast = engine["pipeline"]["asr"]["options"]["models"]["fast"]
    model = _bucketed_model_class()(str(resolve_model_path(fast["path"])), device="cpu",
                                    compute_type=fast["compute_type"], cpu_threads=2)
    # The plugin's bucketing, with the variant's values or the plugin's defaults.
    defaults = {k: v["default"] for k, v in VARIANT_SCHEMA["properties"].items() if "default" in v}
    settings = {**defaults, **fast}
    bucket = settings["encoder_bucket_s"]
    model.bucket_frames = int(bucket * FRAMES_PER_S) if bucket else None
    model.margin_frames = int(settings["encoder_margin_s"] * FRAMES_PER_S)
    decode(model, np.zeros(SAMPLE_RATE, np.float32))
    print(f"{len(clips)} clips, {len(spans)} VAD utterances ({os.environ.get('ENDPOINTING') or 'engine defaults'})")
    if os.environ.get("SKIP_WHOLE"):
        contexts = []
    else:
        t0 = time.perf_counter()
        total = WerCounts(0, 0)
        for it, clip in zip(items, clips):
            total += word_errors(it.reference, decode(model, clip))
        print(f"{'whole clips':34s} WER {total.wer:.4f}  compute {time.perf_counter() - t0:.1f} s")

    for context in [0.0] + contexts:
        t0 = time.perf_counter()
        texts, prev_end = [], None
        for start, end in spans:
            lead = 0
            if context and prev_end is not None and (start - prev_end) / SAMPLE_RATE < CONTEXT_GAP_S:
                lead = min(int(context * SAMPLE_RATE), start)
            texts.append(decode(model, stream[start - lead:end], keep_from_s=lead / SAMPLE_RATE))
            prev_end = end
        wer = word_errors(reference, " ".join(texts))
        label = "VAD utterances" + (f", {context:g} s context" if context else "")
        print(f"{label:34s} WER {wer.wer:.4f}  compute {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
