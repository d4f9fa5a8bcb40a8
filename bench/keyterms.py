"""Keyterms on real speech: do names given as keyterms come out right, and which way works better?

Each clip below holds a proper noun Whisper gets wrong on its own. Every clip is transcribed whole,
offline, through the faster-whisper plugin's ``transcribe`` with the session options a client would
set: none, ``keyterms`` (faster-whisper's ``hotwords``) or ``prompt`` (its ``initial_prompt``) naming
the clip's names, on ``fast`` (tiny.en, English clips only) and ``accurate`` (Whisper base, with the
clip's language given). It prints, per variant and way, how many of the names came out and the WER
(jiwer, Whisper's normalisers). Then the whole English dev set on ``fast`` without keyterms and
with an unrelated list, to see that keyterms a clip does not contain cost nothing.

    python bench/keyterms.py
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host.client import read_wav  # noqa: E402
from host.contracts import SessionOptions  # noqa: E402
from host.offline import load_engine  # noqa: E402
from host.wer import WerCounts, field_errors  # noqa: E402

SHARED = ROOT.parent / "shared"
CASES = {  # clip id -> the names in it
    "de-fleurs-000": ["Kowloon", "Hongkong"],
    "de-fleurs-004": ["Mekka"],
    "es-fleurs-001": ["Oravec"],
    "es-fleurs-004": ["Carpanedo"],
    "fr-fleurs-001": ["USOC"],
    "fr-fleurs-004": ["Mashhad"],
    "pt-fleurs-000": ["Bieber"],
    "pt-fleurs-002": ["Giancarlo Fisichella"],
    "pt-fleurs-003": ["Goethe", "Fichte", "Schlegel"],
}
UNRELATED = ["Kowloon", "Carpanedo", "Fisichella", "Mashhad", "Schlegel"]


def rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def samples(path: Path) -> np.ndarray:
    return np.frombuffer(read_wav(path).pcm, "<i2").astype(np.float32) / 32768


def options(way: str, terms: list[str]) -> SessionOptions:
    if way == "keyterms":
        return SessionOptions({"keyterms": ",".join(terms)})
    if way == "prompt":
        return SessionOptions({"prompt": ", ".join(terms) + "."})
    return SessionOptions({})


def found(term: str, text: str) -> bool:
    return all(word.lower() in text.lower() for word in term.split())


def main() -> None:
    engine = load_engine("whisper-streaming", None)
    if isinstance(engine, str):
        raise SystemExit(engine)
    clips = {r["id"]: r for r in rows(SHARED / "speech-multi" / "manifest.tsv")}
    print(f"{'variant':>9} {'way':>9} {'names right':>12} {'WER':>7}")
    for variant in ("accurate",):
        model = engine.asr.variants[variant]
        for way in ("none", "keyterms", "prompt"):
            right, total, errors = 0, 0, WerCounts(0, 0)
            for clip_id, terms in CASES.items():
                clip = clips[clip_id]
                text = model.transcribe(samples(SHARED / "speech-multi" / clip["path"]), language=clip["language"],
                                        word_timestamps=False, options=options(way, terms)).text
                right += sum(found(t, text) for t in terms)
                total += len(terms)
                errors += field_errors(clip["reference"], text, clip["language"])
                if way != "none":
                    print(f"    {clip_id} {way}: {text}")
            print(f"{variant:>9} {way:>9} {right:>5}/{total:<6} {errors.wer:7.3f}")
    fast = engine.asr.variants["fast"]
    english = rows(SHARED / "speech" / "manifest.tsv")
    for way in ("none", "keyterms"):
        errors = WerCounts(0, 0)
        for r in english:
            text = fast.transcribe(samples(SHARED / "speech" / r["path"]), language="en", word_timestamps=False,
                                   options=options(way, UNRELATED)).text
            errors += field_errors(r["reference"], text, "en")
        given = f"(unrelated: {','.join(UNRELATED)})" if way != "none" else ""
        print(f"English dev set ({len(english)} clips), fast, {way} {given}: WER {errors.wer:.4f} over {errors.words} words")


if __name__ == "__main__":
    main()
