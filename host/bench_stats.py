"""What ``engine-host bench`` makes of one streamed session, and of a level's sessions together.

Two kinds of latency are measured (see :mod:`host.bench` for the exact definitions):

- *from the endpoint* (``final_latency_*``, ``first_partial_latency_*``): from what the server's
  VAD said (its ``vad.speech_start``/``vad.speech_end`` and the engine's endpointing settings).
  They leave out the endpointing delay itself, and are kept so that old results stay comparable;
- *from the speech* (``end_of_speech_to_final_*``, ``first_partial_after_onset_*``,
  ``finals_per_utterance``): from each reference clip's true speech bounds
  (:func:`host.speech_bounds.speech_bounds`) placed where the clip lies in the sent stream; what
  a user feels, endpointing included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from host.bench_report import percentile, round3
from host.client import Audio, StreamResult
from host.endpointing import EndpointingOptions
from host.wer import WerCounts, field_errors, word_errors


@dataclass(frozen=True)
class ClipSpan:
    """Where one reference clip lies in a stream, in session seconds (the sent audio's clock)."""

    offset: float
    """Where the clip's audio begins."""
    onset: float | None
    """Its true speech onset (None: no speech found in the clip)."""
    end: float | None
    """Its true end of speech."""
    region_end: float
    """Where the next clip begins (inf for the last): the clip's region is [offset, region_end)."""


@dataclass(frozen=True)
class Reference:
    """What was said in one clip of a stream, and in which language (None: not given)."""

    text: str
    language: str | None = None


@dataclass
class LanguageScore:
    """One language's clips in a stream: word errors, and how many finals had that language."""

    errors: WerCounts = field(default_factory=lambda: WerCounts(0, 0))
    finals: int = 0
    right: int = 0
    """Finals whose ``language`` is the clip's."""

    def __add__(self, other: LanguageScore) -> LanguageScore:
        return LanguageScore(self.errors + other.errors, self.finals + other.finals, self.right + other.right)


@dataclass
class StreamStats:
    audio_seconds: float = 0.0
    wer: WerCounts = field(default_factory=lambda: WerCounts(0, 0))
    """Word errors as the field counts them (:func:`host.wer.field_errors`), clip by clip."""
    wer_project: WerCounts = field(default_factory=lambda: WerCounts(0, 0))
    """The same with this project's older normaliser over the whole stream (:func:`host.wer.word_errors`)."""
    languages: dict[str, LanguageScore] = field(default_factory=dict)
    final_latencies: list[float] = field(default_factory=list)
    first_partial_latencies: list[float] = field(default_factory=list)
    end_of_speech_latencies: list[float] = field(default_factory=list)
    onset_partial_latencies: list[float] = field(default_factory=list)
    finals_per_clip: list[int] = field(default_factory=list)
    without_final: int = 0
    endpointing: str | None = None
    """``config.endpointing`` of the session's ``session.begin``, when it has one."""
    partials: int = 0
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def clip_spans(audios: Sequence[Audio], bounds: Sequence[tuple[float, float] | None],
               offset_s: float, gap_s: float) -> list[ClipSpan]:
    """The spans of ``audios`` sent after ``offset_s`` s of silence, each followed by ``gap_s`` s of
    silence (as :func:`host.bench.run_stream` joins them), ``bounds`` being each clip's own speech
    bounds. Counted in samples, as :func:`host.client.silence` makes them."""
    if not audios:
        return []
    rate = audios[0].sample_rate
    at, gap = int(offset_s * rate), int(gap_s * rate)
    starts = []
    for audio in audios:
        starts.append(at / rate)
        at += len(audio.pcm) // (2 * audio.channels) + gap
    ends = starts[1:] + [math.inf]
    return [ClipSpan(s, s + b[0] if b else None, s + b[1] if b else None, e) for s, b, e in zip(starts, bounds, ends)]


def _overlaps(message: dict[str, Any], span: ClipSpan) -> bool:
    start, end = message.get("start"), message.get("end")
    if start is None or end is None or span.onset is None or span.end is None:
        return False
    return start < span.end and end > span.onset


def from_speech(stats: StreamStats, result: StreamResult, spans: Sequence[ClipSpan], speed: float | None) -> None:
    """Add to ``stats`` the latencies from each clip's true speech bounds and the finals per clip.

    - end of speech → final: arrival of the last ``transcript.final`` whose [start, end] overlaps
      the clip's speech span, minus the moment its end of speech was sent
      (``started_at + end / speed``); a clip no final overlaps counts in ``without_final``;
    - first partial after onset: arrival of the first ``transcript.partial`` with text whose
      [start, end] (the utterance so far) overlaps the speech span, minus the moment the onset was sent;
    - finals per clip: the finals whose midpoint lies in the clip's region.

    Latencies need a pace (``speed``); as fast as possible (None or 0) only the finals are counted.
    """
    finals = [(m, t) for m, t in zip(result.messages, result.received_at) if m["type"] == "transcript.final"]
    partials = [(m, t) for m, t in zip(result.messages, result.received_at)
                if m["type"] == "transcript.partial" and (m.get("text") or "").strip()]
    mids = [(m["start"] + m["end"]) / 2 for m, _ in finals if m.get("start") is not None and m.get("end") is not None]
    for span in spans:
        stats.finals_per_clip.append(sum(1 for mid in mids if span.offset <= mid < span.region_end))
        if span.onset is None or span.end is None:
            continue
        done = [t for m, t in finals if _overlaps(m, span)]
        if not done:
            stats.without_final += 1
        elif speed:
            stats.end_of_speech_latencies.append(max(done) - (result.started_at + span.end / speed))
        heard = [t for m, t in partials if _overlaps(m, span)]
        if heard and speed:
            stats.onset_partial_latencies.append(min(heard) - (result.started_at + span.onset / speed))


def analyse(result: StreamResult, references: Sequence[Reference], speed: float | None, endpointing: dict[str, Any],
            spans: Sequence[ClipSpan] = ()) -> StreamStats:
    """Latencies, WER and problems of one streamed session of clips ``references`` (``spans``:
    where they lie; without them the transcript is scored whole)."""
    stats = StreamStats()
    transcript = result.end["transcript"] if result.end else ""
    stats.wer_project = word_errors(" ".join(r.text for r in references), transcript)
    if spans and len(spans) == len(references):
        score_clips(stats, result, references, spans)
    else:
        language = references[0].language if references else None
        stats.wer = field_errors(" ".join(r.text for r in references), transcript, language)
    options = EndpointingOptions.from_options({"postroll_s": 0.0, "preroll_s": 0.0, **endpointing})
    postroll, preroll = options.postroll_s, options.preroll_s
    start_at: dict[int, float] = {}
    onset_at: dict[int, float] = {}
    end_at: dict[int, float] = {}
    utterance = -1
    for message, arrived in zip(result.messages, result.received_at):
        kind = message["type"]
        if kind == "session.begin":
            stats.endpointing = (message.get("config") or {}).get("endpointing")
        elif kind == "vad.speech_start":
            utterance += 1
            start_at[utterance] = message["timestamp"]
            onset_at[utterance] = message["timestamp"] + preroll
        elif kind == "vad.speech_end":
            # The endpoint fired this much silence after the last speech (speech_end carries the
            # post-roll); the endpointer waits longer while an utterance is short.
            speech = message["timestamp"] - postroll - start_at.get(utterance, 0.0)
            end_at[utterance] = message["timestamp"] + options.endpoint_silence_for(speech) - postroll
        elif kind == "transcript.partial":
            stats.partials += 1
            uid = message["utterance_id"]
            if speed and uid in onset_at:
                stats.first_partial_latencies.append(arrived - (result.started_at + onset_at.pop(uid) / speed))
        elif kind == "transcript.final" and speed and message["utterance_id"] in end_at:
            stats.final_latencies.append(arrived - (result.started_at + end_at[message["utterance_id"]] / speed))
        elif kind == "warning":
            stats.warnings.append(message["code"])
        elif kind == "error":
            stats.errors.append(message["code"])
    if result.end is None:
        stats.errors.append(f"no session.end (close {result.close_code})")
    from_speech(stats, result, spans, speed)
    return stats


def score_clips(stats: StreamStats, result: StreamResult, references: Sequence[Reference],
                spans: Sequence[ClipSpan]) -> None:
    """Each clip's word errors (the finals whose midpoint lies in its region against its reference,
    in its language) and, where the clip's language is known, how many of those finals had it."""
    finals = [m for m in result.messages if m["type"] == "transcript.final"
              and m.get("start") is not None and m.get("end") is not None]
    for ref, span in zip(references, spans):
        mine = [m for m in finals if span.offset <= (m["start"] + m["end"]) / 2 < span.region_end]
        errors = field_errors(ref.text, " ".join(m["text"] or "" for m in mine), ref.language)
        stats.wer += errors
        if ref.language:
            right = sum(1 for m in mine if m.get("language") == ref.language)
            score = LanguageScore(errors, len(mine), right)
            stats.languages[ref.language] = stats.languages.get(ref.language, LanguageScore()) + score


def language_fields(results: Sequence[StreamStats]) -> dict[str, Any]:
    """Per language of the manifest, over a level's streams: WER and the share of finals detected
    in the clip's language (``language_accuracy``); empty without a ``language`` column."""
    totals: dict[str, LanguageScore] = {}
    for r in results:
        for code, score in r.languages.items():
            totals[code] = totals.get(code, LanguageScore()) + score
    if not totals:
        return {}
    finals = sum(s.finals for s in totals.values())
    return {
        "language_accuracy": round(sum(s.right for s in totals.values()) / finals, 4) if finals else None,
        "languages": {code: {"wer": round(s.errors.wer, 4), "words": s.errors.words, "finals": s.finals,
                             "language_accuracy": round(s.right / s.finals, 4) if s.finals else None}
                      for code, s in sorted(totals.items())},
    }


def speech_fields(results: Sequence[StreamStats]) -> dict[str, Any]:
    """A level's figures from the clips' true speech bounds, over all its streams."""
    eos = [x for r in results for x in r.end_of_speech_latencies]
    onset = [x for r in results for x in r.onset_partial_latencies]
    clips = [n for r in results for n in r.finals_per_clip]
    return {
        "end_of_speech_to_final_p50": round3(percentile(eos, 0.5)),
        "end_of_speech_to_final_p95": round3(percentile(eos, 0.95)),
        "first_partial_after_onset_p50": round3(percentile(onset, 0.5)),
        "first_partial_after_onset_p95": round3(percentile(onset, 0.95)),
        "finals_per_utterance": round(sum(clips) / len(clips), 3) if clips else None,
        "utterances_without_final": sum(r.without_final for r in results),
    }


COMPARED = ("end_of_speech_to_final_p50", "end_of_speech_to_final_p95", "finals_per_utterance", "wer")


def compare_policies(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stream count where both policies ran: the ratios turn / silence of :data:`COMPARED`
    (None where either is missing or the silence figure is 0)."""
    out = []
    for n in sorted({r["streams"] for r in rows}):
        by = {r.get("endpointing"): r for r in rows if r["streams"] == n}
        if "turn" in by and "silence" in by:
            turn, base = by["turn"], by["silence"]
            out.append({"streams": n, **{k: _ratio(turn.get(k), base.get(k)) for k in COMPARED}})
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None
