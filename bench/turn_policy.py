"""Tune the turn policy on the dev set: what the turn detector says at each pause, and what a policy
(checkpoints, thresholds, maximum silence) would make of it.

The dev clips of ``../shared/speech`` are joined with ``--gap`` s of silence, as ``engine-host bench``
streams them, and endpointed offline with the default engine's VAD (Silero) and turn detector (Smart
Turn). Every pause of an open utterance is checked at every ``--step`` of silence up to ``--longest``,
and never ended by the detector, so each pause yields its whole curve of answers. A pause is an
*end* when the speech after it belongs to the next clip (or there is none): the clip's sentence is
over. Any other pause is *inside* a clip: ending there splits a sentence.

A policy is then scored on those curves without re-running anything: for each end, the silence after
which it ends (the first checkpoint whose answer reaches its threshold, else the maximum silence);
for each inside pause, whether it is cut. Run::

    .venv/bin/python bench/turn_policy.py [--limit N] [--gap 1.0]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host.client import read_wav
from host.endpointing import SpeechEnd, SpeechResume, SpeechStart, TurnCheck, TurnPolicy
from host.offline import load_engine
from host.vad import VadStage

SR = 16000


def clips(manifest: Path, limit: int | None) -> list[np.ndarray]:
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:limit]
    return [np.frombuffer(read_wav(manifest.parent / r["path"]).pcm, "<i2").astype(np.float32) / 32768 for r in rows]


def pauses(engine, audio: np.ndarray, offsets: list[int], step: float, longest: float) -> list[dict]:
    """Every pause of the stream: whether it ends a clip, and the detector's answer at each checkpoint."""
    checkpoints = tuple(round(step * k, 3) for k in range(1, int(longest / step) + 1))
    options = engine.endpointing
    policy = TurnPolicy(checkpoints, 2.0, longest + step)  # a threshold above 1: the detector never ends one
    vad = VadStage(engine.vad, options, policy)
    found: list[dict] = []
    current: dict | None = None
    start = 0
    answers: dict[TurnCheck, float] = {}

    def answer(check: TurnCheck) -> float:
        begin = vad.endpointer.utterance_start or 0
        answers[check] = engine.turn.probability(audio[max(begin, check.sample - 8 * SR):check.sample])
        return answers[check]

    for k in range(0, len(audio), 1600):
        for event in vad.feed(audio[k:k + 1600], answer):
            if isinstance(event, SpeechStart):
                start = event.sample
            elif isinstance(event, TurnCheck):
                if current is None:
                    text = transcribe(engine, audio[start:event.end])
                    current = {"at": event.end, "answers": [], "text": text}
                    found.append(current)
                current["answers"].append(answers[event])
            elif isinstance(event, (SpeechResume, SpeechEnd)):
                if current is not None:
                    where = np.searchsorted(offsets, [current["at"], event.sample], side="right")
                    current["end"] = bool(isinstance(event, SpeechEnd) or where[0] != where[1])
                current = None
    for pause in found:
        pause.setdefault("end", True)
    return [dict(p, checkpoints=checkpoints) for p in found]


def transcribe(engine, audio: np.ndarray) -> str:
    """What the fast variant makes of the utterance so far (the speculative decode at a pause)."""
    model = engine.asr.variants["fast"]
    return model.transcribe(audio, language=None, word_timestamps=False, partial=False).text.strip()


def sentence_end(text: str) -> bool:
    return text.endswith((".", "?", "!"))


def score(found: list[dict], schedule: list[tuple[float, float]], max_silence: float) -> dict:
    """A policy: ``schedule`` is (silence, threshold) checkpoints, in order; ``checks`` counts the
    detector calls it makes (a pause stops being checked once it ends or speech resumes)."""
    latencies, cuts, inside, checks = [], 0, 0, 0
    for pause in found:
        answers = dict(zip(pause["checkpoints"], pause["answers"]))
        ended = None
        for silence, threshold in schedule:
            if silence in answers:
                checks += 1
                if answers[silence] >= threshold:
                    ended = silence
                    break
        if pause["end"]:
            latencies.append(ended if ended is not None else max_silence)
        else:
            inside += 1
            longer = len(pause["answers"]) >= round(max_silence / pause["checkpoints"][0])
            cuts += ended is not None or longer
    latencies.sort()
    return {"ends": len(latencies), "p50": statistics.median(latencies),
            "p95": latencies[int(0.95 * (len(latencies) - 1))], "inside": inside, "cut": cuts, "checks": checks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", type=Path, default=Path("../shared/speech/manifest.tsv"))
    p.add_argument("--limit", type=int)
    p.add_argument("--gap", type=float, default=1.0)
    p.add_argument("--step", type=float, default=0.1)
    p.add_argument("--longest", type=float, default=1.5)
    p.add_argument("--dump", type=Path, help="write every pause (text, answers, end) to this JSON file")
    args = p.parse_args()
    engine = load_engine("whisper-streaming", None)
    if isinstance(engine, str) or engine.turn is None:
        raise SystemExit(f"the default engine with a turn detector is needed: {engine}")
    parts, offsets, at = [], [], 0
    gap = np.zeros(int(args.gap * SR), np.float32)
    for clip in clips(args.manifest, args.limit):
        offsets.append(at)
        parts += [clip, gap]
        at += len(clip) + len(gap)
    found = pauses(engine, np.concatenate(parts), offsets, args.step, args.longest)
    if args.dump:
        args.dump.write_text(json.dumps(found, indent=1))
    ends = [f for f in found if f["end"]]
    inside = [f for f in found if not f["end"]]
    print(f"{len(offsets)} clips, {len(ends)} end pauses, {len(inside)} pauses inside clips")
    for label, group in (("end", ends), ("inside", inside)):
        for i, s in enumerate(found[0]["checkpoints"][:6]):
            values = [g["answers"][i] for g in group if len(g["answers"]) > i]
            if values:
                print(f"{label:6s} at {s:.1f} s: n={len(values):3d} median p={statistics.median(values):.2f} "
                      f"share >= 0.5: {sum(v >= 0.5 for v in values) / len(values):.2f}")
    for label, group in (("end", ends), ("inside", inside)):
        share = sum(sentence_end(g["text"]) for g in group) / len(group)
        print(f"{label:6s}: the decode at the pause ends a sentence (. ? !) for {share:.2f}")
    seconds = sum(len(part) for part in parts) / SR
    print("\npolicy (checkpoint:threshold ...; max silence)  ends p50/p95 s  inside pauses cut  checks/s")
    for schedule, longest in POLICIES:
        r = score(found, schedule, longest)
        label = " ".join(f"{s:g}:{t:g}" for s, t in schedule) or "silence timer"
        print(f"{label:40s} {longest:.1f}  {r['p50']:.2f}/{r['p95']:.2f}  {r['cut']}/{r['inside']}  "
              f"{r['checks'] / seconds:.2f}")
    return 0


POLICIES: list[tuple[list[tuple[float, float]], float]] = [
    ([], 0.5),
    ([], 0.7),
    ([(0.1, 0.5), (0.2, 0.5), (0.3, 0.5)], 1.5),
    ([(0.1, 0.5), (0.2, 0.5), (0.3, 0.5), (0.5, 0.5)], 1.0),
    ([(0.1, 0.5), (0.3, 0.5)], 1.0),  # shipped
    ([(0.1, 0.5), (0.2, 0.5), (0.3, 0.5)], 0.8),
    ([(0.1, 0.7), (0.2, 0.6), (0.3, 0.5), (0.5, 0.2)], 1.0),
    ([(0.1, 0.5), (0.2, 0.5), (0.3, 0.5), (0.4, 0.3), (0.6, 0.15), (0.8, 0.05)], 1.5),
    ([(0.1, 0.3), (0.3, 0.3)], 0.6),  # eagerness high
    ([(0.1, 0.7), (0.3, 0.7)], 2.0),  # eagerness low
    ([(0.1, 0.5)], 1.0),
    ([(0.2, 0.5)], 1.0),
]

if __name__ == "__main__":
    sys.exit(main())
