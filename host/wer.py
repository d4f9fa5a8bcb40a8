"""Word error rate with the normalisation used by ../shared/speech (both sides normalised the same way)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
            "nine": "ninth", "twelve": "twelfth"}
_FILLERS = {"um", "uh", "uhm", "umm", "hmm", "mm", "mhm", "mmm", "er", "ah"}
_WORDS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "yknow": "you know", "ok": "okay"}


def _cardinal(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" " + _cardinal(rest) if rest else "")
    for size, name in ((10**9, "billion"), (10**6, "million"), (1000, "thousand")):
        if n >= size:
            rest = n % size
            return _cardinal(n // size) + " " + name + (" " + _cardinal(rest) if rest else "")
    raise ValueError(n)


def _number(digits: str) -> str:
    n = int(digits)
    if len(digits) == 4 and 1100 <= n <= 2099 and n % 100 != 0 and not 2000 <= n <= 2009:
        # Years are read in pairs: 1961 -> nineteen sixty one.
        return _cardinal(n // 100) + " " + (_cardinal(n % 100) if n % 100 >= 10 else "oh " + _cardinal(n % 100))
    return _cardinal(n)


def _ordinal(n: int) -> str:
    words = _cardinal(n).split()
    last = words[-1]
    if last in _ORDINAL:
        words[-1] = _ORDINAL[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def normalize(text: str) -> list[str]:
    """Lower-case words with numbers spelled out, punctuation and fillers removed."""
    text = text.lower().replace("%", " percent ").replace("&", " and ")
    text = re.sub(r"(\d+)(st|nd|rd|th)\b", lambda m: " " + _ordinal(int(m.group(1))) + " ", text)
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = re.sub(r"\d+", lambda m: " " + _number(m.group(0)) + " ", text)
    text = re.sub(r"[^\w']+|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    out: list[str] = []
    for word in text.split():
        word = _WORDS.get(word, word)
        out.extend(w for w in word.split() if w not in _FILLERS)
    return out


@dataclass
class WerCounts:
    errors: int
    words: int

    @property
    def wer(self) -> float:
        return self.errors / self.words if self.words else 0.0

    def __add__(self, other: WerCounts) -> WerCounts:
        return WerCounts(self.errors + other.errors, self.words + other.words)


def word_errors(reference: str, hypothesis: str) -> WerCounts:
    """Edit distance between normalised word sequences, and the reference length."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return WerCounts(prev[-1], len(ref))


def wer(reference: str, hypothesis: str) -> float:
    return word_errors(reference, hypothesis).wer


def field_errors(reference: str, hypothesis: str, language: str | None = "en") -> WerCounts:
    """Word errors as the field counts them, so figures compare with published ones: Whisper's
    English normaliser (the Open ASR Leaderboard's) for English, its basic multilingual one for other
    languages, then jiwer's alignment. :func:`word_errors` is this project's older hand-written count
    (bench/results/README.md shows both on the dev set)."""
    import jiwer

    normalize_text = _normalizer(language in (None, "en"))
    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    if not ref:
        return WerCounts(len(hyp), 0)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp) or "")
    return WerCounts(out.substitutions + out.deletions + out.insertions, len(ref))


@cache
def _normalizer(english: bool) -> Callable[[str], str]:
    """Whisper's English or basic normaliser, made once (the English one reads its spelling table)."""
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer() if english else BasicTextNormalizer()
