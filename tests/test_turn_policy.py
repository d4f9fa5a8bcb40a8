"""Turn-aware endpointing on probability sequences: checkpoints, decisions, the silence fallback,
eagerness, and the turn batcher's contract checks (the real detector is tested in plugins/turn_smart)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from host.asr import ComponentFailure
from host.compat.deepgram import DeepgramDialect
from host.compat.elevenlabs import ElevenLabsDialect
from host.compat.openai_realtime import OpenAIRealtimeDialect
from host.contracts import AsrResult
from host.endpointing import Endpointer, EndpointingOptions, SpeechEnd, SpeechLikely, SpeechPause, SpeechResume, SpeechStart, TurnCheck
from host.turn import TurnBatcher
from host.turn_text import TextVerdict, read

W = 512  # 32 ms windows
SR = 16000
OPTIONS = EndpointingOptions(postroll_s=0.2, endpoint_silence_s=0.5, short_utterance_s=2.0,
                             short_endpoint_silence_s=1.0, turn_checkpoints_s=(0.1, 0.2, 0.3),
                             turn_threshold=0.5, turn_max_silence_s=1.5, turn_text_checkpoints_s=())
"""The detector alone (no text checkpoint): the tests of the acoustic policy."""


def windows(seconds: float) -> int:
    return round(seconds * SR / W)


def run(probs, answer, options=OPTIONS, eagerness="auto"):
    """Endpoint ``probs``; each TurnCheck is answered with ``answer(check)`` at once (as the session does)."""
    ep = Endpointer(options, W, options.turn_policy(eagerness))
    events = []
    for p in probs:
        for event in ep.push(p):
            if isinstance(event, SpeechLikely):
                continue  # a first partial's business (tests/test_endpointing.py)
            events.append(event)
            if isinstance(event, TurnCheck):
                given = answer(event)
                events.extend(ep.decide(event, *(given if isinstance(given, tuple) else (given,))))
    return ep, events


SPEECH = [0.9] * windows(1.0)


def test_complete_turn_ends_at_the_first_checkpoint_before_the_silence_timer():
    _, events = run(SPEECH + [0.0] * windows(2.0), lambda check: 0.9)
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStart, SpeechPause, TurnCheck, SpeechEnd]
    pause, check, end = events[1], events[2], events[3]
    assert end.reason == "turn" and end.sample == pause.sample == check.end
    # It ended 0.1 s into the pause: the silence timer alone would have waited 1.0 s (a short utterance).
    speech_end = windows(1.0) * W
    assert check.sample - speech_end < int(0.5 * SR)


def test_incomplete_turn_waits_for_the_maximum_silence_and_asks_at_each_checkpoint():
    _, events = run(SPEECH + [0.0] * windows(2.0), lambda check: 0.1)
    checks = [e for e in events if isinstance(e, TurnCheck)]
    assert len(checks) == 3
    end = next(e for e in events if isinstance(e, SpeechEnd))
    assert end.reason == "silence"
    assert end.sample == events[1].sample  # the speculated end, so the speculative decode is reused
    # Nothing ended it before turn_max_silence_s of silence had passed.
    assert [type(e) for e in events][-1] is SpeechEnd


def test_a_pause_inside_the_sentence_is_not_cut_when_speech_resumes():
    probs = SPEECH + [0.0] * windows(0.4) + SPEECH + [0.0] * windows(2.0)
    answers = iter([0.2, 0.3, 0.4, 0.9])  # unsure in the mid-sentence pause, sure at the end
    _, events = run(probs, lambda check: next(answers))
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStart, SpeechPause, TurnCheck, TurnCheck, TurnCheck, SpeechResume,
                     SpeechPause, TurnCheck, SpeechEnd]
    assert events[-1].reason == "turn"


def test_an_answer_about_a_resumed_pause_is_void():
    ep = Endpointer(OPTIONS, W, OPTIONS.turn_policy())
    for p in SPEECH:
        ep.push(p)
    check = None
    while check is None:
        check = next((e for e in ep.push(0.0) if isinstance(e, TurnCheck)), None)
    assert any(isinstance(e, SpeechResume) for e in ep.push(0.9))
    assert ep.decide(check, 1.0) == []  # late: speech came back
    assert ep.in_speech


def test_no_answer_falls_back_to_the_silence_timer():
    """A pause the detector does not answer (shed, or it failed) ends by the silence timer, sooner than
    the turn policy's maximum silence."""
    def windows_until_end(answer, speech_s=3.0):
        ep = Endpointer(OPTIONS, W, OPTIONS.turn_policy())
        for n, p in enumerate([0.9] * windows(speech_s) + [0.0] * windows(2.0)):
            for event in ep.push(p):
                if isinstance(event, TurnCheck):
                    assert ep.decide(event, answer) == []
                if isinstance(event, SpeechEnd):
                    assert event.reason == "silence"
                    return n - windows(speech_s)
        raise AssertionError("never ended")

    unanswered, incomplete = windows_until_end(None), windows_until_end(0.1)
    assert abs(unanswered - windows(OPTIONS.endpoint_silence_s)) <= 1  # 3 s of speech: not a short utterance
    assert unanswered < incomplete


@pytest.mark.parametrize("eagerness, p, ends_by", [("high", 0.35, "turn"), ("medium", 0.35, "silence"),
                                                   ("low", 0.65, "silence"), ("medium", 0.65, "turn")])
def test_eagerness_moves_the_threshold(eagerness, p, ends_by):
    _, events = run(SPEECH + [0.0] * windows(3.5), lambda check: p, eagerness=eagerness)
    assert next(e for e in events if isinstance(e, SpeechEnd)).reason == ends_by


def test_eagerness_scales_the_maximum_silence():
    def windows_until_end(eagerness):
        ep = Endpointer(OPTIONS, W, OPTIONS.turn_policy(eagerness))
        for n, p in enumerate(SPEECH + [0.0] * windows(3.5)):
            for event in ep.push(p):
                if isinstance(event, TurnCheck):
                    assert ep.decide(event, 0.0) == []
                if isinstance(event, SpeechEnd):
                    assert event.reason == "silence"
                    return n
        raise AssertionError("never ended")

    assert windows_until_end("high") < windows_until_end("medium") < windows_until_end("low")
    assert windows_until_end("auto") == windows_until_end("medium")


def test_silence_endpointing_is_unchanged_without_a_policy():
    ep = Endpointer(OPTIONS, W)
    events = [e for p in SPEECH + [0.0] * windows(2.0) for e in ep.push(p)]
    assert not any(isinstance(e, TurnCheck) for e in events)
    end = next(e for e in events if isinstance(e, SpeechEnd))
    assert end.reason == "silence" and end.sample == windows(1.0) * W + int(0.2 * SR)


def test_silence_ms_overrides_the_short_utterance_rule():
    options = OPTIONS.with_silence(0.3)
    assert options.endpoint_silence_for(0.5) == options.endpoint_silence_for(5.0) == 0.3


class _Detector:
    def __init__(self, answers):
        self.answers = answers
        self.batches: list[int] = []

    def probability(self, audio):
        return self.answers(audio)

    def probabilities(self, audios):
        self.batches.append(len(audios))
        return [self.answers(a) for a in audios]


async def test_turn_batcher_answers_each_session_and_batches_concurrent_checks():
    detector = _Detector(lambda audio: float(audio[0]))
    with ThreadPoolExecutor(1) as pool:
        batcher = TurnBatcher(detector, pool, "turn 'fake'", max_batch=16, max_waiting=16)
        got = await asyncio.gather(*(batcher.probability(np.full(160, k / 10, np.float32)) for k in range(5)))
    assert got == pytest.approx([k / 10 for k in range(5)])
    assert batcher.checks == 5 and max(detector.batches) > 1  # the later four waited for the first and went together


async def test_turn_batcher_sheds_checks_beyond_its_queue():
    """Under load a check is not queued behind many others: it gets no answer (the silence timer ends
    that pause) instead of stalling its session."""
    with ThreadPoolExecutor(1) as pool:
        batcher = TurnBatcher(_Detector(lambda audio: 0.9), pool, "turn 'fake'", max_batch=2, max_waiting=3)
        got = await asyncio.gather(*(batcher.probability(np.zeros(160, np.float32)) for _ in range(5)))
    assert got == [0.9, 0.9, 0.9, None, None] and batcher.shed == 2 and batcher.checks == 3


@pytest.mark.parametrize("bad, says", [(lambda a: float("nan"), "not a number in [0, 1]"),
                                       (lambda a: 1.5, "not a number in [0, 1]"),
                                       (lambda a: "yes", "not a number"),
                                       (lambda a: 1 / 0, "ZeroDivisionError")])
async def test_turn_batcher_refuses_what_is_not_a_probability(bad, says):
    with ThreadPoolExecutor(1) as pool:
        batcher = TurnBatcher(_Detector(bad), pool, "turn 'fake'")
        with pytest.raises(ComponentFailure, match="turn 'fake'") as caught:
            await batcher.probability(np.zeros(160, np.float32))
    assert says in str(caught.value)


# --- the vendors' turn settings → native endpointing (docs/protocol.md, "Endpointing") ----------

def _openai_update(dialect, turn_detection):
    natives, replies = dialect.incoming(json.dumps({"type": "session.update", "session": {
        "type": "transcription", "audio": {"input": {"turn_detection": turn_detection}}}}))
    return [n for n in natives if n.get("type") == "config"], replies


def test_openai_turn_detection_selects_the_native_policy():
    dialect = OpenAIRealtimeDialect()
    native = dialect.configure({"intent": "transcription"}, {})
    assert (native["endpointing"], native["silence_ms"]) == ("silence", "500")  # OpenAI's default: server_vad
    configs, _ = _openai_update(dialect, {"type": "semantic_vad", "eagerness": "high"})
    assert configs == [{"type": "config", "endpointing": "turn", "eagerness": "high"}]
    configs, _ = _openai_update(dialect, {"type": "server_vad", "silence_duration_ms": 300})
    assert configs == [{"type": "config", "endpointing": "silence", "silence_ms": 300}]
    configs, _ = _openai_update(dialect, {"type": "semantic_vad"})
    assert configs == [{"type": "config", "endpointing": "turn", "eagerness": "auto"}]
    configs, _ = _openai_update(dialect, None)  # manual commits: the native VAD still cuts
    assert configs == []
    configs, replies = _openai_update(dialect, {"type": "semantic_vad", "eagerness": "eager"})
    assert configs == [] and replies[0]["type"] == "error"
    assert replies[0]["error"]["param"] == "session.audio.input.turn_detection.eagerness"


def test_elevenlabs_vad_commits_use_the_turn_detector_unless_a_silence_is_given():
    assert "endpointing" not in ElevenLabsDialect().configure({"commit_strategy": "vad"}, {})
    native = ElevenLabsDialect().configure({"commit_strategy": "vad", "vad_silence_threshold_secs": "0.8"}, {})
    assert (native["endpointing"], native["silence_ms"]) == ("silence", "800")
    assert "endpointing" not in ElevenLabsDialect().configure({"vad_silence_threshold_secs": "0.8"}, {})  # manual


def test_deepgram_endpointing_milliseconds_select_the_silence_timer():
    def native(**query):
        dialect = DeepgramDialect()
        dialect.configure({"encoding": "linear16", "sample_rate": "16000", **query}, {})
        return dialect._native

    assert "endpointing" not in native() and "endpointing" not in native(endpointing="true")
    assert (native(endpointing="300")["endpointing"], native(endpointing="300")["silence_ms"]) == ("silence", "300")
    assert native(endpointing="10")["silence_ms"] == "100"  # held to the native minimum
    assert "endpointing" not in native(endpointing="false")


def test_the_speculative_decode_starts_at_the_post_roll_before_a_later_checkpoint():
    options = EndpointingOptions(postroll_s=0.2, turn_checkpoints_s=(0.3,), turn_max_silence_s=1.0,
                                 turn_text_checkpoints_s=())
    _, events = run(SPEECH + [0.0] * windows(1.5), lambda check: 0.9, options=options)
    assert [type(e) for e in events] == [SpeechStart, SpeechPause, TurnCheck, SpeechEnd]
    speech_end = windows(1.0) * W
    pause, check, end = events[1:]
    assert pause.sample == end.sample == speech_end + int(0.2 * SR)  # the silence timer's end, decoded early
    assert check.sample - speech_end >= int(0.3 * SR) > pause.sample - speech_end


def test_eagerness_scales_the_checkpoints():
    checkpoints = {e: OPTIONS.turn_policy(e).checkpoints_s for e in ("high", "medium", "low")}
    assert checkpoints["high"][0] < checkpoints["medium"][0] < checkpoints["low"][0]


def test_feed_answers_each_check_before_the_windows_after_it():
    """VadStage.feed takes the session's steps: a TurnCheck answered complete ends the utterance at
    once, inside the frame, and the frame's later windows are endpointed after that end."""
    from host.vad import VadStage

    class Loud:  # speech where the audio is loud
        window_samples = W

        def open_stream(self):
            return self

        def probabilities(self, windows):
            return (np.abs(windows).max(axis=1) > 0.1).astype(np.float32)

        def reset(self):
            pass

    audio = np.concatenate([np.full(SR, 0.5, np.float32), np.zeros(2 * SR, np.float32)])
    vad = VadStage(Loud(), OPTIONS, OPTIONS.turn_policy())
    asked: list[TurnCheck] = []
    events = vad.feed(audio, lambda check: asked.append(check) or 0.9)  # one frame, 3 s
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert len(asked) == 1 and [e.reason for e in ends] == ["turn"] and ends[0].sample == asked[0].end
    assert events.index(ends[0]) == events.index(asked[0]) + 1 and vad.resets == 1


# --- text checkpoints: the speculative decode's verdict beside the detector -----------------------------

TEXT = EndpointingOptions(postroll_s=0.2, endpoint_silence_s=0.5, turn_checkpoints_s=(0.3,), turn_threshold=0.5,
                          turn_max_silence_s=1.0, turn_text_checkpoints_s=(0.1,), turn_sentence_end=0.9)
"""The shipped shape: a text checkpoint at 0.1 s, the detector alone at 0.3 s, 1.0 s at most."""


def answers(detector: float, verdict: TextVerdict | None, later: float | None = None):
    """Answer each check: the detector's ``detector`` (``later`` after the first) and, at a text
    checkpoint, ``verdict``."""
    def answer(check: TurnCheck):
        return (detector, verdict) if check.text else (detector if later is None else later)
    return answer


def ended(events) -> tuple[SpeechEnd, list[TurnCheck]]:
    checks = [e for e in events if isinstance(e, TurnCheck)]
    return next(e for e in events if isinstance(e, SpeechEnd)), checks


def test_a_finished_sentence_ends_the_turn_at_the_text_checkpoint():
    _, events = run(SPEECH + [0.0] * windows(2.0), answers(0.9, TextVerdict.FINISHED), TEXT)
    end, checks = ended(events)
    assert end.reason == "turn" and [c.text for c in checks] == [True]
    pause = next(e for e in events if isinstance(e, SpeechPause))
    # The pause (and so the speculative decode the verdict came from) starts at the text checkpoint,
    # sooner than the post-roll, and the utterance ends exactly there: the decode is its final.
    assert end.sample == pause.sample == checks[0].end
    assert checks[0].sample - windows(1.0) * W <= int(0.1 * SR) + W


@pytest.mark.parametrize("verdict", [TextVerdict.UNSURE, None])
def test_without_a_finished_sentence_the_text_checkpoint_does_not_end_the_turn(verdict):
    _, events = run(SPEECH + [0.0] * windows(2.0), answers(0.9, verdict), TEXT)
    end, checks = ended(events)
    assert end.reason == "turn" and [c.text for c in checks] == [True, False]  # ended by the 0.3 s check
    assert end.sample == checks[0].end


def test_a_detector_not_asked_at_the_text_checkpoint_leaves_the_pause_to_the_later_checkpoints():
    """The session asks the detector at a text checkpoint only about a finished sentence; no answer
    there is not a failed check (which would hand the pause to the silence timer)."""
    _, events = run(SPEECH + [0.0] * windows(2.0), answers(None, TextVerdict.UNSURE, later=0.9), TEXT)
    end, checks = ended(events)
    assert end.reason == "turn" and [c.text for c in checks] == [True, False]


def test_a_finished_sentence_still_needs_the_detector():
    _, events = run(SPEECH + [0.0] * windows(2.0), answers(0.2, TextVerdict.FINISHED, later=0.9), TEXT)
    end, checks = ended(events)
    assert end.reason == "turn" and len(checks) == 2


def test_an_unfinished_sentence_waits_for_the_maximum_silence_whatever_the_detector_says():
    _, events = run(SPEECH + [0.0] * windows(2.0), answers(1.0, TextVerdict.UNFINISHED), TEXT)
    end, checks = ended(events)
    # No detector check after the verdict: the silence timer (the policy's 1.0 s maximum) ended it.
    assert end.reason == "silence" and len(checks) == 1 and end.sample == checks[0].end
    _, unheld = run(SPEECH + [0.0] * windows(2.0), answers(1.0, TextVerdict.UNFINISHED),
                    EndpointingOptions(**{**TEXT.__dict__, "turn_hold_unfinished": False}))
    assert ended(unheld)[0].reason == "turn" and len(ended(unheld)[1]) == 2  # without the hold: at 0.3 s


def test_an_unfinished_pause_that_speech_resumes_does_not_hold_the_next():
    probs = SPEECH + [0.0] * windows(0.5) + SPEECH + [0.0] * windows(2.0)
    verdicts = iter([TextVerdict.UNFINISHED, TextVerdict.FINISHED])
    _, events = run(probs, lambda check: (0.9, next(verdicts)) if check.text else 0.9, TEXT)
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStart, SpeechPause, TurnCheck, SpeechResume, SpeechPause, TurnCheck, SpeechEnd]
    assert events[-1].reason == "turn"


def test_eagerness_scales_the_text_checkpoints():
    assert [TEXT.turn_policy(e).schedule() for e in ("high", "medium", "low")] == [
        [(0.05, True), (0.15, False)], [(0.1, True), (0.3, False)], [(0.2, True), (0.6, False)]]
    assert not EndpointingOptions(turn_text_checkpoints_s=()).turn_policy().consults_text


@pytest.mark.parametrize("text, p, language, verdict", [
    ("I could not help it.", 0.95, "en", TextVerdict.FINISHED),
    ("Was it you?", 0.93, None, TextVerdict.FINISHED),
    ("I could not help it.", 0.6, "en", TextVerdict.UNSURE),  # punctuated, but the model was not sure
    ("I could not help it.", None, "en", TextVerdict.UNSURE),  # a model that cannot say
    ("when he came in,", 0.99, "en", TextVerdict.UNFINISHED),
    ("and then...", 0.99, "en", TextVerdict.UNFINISHED),
    ("and then", 0.99, "en", TextVerdict.UNFINISHED),  # no closing punctuation
    ("he looked at the.", 0.99, "en", TextVerdict.UNFINISHED),  # a sentence rarely ends on "the"
    ("Sie sah die.", 0.99, "de", TextVerdict.FINISHED),  # the English word list is for English only
    ("\"Go home.\"", 0.95, "en", TextVerdict.FINISHED),
    ("", 0.99, "en", TextVerdict.UNSURE),
])
def test_how_a_decode_reads(text, p, language, verdict):
    assert read(AsrResult(text, language=language, sentence_end=p), 0.9) is verdict


def test_no_decode_reads_as_unsure():
    assert read(None, 0.9) is TextVerdict.UNSURE
