"""Partial transcripts: local agreement keeps interim text of an open utterance from flickering.

A word prefix that two consecutive hypotheses agree on becomes *stable*: later
partials of the same utterance always start with it. Only the text after it
may change. The final replaces all partials of its utterance.
"""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[^\w']+")


def _key(word: str) -> str:
    return _PUNCT.sub("", word.lower())


class LocalAgreement:
    """Stabilizes the successive hypotheses of one utterance."""

    def __init__(self) -> None:
        self.stable: list[str] = []
        self.shown = False
        """Whether a non-empty partial was produced for this utterance."""
        self._previous: list[str] | None = None

    def update(self, hypothesis: str) -> str:
        """Feed the newest hypothesis; returns the partial text to show."""
        words = hypothesis.split()
        n = len(self.stable)
        keys = [_key(w) for w in words]
        if self._previous is not None and keys[:n] == [_key(w) for w in self.stable]:
            previous = [_key(w) for w in self._previous]
            agreed = n
            while agreed < min(len(previous), len(keys)) and previous[agreed] == keys[agreed]:
                agreed += 1
            self.stable += words[n:agreed]
        self._previous = words
        text = " ".join(self.stable + words[len(self.stable):])
        self.shown = self.shown or bool(text)
        return text
