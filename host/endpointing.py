"""Endpointing: the SILENCE ⇄ SPEECH state machine that turns speech probabilities into utterances.

The host owns it, so every VAD plugin gets the same tested behaviour and only has
to produce a probability per window. Its options (:mod:`host.endpointing_options`) live in the
``vad`` stage's ``options`` of ``engine.yaml`` next to the plugin's own options.

Positions are session sample indices at 16 kHz.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from host.contracts import SAMPLE_RATE
from host.endpointing_options import EndpointingOptions, TurnPolicy
from host.turn_text import TextVerdict


@dataclass(frozen=True)
class SpeechStart:
    sample: int
    """Where the utterance begins (pre-roll included)."""
    onset: int | None = None
    """Where the VAD heard its speech begin (None: at ``sample``, as after a cut)."""


@dataclass(frozen=True)
class SpeechEnd:
    sample: int
    """Where the utterance ends (exclusive)."""
    reason: str
    """``silence``, ``turn`` (the turn detector judged the turn complete), ``max_length``, ``flush``
    or ``clear``."""
    heard: int | None = None
    """Where the VAD last heard speech, post-roll not included (None: at ``sample``)."""
    decided: int | None = field(default=None, compare=False)
    """How much audio had been heard when the end was decided (the checkpoint, or where the silence
    timer ran out): ``decided - heard`` is the silence the endpoint waited for."""


@dataclass(frozen=True)
class SpeechLikely:
    """Speech began at ``sample`` (pre-roll included) but is shorter than ``min_speech_s`` yet: the
    utterance probably opens there (a :class:`SpeechStart` at the same sample), or it is a blip."""

    sample: int


@dataclass(frozen=True)
class SpeechPause:
    """Speech paused long enough to guess the utterance ends at ``sample`` (the SpeechEnd it would
    get if no speech resumes before the endpoint)."""

    sample: int


@dataclass(frozen=True)
class SpeechResume:
    """Speech came back after a :class:`SpeechPause`, at ``sample``: the end that pause guessed is void."""

    sample: int


@dataclass(frozen=True)
class TurnCheck:
    """Speech paused for a checkpoint's silence (endpointing=turn): ask the turn detector whether the
    turn is complete, on the audio of the open utterance up to ``sample``, and answer with
    :meth:`Endpointer.decide`. The endpointer waits for the answer before its next window."""

    sample: int
    """The position of the check (the end of the audio the detector hears)."""
    end: int
    """Where the utterance ends if the turn is complete (the pause's SpeechPause sample)."""
    pause: int
    """Which pause of the utterance this is (a resumed pause voids its checks)."""
    text: bool = False
    """A text checkpoint: a complete answer ends the turn only if the speculative decode ending at
    ``end`` reads as a finished sentence; the answer must bring that verdict (the first of a pause)."""


Event = SpeechStart | SpeechEnd | SpeechLikely | SpeechPause | SpeechResume | TurnCheck

_SILENCE, _PENDING, _SPEECH = "silence", "pending", "speech"
_CUT_SEARCH_S = 3.0


class Endpointer:
    """Consumes one probability per window, in order, and emits speech events."""

    def __init__(self, options: EndpointingOptions, window_samples: int, turn: TurnPolicy | None = None):
        self.window = window_samples
        self.configure(options, turn)
        self._paused = False
        self._checked = 0  # checkpoints of the current pause the turn detector was asked at
        self._verdict: TextVerdict | None = None  # what the current pause's speculative decode read as
        self._unanswered = False  # the detector gave no answer in this pause: the silence timer ends it
        self._pause_no = 0  # counts pauses, so that an answer about a resumed pause is void
        self._pause_end = 0
        self.position = 0
        """Samples consumed so far."""
        self._state = _SILENCE
        self._likely = False  # SpeechLikely was emitted for the pending speech
        self._floor = 0  # no utterance may start before the end of the previous one
        self._onset = 0
        self._speech_samples = 0
        self._silence_run = 0
        self._last_speech_end = 0
        self._start = 0
        self._recent: list[tuple[int, float]] = []  # (window start, prob) of the open utterance

    def configure(self, options: EndpointingOptions, turn: TurnPolicy | None = None) -> None:
        """Use ``options`` and, with a turn detector, ``turn`` (None: the silence timer) from the next
        window on (a session may change its endpointing mid-stream)."""
        self.options = options
        self.turn = turn
        neg = options.neg_threshold
        self._neg = max(0.0, options.threshold - 0.15) if neg is None else min(neg, options.threshold)
        s = SAMPLE_RATE
        self._endpoint = int(options.endpoint_silence_s * s)
        self._preroll = int(options.preroll_s * s)
        self._postroll = int(options.postroll_s * s)
        self._min_speech = int(options.min_speech_s * s)
        self._early = int(options.early_partial_s * s)
        self._max_len = int(options.max_utterance_s * s)
        self._speculate = int(max(options.speculate_after_s, options.postroll_s) * s) if options.speculate_after_s else 0
        self._checkpoints = [(int(c * s), text) for c, text in turn.schedule()] if turn is not None else []

    @property
    def in_speech(self) -> bool:
        """True while an utterance is open (speech_start was emitted)."""
        return self._state == _SPEECH

    @property
    def pending(self) -> bool:
        """True while speech has begun but is not yet an utterance (``min_speech_s``)."""
        return self._state == _PENDING

    @property
    def utterance_start(self) -> int | None:
        return self._start if self._state == _SPEECH else None

    def earliest_needed_sample(self) -> int:
        """Audio before this sample can never become part of an utterance and may be dropped."""
        if self._state == _SPEECH:
            return self._start
        if self._state == _PENDING:
            return max(self._floor, self._onset - self._preroll)
        return max(self._floor, self.position - self._preroll)

    def push(self, probability: float) -> list[Event]:
        """Advance by one window with the given speech probability."""
        pos = self.position
        end = pos + self.window
        self.position = end
        p = float(probability)
        events: list[Event] = []
        if self._state == _SILENCE:
            if p >= self.options.threshold:
                self._state = _PENDING
                self._likely = False
                self._onset = pos
                self._speech_samples = self.window
                self._silence_run = 0
                self._last_speech_end = end
                self._maybe_confirm(events)
        elif self._state == _PENDING:
            self._track(p, end)
            if self._silence_run >= self._endpoint:
                self._state = _SILENCE  # a blip shorter than min_speech_s
            else:
                self._maybe_confirm(events)
        else:
            self._recent.append((pos, p))
            self._track(p, end)
            if self._silence_run == 0 and self._paused:
                self._paused, self._checked, self._unanswered, self._verdict = False, 0, False, None
                self._pause_no += 1
                events.append(SpeechResume(pos))
            if self._silence_run >= self._endpoint_silence():
                last = min(self._last_speech_end + self._postroll, end)
                events.append(self._close(self._pause_end if self.turn and self._paused else last, "silence"))
            elif end - self._start >= self._max_len:
                cut = self._cut_point(end)
                kept = [(s, q) for s, q in self._recent if s >= cut]
                events.append(self._close(cut, "max_length"))
                self._open(cut, events)
                self._recent = kept
            elif self.turn is not None:
                self._checkpoint(end, events)
            elif (self._speculate and not self._paused and self._silence_run
                  and end - self._last_speech_end >= self._speculate + self._endpoint_silence() - self._endpoint):
                self._paused = True
                events.append(SpeechPause(self._last_speech_end + self._postroll))
        return events

    def decide(self, check: TurnCheck, probability: float | None, text: TextVerdict | None = None) -> list[Event]:
        """The turn detector's answer to ``check``, and at a text checkpoint what the speculative
        decode read as: a complete turn ends the utterance at the pause (at a text checkpoint only
        with a finished sentence); an unfinished one (with ``hold_unfinished``) leaves the pause to
        the maximum silence. An answer about a pause that speech has since resumed is void. None (no
        answer: the check was shed under load, or the detector failed) leaves the pause to the
        silence timer."""
        if self.turn is None or self._state != _SPEECH or not self._paused or check.pause != self._pause_no:
            return []
        if text is not None and self._verdict is None:
            self._verdict = text
        if self.held_open:
            return []
        if check.text and self._verdict is not TextVerdict.FINISHED:
            return []  # the detector need not be asked: the later checkpoints decide
        if probability is None:
            self._unanswered = True
            return []
        if probability < self.turn.threshold:
            return []
        return [self._close(check.end, "turn")]

    @property
    def verdict(self) -> TextVerdict | None:
        """How the current pause's speculative decode read (None: not read); kept until the next
        utterance opens or speech resumes, so the end it caused can report it."""
        return self._verdict

    @property
    def held_open(self) -> bool:
        """Whether the current pause is held to the maximum silence (its decode read as unfinished)."""
        return self._verdict is TextVerdict.UNFINISHED and self.turn is not None and self.turn.hold_unfinished

    def _checkpoint(self, end: int, events: list[Event]) -> None:
        """At ``postroll_s`` of silence (or the first checkpoint, if sooner) start the speculative
        decode of the utterance as it would end there; ask the turn detector when the pause reaches
        its next checkpoint."""
        if not self._silence_run:
            return
        silence = end - self._last_speech_end
        if not self._paused and silence >= min(self._postroll, self._checkpoints[0][0]):
            self._paused = True
            self._pause_end = min(self._last_speech_end + self._postroll, end)
            events.append(SpeechPause(self._pause_end))
        if self._paused and self._checked < len(self._checkpoints) and silence >= self._checkpoints[self._checked][0]:
            text = self._checkpoints[self._checked][1]
            self._checked += 1
            if not self.held_open:  # an unfinished sentence: no checkpoint can end this pause
                events.append(TurnCheck(end, self._pause_end, self._pause_no, text))

    def flush(self, upto: int = 0) -> list[Event]:
        """Finalize whatever speech is open or pending, as if an endpoint were detected.

        ``upto`` lets the caller include audio it holds beyond the last whole window.
        """
        events: list[Event] = []
        if self._state == _PENDING:
            self._open(max(self._floor, self._onset - self._preroll), events, self._onset)
        if self._state == _SPEECH:
            events.append(self._close(max(self.position, upto), "flush"))
        return events

    def clear(self) -> list[Event]:
        """Drop the open utterance without finalizing it. Returns the SpeechEnd that closes it, if any."""
        events: list[Event] = []
        if self._state == _SPEECH:
            events.append(self._close(self.position, "clear"))
        self._state = _SILENCE
        # Never lower the floor: a flush may have closed an utterance past the last whole window.
        self._floor = max(self._floor, self.position)
        return events

    def _endpoint_silence(self) -> int:
        """Samples of silence that end the open utterance: the turn policy's maximum (the silence
        timer's, if shorter, for a pause the detector did not answer), else
        :meth:`EndpointingOptions.endpoint_silence_for`. Speculation is pushed back by as much as
        this exceeds ``endpoint_silence_s``."""
        speech_s = (self._last_speech_end - self._start) / SAMPLE_RATE
        silence = int(self.options.endpoint_silence_for(speech_s) * SAMPLE_RATE)
        if self.turn is None:
            return silence
        longest = int(self.turn.max_silence_s * SAMPLE_RATE)
        return min(silence, longest) if self._unanswered else longest

    def _track(self, p: float, end: int) -> None:
        if p >= self.options.threshold:
            self._speech_samples += self.window
            self._silence_run = 0
            self._last_speech_end = end
        elif p < self._neg:
            self._silence_run += self.window

    def _maybe_confirm(self, events: list[Event]) -> None:
        start = max(self._floor, self._onset - self._preroll)
        if self._speech_samples >= self._min_speech:
            self._open(start, events, self._onset)
        elif self._early and not self._likely and self._speech_samples >= self._early:
            self._likely = True
            events.append(SpeechLikely(start))

    def _open(self, start: int, events: list[Event], onset: int | None = None) -> None:
        self._state = _SPEECH
        self._paused, self._checked, self._unanswered, self._verdict = False, 0, False, None
        self._pause_no += 1
        self._start = start
        self._silence_run = 0
        events.append(SpeechStart(start, onset))

    def _close(self, end: int, reason: str) -> SpeechEnd:
        end = max(end, self._start + 1)
        self._state = _SILENCE
        self._floor = end
        self._recent = []
        paused = reason in ("silence", "turn")  # a cut (length, flush) ends where speech may go on
        return SpeechEnd(end, reason, min(max(self._last_speech_end, self._start + 1), end) if paused else None,
                         max(self.position, end))

    def _cut_point(self, end: int) -> int:
        """Where to cut an over-long utterance: its quietest window in the last few seconds."""
        lo = end - int(_CUT_SEARCH_S * SAMPLE_RATE)
        candidates = [(p, s) for s, p in self._recent if s >= max(lo, self._start + self.window)]
        if not candidates:
            return end
        _, start = min(candidates)
        return start
