"""What the speculative decode at a pause says about the turn: a finished sentence, an unfinished one,
or nothing sure.

Smart Turn hears *how* the speaker stopped; the decode of the utterance as it would end at the pause
says *what* was said. On the dev set (bench/turn_text.py, bench/results/README.md "Text evidence for
the turn") the ASR model's own probability of a full stop after the last word told a clip end from a
pause inside a clip about as well as Smart Turn (AUC 0.72 against 0.70) and partly independently of
it, while text that ends like an unfinished sentence (a comma, "...", no closing punctuation, a last
word such as "and" or "the") marked pauses where the speaker went on. The endpointer
(:mod:`host.endpointing`) uses the verdict: an early checkpoint ends the turn only on a finished
sentence, and an unfinished one waits for the maximum silence.
"""

from __future__ import annotations

import enum

from host.contracts import AsrResult


class TextVerdict(enum.Enum):
    """How the speculative decode at a pause reads."""

    FINISHED = "finished"
    """Closing punctuation the model was sure of: the early checkpoints may end the turn."""
    UNFINISHED = "unfinished"
    """Ends like a sentence that goes on: only the maximum silence ends the pause (when held)."""
    UNSURE = "unsure"
    """No decode, no text, or punctuation the model was not sure of: the detector alone decides, at
    the ordinary checkpoints."""


SENTENCE_ENDS = (".", "?", "!", "。", "？", "！")
"""Closing punctuation (Latin and CJK full-width)."""

GOES_ON = (",", "...", "…", "-", ";", ":", "、", "，")
"""Endings of text that continues."""

_CLOSING_QUOTES = "\"')]»”’ "

FUNCTION_WORDS = frozenset("""
a an the and or but nor so yet because if when while although though since unless until whether that
which who whom whose where than as of to in on at for with from by into onto upon about over under after
before between through during without within against among toward towards like my your his her its our
their this these those very
""".split())
"""English words a statement rarely ends on: conjunctions, prepositions, articles, determiners and
possessives. Auxiliaries are not among them: "...than he was." and "...what he had been." end clips of
the dev set, and with them in the list (as bench/turn_text.py first had it) 2 more clip ends waited
for the maximum silence and the mean wait was 0.36 s instead of 0.33 s, for one cut fewer. A
question may end on a preposition ("Where is he from?"), so the list is not applied after ``?``."""


def read(result: AsrResult | None, sentence_end: float) -> TextVerdict:
    """The verdict on ``result``, the speculative decode of the open utterance (None: none came back).

    ``sentence_end``: the model's probability of ``.`` ``?`` ``!`` after the last word
    (:attr:`AsrResult.sentence_end`) at or above which the text reads as finished. A model that does
    not report it never reads as finished, but still reads as unfinished where the text shows it."""
    if result is None:
        return TextVerdict.UNSURE
    text = result.text.strip().rstrip(_CLOSING_QUOTES)
    if not text:
        return TextVerdict.UNSURE
    if text.endswith(GOES_ON) or not text.endswith(SENTENCE_ENDS):
        return TextVerdict.UNFINISHED
    if (result.language or "en") == "en" and not text.endswith(("?", "!")):
        last = text.rstrip("".join(SENTENCE_ENDS) + _CLOSING_QUOTES).split()[-1:] or [""]
        if last[0].lower().strip("\"'(") in FUNCTION_WORDS:
            return TextVerdict.UNFINISHED
    p = result.sentence_end
    return TextVerdict.FINISHED if p is not None and p >= sentence_end else TextVerdict.UNSURE
