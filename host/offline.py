"""The offline baseline of ``engine-host bench``: each utterance transcribed whole, without streaming.

The engine is loaded in the bench's own process the way a worker loads it (plugins, engines.d,
:class:`host.models.ModelManager`), and its ASR variant is called through the
:class:`host.contracts.AsrModel` contract, so any engine is its own reference: the WER the
streamed sessions lose against it is what streaming (VAD cuts, endpoints) costs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from host.contracts import SAMPLE_RATE, AsrModel
from host.engines import load_engines
from host.models import ComponentError, LoadedEngine, ModelManager
from host.plugins import load_plugins
from host.wer import WerCounts, field_errors, word_errors

if TYPE_CHECKING:
    from host.bench import Item


def transcribe_whole(model: AsrModel, audio: np.ndarray, max_s: float, language: str | None = None) -> str:
    """The transcript of ``audio`` in as few calls as the model takes: one call when the audio is
    at most ``max_s`` long, else consecutive ``max_s`` pieces cut without a VAD.

    ``max_s`` is the engine's ``max_utterance_s``: the host never gives a model a longer
    utterance, so a model may rely on that bound (Whisper's window is 30 s). ``language``: the
    language to transcribe in (None: the model decides)."""
    step = max(1, int(max_s * SAMPLE_RATE))
    texts = [model.transcribe(audio[i:i + step], language=language, word_timestamps=False, partial=False).text
             for i in range(0, len(audio), step)]
    return " ".join(t for t in texts if t)


def load_engine(engine_id: str, engines_dir: Path | None) -> LoadedEngine | str:
    """One engine of the local engines directory, loaded as a worker loads it (or why not)."""
    plugins = load_plugins()
    specs, _ = load_engines(engines_dir or Path(os.environ.get("ENGINES_DIR", "engines.d")), plugins)
    spec = next((s for s in specs if s.id == engine_id), None)
    if spec is None:
        return f"engine {engine_id!r} is not in the local engines directory"
    manager = ModelManager(plugins)
    try:
        asyncio.run(manager.load([spec]))
    except ComponentError as exc:
        return f"engine {engine_id!r} did not load: {exc}"
    return manager.engines[spec.id]


def settings(engine: LoadedEngine, variant: str) -> str:
    """The variant's options as its engine file writes them (the path left out), for the report."""
    written = engine.spec.raw["pipeline"]["asr"].get("options", {}).get("models", {}).get(variant, {})
    options = ", ".join(f"{k} {v}" for k, v in written.items() if k != "path")
    return (f"{engine.spec.pipeline['asr'].plugin} {variant}: {options}; whole utterances, "
            f"{engine.endpointing.max_utterance_s:g} s pieces beyond that, 1 at a time")


def offline_wer(items: Sequence[Item], engine_id: str, model: str | None, engines_dir: Path | None) -> dict:
    """WER and compute time of the engine's ASR variant on each utterance transcribed whole.

    Blocking (it loads and runs the model): call it outside the event loop."""
    engine = load_engine(engine_id, engines_dir)
    if isinstance(engine, str):
        return {"wer": None, "note": engine}
    variant = model or engine.spec.models[0]
    asr = engine.asr.variants.get(variant)
    if asr is None:
        return {"wer": None, "note": f"engine {engine_id!r} has no model variant {variant!r}"}
    total, project, spent = WerCounts(0, 0), WerCounts(0, 0), 0.0
    per_language: dict[str, WerCounts] = {}
    for it in items:
        x = np.frombuffer(it.audio.pcm, "<i2").astype(np.float32) / 32768
        t0 = time.perf_counter()
        # With the language given where the manifest says it: the reference streaming is held to.
        text = transcribe_whole(asr, x, engine.endpointing.max_utterance_s, it.language)
        spent += time.perf_counter() - t0
        errors = field_errors(it.reference, text, it.language)
        total += errors
        project += word_errors(it.reference, text)
        if it.language:
            per_language[it.language] = per_language.get(it.language, WerCounts(0, 0)) + errors
    out = {"wer": round(total.wer, 4), "wer_project": round(project.wer, 4), "compute_seconds": round(spent, 1),
           "settings": settings(engine, variant)}
    if per_language:
        out["languages"] = {code: {"wer": round(c.wer, 4), "words": c.words} for code, c in sorted(per_language.items())}
    return out
