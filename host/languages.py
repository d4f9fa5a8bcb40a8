"""Languages of a session: the ``language`` parameter and the per-utterance language decision.

``language`` is ``auto`` (detect each utterance's language among all the model knows), one code
(``de``: forced, as before) or a candidate set (``en,de,es``: detect, but only among these). The
decision is the host's, made from the probabilities a model's optional ``detect_language`` gives
(:func:`decide`), so every ASR plugin gets the same rule. A code-switching speaker changes language
between utterances, so each utterance is decided on its own audio; but a short utterance ("okay",
a name) carries little evidence, and Whisper's detector is then often wrong with fair confidence.
The rule therefore keeps the session's previous language unless another wins clearly
(:class:`SwitchRule`; its numbers are measured in bench/results/README.md, "Language switching").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

AUTO = "auto"
PATTERN = r"^(auto|[a-z]{2,3}(,[a-z]{2,3})*)$"
"""The ``language`` parameter: ``auto``, a code, or codes separated by commas."""
_PATTERN = re.compile(PATTERN)


def parse(value: str) -> tuple[str, ...]:
    """The codes ``value`` names, in order and without repeats (empty for ``auto``); ValueError if malformed."""
    text = value
    if not _PATTERN.fullmatch(text):
        raise ValueError(f"{value!r} is not auto, a language code or a comma-separated list of codes")
    if text == AUTO:
        return ()
    return tuple(dict.fromkeys(text.split(",")))


def canonical(value: str) -> str:
    """``value`` as sessions echo it: without repeated codes."""
    codes = parse(value)
    return ",".join(codes) if codes else AUTO


def forced(value: str) -> str | None:
    """The one language ``value`` forces, or None when it asks for detection (``auto`` or a set)."""
    codes = parse(value)
    return codes[0] if len(codes) == 1 else None


def candidates(value: str) -> tuple[str, ...]:
    """The languages detection may choose among for ``value`` (empty: any)."""
    codes = parse(value)
    return codes if len(codes) > 1 else ()


def shown(codes: Sequence[str], limit: int = 12) -> str:
    """Language codes for a message: the first ``limit``, then how many there are in all."""
    return ", ".join(codes[:limit]) + (f", ... ({len(codes)} in all)" if len(codes) > limit else "")


@dataclass(frozen=True)
class SwitchRule:
    """When an utterance may change the session's language.

    The best candidate replaces the previous language only if its probability (among the
    candidates) is at least ``switch_probability``, or ``short_switch_probability`` for an
    utterance of less than ``short_s`` seconds. Without a previous language the best wins.
    """

    switch_probability: float = 0.6
    short_s: float = 2.0
    short_switch_probability: float = 0.95


DEFAULT_RULE = SwitchRule()


@dataclass(frozen=True)
class Decision:
    language: str
    probability: float
    """The chosen language's probability among the candidates, 0-1."""


def decide(probabilities: Mapping[str, float], allowed: Sequence[str], previous: str | None, seconds: float,
           rule: SwitchRule = DEFAULT_RULE, partial: bool = False) -> Decision | None:
    """The language of one utterance of ``seconds`` from the model's ``probabilities``.

    Only ``allowed`` languages count (all the model gave, when empty); their probabilities are
    renormalised to sum to 1. None when the model gave none of them. A ``partial`` (replaced by the
    next) needs only ``switch_probability`` whatever its length, so that the first words after a
    language switch are not shown rendered in the previous language (bench/results/README.md)."""
    scores = {code: float(p) for code, p in probabilities.items() if (not allowed or code in allowed) and p >= 0}
    total = sum(scores.values())
    if not scores or total <= 0:
        return None
    scores = {code: p / total for code, p in scores.items()}
    best = max(scores, key=lambda code: scores[code])
    if previous is not None and previous in scores and best != previous:
        short = seconds < rule.short_s and not partial
        needed = rule.short_switch_probability if short else rule.switch_probability
        if scores[best] < needed:
            best = previous
    return Decision(best, scores[best])
