"""Endpointing options: the ``vad`` stage's host-owned options of engine.yaml (their JSON Schema and
:class:`EndpointingOptions`), and the turn policies the session's ``eagerness`` selects.

The state machine that applies them is :mod:`host.endpointing`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

ENDPOINTING_SCHEMA = {
    "type": "object",
    "properties": {
        "threshold": {
            "type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
            "description": "Probability at or above which a window counts as speech.",
        },
        "neg_threshold": {
            "type": ["number", "null"], "minimum": 0, "maximum": 1, "default": None,
            "description": "Probability below which a window counts as silence (default threshold - 0.15).",
        },
        "endpoint_silence_s": {
            "type": "number", "exclusiveMinimum": 0, "maximum": 10, "default": 0.5,
            "description": "Silence that ends an utterance.",
        },
        "short_utterance_s": {
            "type": "number", "minimum": 0, "maximum": 10, "default": 0,
            "description": "Utterances with less speech than this end only after short_endpoint_silence_s "
                           "(0: off).",
        },
        "short_endpoint_silence_s": {
            "type": "number", "exclusiveMinimum": 0, "maximum": 10, "default": 1.0,
            "description": "Silence that ends an utterance shorter than short_utterance_s.",
        },
        "preroll_s": {
            "type": "number", "minimum": 0, "maximum": 2, "default": 0.3,
            "description": "Audio kept before speech onset, so first words are not clipped.",
        },
        "postroll_s": {
            "type": "number", "minimum": 0, "maximum": 1, "default": 0.2,
            "description": "Audio kept after the last speech window of an utterance.",
        },
        "min_speech_s": {
            "type": "number", "minimum": 0, "maximum": 5, "default": 0.25,
            "description": "Speech shorter than this is a blip and is dropped.",
        },
        "early_partial_s": {
            "type": "number", "minimum": 0, "maximum": 5, "default": 0.1,
            "description": "Speech after which the first partial of an utterance is decoded, before the "
                           "utterance opens at min_speech_s (0: when it opens). It is sent only if it opens.",
        },
        "speculate_after_s": {
            "type": "number", "minimum": 0, "maximum": 5, "default": 0.2,
            "description": "Silence after which the utterance is decoded speculatively, so its final is "
                           "ready when the endpoint fires (0: off). Never earlier than postroll_s.",
        },
        "reset_state_at_endpoint": {
            "type": "boolean", "default": True,
            "description": "Reset the VAD's recurrent state at each endpoint, warmed up again on the "
                           "endpoint's trailing silence: Silero's state drifts over long streams and can "
                           "miss the next speaker.",
        },
        "reset_warmup_s": {
            "type": "number", "minimum": 0, "maximum": 2, "default": 0.5,
            "description": "Trailing audio the reset state is warmed up on (at most endpoint_silence_s).",
        },
        "max_utterance_s": {
            "type": "number", "minimum": 1, "maximum": 60, "default": 30,
            "description": "Longer speech is cut (at its quietest recent window) and finalized.",
        },
        "turn_checkpoints_s": {
            "type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 5},
            "minItems": 1, "maxItems": 8, "default": [0.3],
            "description": "With a turn detector (endpointing=turn): silence after the last speech at which "
                           "it is asked whether the turn is complete (eagerness medium; high: x0.5, low: x2). "
                           "A complete turn ends the utterance postroll_s after the last speech (or at the "
                           "first checkpoint of this list and turn_text_checkpoints_s, if sooner), where its "
                           "speculative decode started.",
        },
        "turn_threshold": {
            "type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
            "description": "Complete-probability at or above which the turn ends (eagerness medium; "
                           "high lowers it by 0.2, low raises it by 0.2).",
        },
        "turn_max_silence_s": {
            "type": "number", "exclusiveMinimum": 0, "maximum": 10, "default": 1.0,
            "description": "With a turn detector: silence that ends an utterance the detector keeps open "
                           "(eagerness medium; high: x0.5, low: x2).",
        },
        "turn_text_checkpoints_s": {
            "type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 5},
            "maxItems": 8, "default": [0.1],
            "description": "With a turn detector: earlier checkpoints at which the turn ends only if the "
                           "detector says complete and the speculative decode, started at the first of "
                           "them, also reads as a finished sentence (its model's sentence_end probability "
                           "at least turn_sentence_end). Scaled by eagerness as turn_checkpoints_s. "
                           "Empty: the decode's text is not consulted.",
        },
        "turn_sentence_end": {
            "type": "number", "minimum": 0, "maximum": 1, "default": 0.9,
            "description": "The ASR model's probability of . ? ! after the last word at or above which the "
                           "speculative decode reads as a finished sentence.",
        },
        "turn_hold_unfinished": {
            "type": "boolean", "default": True,
            "description": "A pause whose speculative decode reads as unfinished (a trailing comma or "
                           "'...', no closing punctuation, a last word such as 'and' or 'the') is ended "
                           "only by turn_max_silence_s, whatever the detector says.",
        },
    },
}
ENDPOINTING_KEYS = frozenset(ENDPOINTING_SCHEMA["properties"])


@dataclass(frozen=True)
class EndpointingOptions:
    threshold: float = 0.5
    neg_threshold: float | None = None
    endpoint_silence_s: float = 0.5
    short_utterance_s: float = 0.0
    short_endpoint_silence_s: float = 1.0
    preroll_s: float = 0.3
    postroll_s: float = 0.2
    min_speech_s: float = 0.25
    early_partial_s: float = 0.1
    speculate_after_s: float = 0.2
    max_utterance_s: float = 30.0
    reset_state_at_endpoint: bool = True
    reset_warmup_s: float = 0.5
    turn_checkpoints_s: tuple[float, ...] = (0.3,)
    turn_threshold: float = 0.5
    turn_max_silence_s: float = 1.0
    turn_text_checkpoints_s: tuple[float, ...] = (0.1,)
    turn_sentence_end: float = 0.9
    turn_hold_unfinished: bool = True

    def endpoint_silence_for(self, speech_s: float) -> float:
        """Seconds of silence that end an utterance holding ``speech_s`` of speech (pre-roll
        included): longer while it is still short. A short fragment decoded alone is where
        Whisper errs most; waiting longer often joins it to the speech that follows."""
        if self.short_utterance_s and speech_s < self.short_utterance_s:
            return max(self.endpoint_silence_s, self.short_endpoint_silence_s)
        return self.endpoint_silence_s

    @classmethod
    def from_options(cls, options: dict) -> EndpointingOptions:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in options.items() if k in names}
        for name in ("turn_checkpoints_s", "turn_text_checkpoints_s"):
            if name in values:
                values[name] = tuple(sorted(values[name]))
        return cls(**values)

    def turn_policy(self, eagerness: str = "auto") -> TurnPolicy:
        """The turn policy for a session's ``eagerness`` (``low|medium|high|auto``; auto is medium)."""
        shift, scale = EAGERNESS[eagerness]
        return TurnPolicy(tuple(c * scale for c in self.turn_checkpoints_s),
                          min(0.95, max(0.05, self.turn_threshold + shift)), self.turn_max_silence_s * scale,
                          tuple(c * scale for c in self.turn_text_checkpoints_s), self.turn_sentence_end,
                          self.turn_hold_unfinished)

    def with_silence(self, seconds: float) -> EndpointingOptions:
        """These options with ``seconds`` of silence ending every utterance (a session's ``silence_ms``)."""
        return replace(self, endpoint_silence_s=seconds, short_utterance_s=0.0)


EAGERNESS: dict[str, tuple[float, float]] = {
    "low": (0.2, 2.0), "medium": (0.0, 1.0), "auto": (0.0, 1.0), "high": (-0.2, 0.5)}
"""Eagerness → (shift of ``turn_threshold``, factor on the checkpoints and ``turn_max_silence_s``): as
OpenAI's ``semantic_vad``, high ends turns sooner and on less certainty, low waits longer for the
speaker to go on."""


@dataclass(frozen=True)
class TurnPolicy:
    """When a turn detector is asked at a pause, and what its answer does."""

    checkpoints_s: tuple[float, ...]
    """Silence after the last speech at which the detector is asked."""
    threshold: float
    """Complete-probability at or above which the turn ends at the pause."""
    max_silence_s: float
    """Silence that ends the utterance whatever the detector said."""
    text_checkpoints_s: tuple[float, ...] = ()
    """Earlier checkpoints where a complete answer ends the turn only with the speculative decode
    reading as a finished sentence (:mod:`host.turn_text`)."""
    sentence_end: float = 0.9
    """The decode's sentence-end probability at or above which it reads as finished."""
    hold_unfinished: bool = True
    """A decode that reads as unfinished leaves the pause to ``max_silence_s``."""

    @property
    def consults_text(self) -> bool:
        """Whether the speculative decode's text is read at a pause (text checkpoints, or the hold)."""
        return bool(self.text_checkpoints_s)

    def schedule(self) -> list[tuple[float, bool]]:
        """Every checkpoint, in order: (silence in seconds, whether it needs the decode's text). The
        decode's text is read at the first text checkpoint; later ones reuse that reading."""
        text = {c: True for c in self.text_checkpoints_s}
        return sorted({**{c: False for c in self.checkpoints_s}, **text}.items())
