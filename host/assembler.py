"""The built-in transcript assembler (plugin name ``default``).

It maps utterance-relative word times to session time, keeps words inside their
segment, drops words repeated across a cut between two back-to-back utterances
(a long utterance split at ``max_utterance_s`` often has its boundary word
recognized on both sides), and keeps the segment list for ``session.end``.
"""

from __future__ import annotations

import re
from dataclasses import replace

from host.contracts import AsrResult, Segment, Utterance, Word
from host.hookspecs import hookimpl

OPTIONS_SCHEMA = {
    "type": "object",
    "properties": {
        "dedup_max_words": {
            "type": "integer", "minimum": 0, "maximum": 20, "default": 4,
            "description": "Longest run of words repeated across a cut that is removed (0: off).",
        },
        "dedup_window_s": {
            "type": "number", "minimum": 0, "maximum": 5, "default": 1.0,
            "description": "Repeated words must lie this close to the cut to be removed.",
        },
    },
    "additionalProperties": False,
}

_NON_WORD = re.compile(r"[^\w']+")


def _norm(word: str) -> str:
    return _NON_WORD.sub("", word.lower())


class DefaultAssembler:
    def __init__(self, dedup_max_words: int = 4, dedup_window_s: float = 1.0):
        self.dedup_max_words = dedup_max_words
        self.dedup_window_s = dedup_window_s

    def open_session(self) -> SessionTranscript:
        return SessionTranscript(self.dedup_max_words, self.dedup_window_s)


class SessionTranscript:
    """Per-session assembler state."""

    def __init__(self, dedup_max_words: int, dedup_window_s: float):
        self._max = dedup_max_words
        self._window = dedup_window_s
        self._segments: list[Segment] = []
        self._last_end: float | None = None

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    def add(self, utterance: Utterance, result: AsrResult) -> Segment | None:
        words = _within_speech([self._to_session(w, utterance) for w in result.words], utterance)
        contiguous = self._last_end is not None and abs(utterance.start - self._last_end) < 1e-6
        if contiguous and words:
            words = self._drop_repeated_head(words, utterance.start)
        self._last_end = utterance.end
        if result.words:
            text = "".join(w.word for w in words).strip()
        else:
            text = result.text.strip()
        if not text:
            return None
        if words:
            start = max(utterance.start, words[0].start)
            end = min(utterance.end, max(w.end for w in words))
            end = max(end, start)
            confidence = sum(w.probability for w in words) / len(words)
        else:
            start, end, confidence = utterance.start, utterance.end, result.confidence
        segment = Segment(
            id=len(self._segments),
            utterance_id=utterance.id,
            start=round(start, 3),
            end=round(end, 3),
            text=text,
            confidence=round(float(confidence), 4),
            language=result.language,
            language_probability=result.language_probability,
            words=[Word(w.word.strip(), w.start, w.end, w.probability) for w in words],
        )
        self._segments.append(segment)
        return segment

    @staticmethod
    def _to_session(word: Word, utterance: Utterance) -> Word:
        start = min(max(utterance.start + word.start, utterance.start), utterance.end)
        end = min(max(utterance.start + word.end, start), utterance.end)
        return Word(word.word, round(start, 3), round(end, 3), round(float(word.probability), 4))

    def _drop_repeated_head(self, words: list[Word], cut: float) -> list[Word]:
        if not self._segments or self._max <= 0:
            return words
        previous = [w for w in self._segments[-1].words if w.end >= cut - self._window]
        prev_norm = [_norm(w.word) for w in previous]
        for n in range(min(self._max, len(prev_norm), len(words)), 0, -1):
            head = words[:n]
            if any(w.start > cut + self._window for w in head):
                continue
            if [_norm(w.word) for w in head] == prev_norm[-n:]:
                return words[n:]
        return words


def _within_speech(words: list[Word], utterance: Utterance) -> list[Word]:
    """``words`` with the first one starting no earlier, and the last one ending no later, than
    the VAD heard speech. Whisper's alignment gives the first word the leading silence (it starts
    at the pre-roll's first sample in nearly every utterance: 0.2-0.3 s early), and stretches the
    last one into the post-roll."""
    if not words:
        return words
    words = list(words)
    if utterance.speech_start is not None:
        first = words[0]
        words[0] = replace(first, start=round(min(max(first.start, utterance.speech_start), first.end), 3))
    if utterance.speech_end is not None:
        last = words[-1]
        words[-1] = replace(last, end=round(max(min(last.end, utterance.speech_end), last.start), 3))
    return words


@hookimpl
def register_assembler(register):
    register("default", lambda options, context: DefaultAssembler(**options), OPTIONS_SCHEMA)
