"""Partial transcripts: local agreement keeps interim text of an open utterance from flickering.

A word that two consecutive hypotheses agree on (with every word before it), and that is not
the last word of the newer one, becomes *stable*: later partials of the same utterance always
start with the stable words; only the text after them may change. The final is decoded afresh
on the whole utterance and may differ: it revised the stable words in 21 of 80 utterances of the
dev set (tiny.en), and forcing it to keep them (faster-whisper's ``prefix``) raised WER from
14.2 % to 18.3 % (bench/results/README.md, "Stable partials").

The last word of a hypothesis is never agreed on: its audio is cut off, so Whisper often
renders it as half a word, or ends it with "..." or a full stop where the speaker goes on
("He began." → "He began to"). Such trailing marks are also stripped from the tail a partial shows.
"""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[^\w']+")
_CUT_OFF = re.compile(r"(?:\.\.\.|…|[.,;:\-–—])+$")
"""Marks a hypothesis ends with because its audio stops, not because the sentence does."""


def word_key(word: str) -> str:
    """A word as agreement compares it: lower case, punctuation dropped."""
    return _PUNCT.sub("", word.lower())


def strip_cut_off(words: list[str]) -> list[str]:
    """``words`` without the trailing "...", "…", full stop or comma of the last one (dropped if
    nothing else is left of it)."""
    if not words:
        return words
    last = _CUT_OFF.sub("", words[-1])
    return words[:-1] + [last] if last else words[:-1]


class LocalAgreement:
    """Stabilizes the successive hypotheses of one utterance."""

    def __init__(self) -> None:
        self.stable: list[str] = []
        """The agreed words, as the hypothesis that agreed on them spelled them."""
        self.shown = False
        """Whether a non-empty partial was produced for this utterance."""
        self._previous: list[str] | None = None

    @property
    def stable_text(self) -> str:
        """The agreed prefix: every later partial, and the final, start with it."""
        return " ".join(self.stable)

    def update(self, hypothesis: str) -> str:
        """Feed the newest hypothesis; returns the partial text to show."""
        words = hypothesis.split()
        n = len(self.stable)
        keys = [word_key(w) for w in words]
        if self._previous is not None and keys[:n] == [word_key(w) for w in self.stable]:
            previous = [word_key(w) for w in self._previous]
            agreed = n
            limit = min(len(previous), len(keys) - 1)  # never the newest hypothesis' last word
            while agreed < limit and previous[agreed] == keys[agreed]:
                agreed += 1
            self.stable += words[n:agreed]
        self._previous = words
        text = " ".join(self.stable + strip_cut_off(words[len(self.stable):]))
        self.shown = self.shown or bool(text)
        return text
