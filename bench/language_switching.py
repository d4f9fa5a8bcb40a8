"""How often each language-switching rule picks the right language, per utterance, on the dev sets.

The utterances are the worker's own: every source is streamed through a real worker (Silero VAD,
Smart Turn endpointing; ``model=fast``, whose cuts do not depend on the language) and each
``vad.speech_start``/``vad.speech_end`` span is one utterance. Whisper base's ``detect_language`` is
then run on each span offline, once, and every rule of the grid replays the sources as sessions
(the previous utterance's decided language carried forward, as the host does):

- ``mixed-a``, ``mixed-b`` (../shared/speech-multi/mixed): code-switching streams, each utterance
  labelled by the clip its midpoint falls in;
- ``de``, ``es``, ``fr``, ``pt``: each language's 5 clips joined, one session;
- ``en``: the 48 English dev clips joined (../shared/speech), one session, where a rule that
  switches too easily sends short English utterances to another language.

    python bench/language_switching.py [--json]

Prints, per rule (switch probability / short-utterance threshold / short switch probability) and
candidate set, the share of utterances decided right, overall and for those under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host import languages  # noqa: E402
from host.bench import start_worker  # noqa: E402
from host.client import Audio, concat, read_wav, session_url, silence, stream  # noqa: E402
from host.offline import load_engine  # noqa: E402

SHARED = ROOT.parent / "shared"
CANDIDATES = ("en", "de", "es", "fr", "pt")


@dataclass
class Utterance:
    source: str
    start: float
    end: float
    language: str
    probabilities: dict[str, float]


def sources() -> dict[str, tuple[Audio, list[tuple[float, float, str]]]]:
    """Each source's audio and its labelled regions (start, end, language)."""
    out: dict[str, tuple[Audio, list[tuple[float, float, str]]]] = {}
    for name in ("mixed-a", "mixed-b"):
        with open(SHARED / "speech-multi" / "mixed" / f"{name}.segments.tsv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        out[name] = (read_wav(SHARED / "speech-multi" / "mixed" / f"{name}.wav"),
                     [(float(r["start_s"]), float(r["end_s"]), r["language"]) for r in rows])
    groups: dict[str, list[Path]] = {}
    for manifest, language in ((SHARED / "speech-multi" / "manifest.tsv", None), (SHARED / "speech" / "manifest.tsv", "en")):
        with open(manifest, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f, delimiter="\t"):
                groups.setdefault(language or r["language"], []).append(manifest.parent / r["path"])
    for language, paths in groups.items():
        parts, regions, at = [], [], 0.0
        for path in paths:
            audio = read_wav(path)
            parts += [audio, silence(1.0)]
            regions.append((at, at + audio.seconds, language))
            at += audio.seconds + 1.0
        out[language] = (concat(*parts), regions)
    return out


async def spans(url: str, audio: Audio) -> list[tuple[float, float]]:
    """The worker's utterances of ``audio`` (speech_start, speech_end)."""
    result = await stream(session_url(url, model="fast", interim_results=False), audio, speed=None)
    starts = [m["timestamp"] for m in result.of("vad.speech_start")]
    ends = [m["timestamp"] for m in result.of("vad.speech_end")]
    return list(zip(starts, ends))


def label(regions: list[tuple[float, float, str]], start: float, end: float) -> str | None:
    middle = (start + end) / 2
    return next((lang for s, e, lang in regions if s - 0.75 <= middle <= e + 0.75), None)


def measure() -> list[Utterance]:
    proc, url, _ = start_worker(None, 2)
    try:
        found = {name: (audio, regions, asyncio.run(spans(url, audio))) for name, (audio, regions) in sources().items()}
    finally:
        proc.terminate()
        proc.wait(30)
    engine = load_engine("whisper-streaming", None)
    if isinstance(engine, str):
        raise SystemExit(engine)
    model = engine.asr.variants["accurate"]
    out = []
    for name, (audio, regions, cuts) in found.items():
        samples = np.frombuffer(audio.pcm, "<i2").astype(np.float32) / 32768
        for start, end in cuts:
            language = label(regions, start, end)
            if language is None:
                continue
            probs = model.detect_language(samples[int(start * 16000):int(end * 16000)])  # type: ignore[attr-defined]
            out.append(Utterance(name, start, end, language, probs))
    return out


def replay(utterances: list[Utterance], rule: languages.SwitchRule, allowed: tuple[str, ...]) -> tuple[int, int, int, int]:
    """(right, all, right under 2 s, all under 2 s) with ``rule``, each source one session."""
    right = total = short_right = short = 0
    previous: dict[str, str | None] = {}
    for u in utterances:
        decision = languages.decide(u.probabilities, allowed, previous.get(u.source), u.end - u.start, rule)
        chosen = decision.language if decision else None
        previous[u.source] = chosen
        ok = chosen == u.language
        right, total = right + ok, total + 1
        if u.end - u.start < 2.0:
            short_right, short = short_right + ok, short + 1
    return right, total, short_right, short


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    utterances = measure()
    rules = [languages.SwitchRule(p, s, q) for p in (0.0, 0.5, 0.6, 0.7, 0.8) for s in (0.0, 1.0, 2.0, 3.0)
             for q in (0.7, 0.85, 0.95) if not (s == 0.0 and q != 0.7)]
    rows = []
    for allowed in ((), CANDIDATES):
        for rule in rules:
            right, total, short_right, short = replay(utterances, rule, allowed)
            rows.append({"candidates": ",".join(allowed) or "auto", "switch_probability": rule.switch_probability,
                         "short_s": rule.short_s, "short_switch_probability": rule.short_switch_probability,
                         "right": right, "utterances": total, "short_right": short_right, "short": short})
    if args.json:
        print(json.dumps({"utterances": len(utterances), "rules": rows}, indent=2))
        return
    by_source: dict[str, int] = {}
    for u in utterances:
        by_source[u.source] = by_source.get(u.source, 0) + 1
    print("utterances per source:", ", ".join(f"{k} {v}" for k, v in by_source.items()))
    print(f"{'candidates':>16} {'switch p':>8} {'short s':>7} {'short p':>7} {'right':>12} {'short right':>12}")
    for r in rows:
        print(f"{r['candidates']:>16} {r['switch_probability']:8.2f} {r['short_s']:7.1f} {r['short_switch_probability']:7.2f} "
              f"{r['right']:>5}/{r['utterances']:<6} {r['short_right']:>5}/{r['short']:<6}")


if __name__ == "__main__":
    main()
