"""Turn-aware endpointing end to end: a real worker with the default engine (Silero VAD, Smart Turn
v3.2, faster-whisper tiny.en) on real speech, ``turn_events=true`` to see each decision."""

from __future__ import annotations

import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

from host.client import Audio, concat, read_wav, session_url, silence, stream

SR = 16000


def samples(audio: Audio) -> np.ndarray:
    return np.frombuffer(audio.pcm, "<i2")


def pcm(x: np.ndarray) -> Audio:
    return Audio(x.astype("<i2").tobytes(), SR, 1)


def loud_point(x: np.ndarray, fraction: float) -> int:
    """A sample inside a word: the 10 ms frame at ``fraction`` of the clip's loud frames (within 20 dB
    of its loudest), so that a cut there is mid-sentence and mid-word."""
    frames = x[: len(x) // 160 * 160].astype(np.float32).reshape(-1, 160)
    energy = 10 * np.log10((frames ** 2).mean(1) + 1e-9)
    loud = np.flatnonzero(energy > energy.max() - 20)
    return int(loud[int(fraction * len(loud))]) * 160


async def run(url, audio: Audio, speed: float | None = None, **params):
    return await stream(session_url(url, turn_events=True, interim_results=False, **params), audio, speed=speed)


async def test_a_finished_sentence_is_endpointed_by_the_turn_detector(idle_worker, speech_by_id):
    audio = concat(read_wav(speech_by_id["533-1066-0002"].path), silence(2.0))
    result = await run(idle_worker.url, audio)
    assert result.end["segments"], "no final"
    begin = result.messages[0]
    assert begin["config"]["endpointing"] == "turn" and begin["config"]["turn_events"] is True
    turns = result.of("turn.end")
    # The sentence's end: the detector judged it complete at a checkpoint, before the silence fallback.
    assert turns[-1]["reason"] == "turn" and turns[-1]["probability"] >= 0.5, turns
    # Every decision comes just before its speech_end, at the same time, and before its final.
    types = [m["type"] for m in result.messages]
    for turn in turns:
        k = result.messages.index(turn)
        assert types[k + 1] == "vad.speech_end" and result.messages[k + 1]["timestamp"] == turn["timestamp"]
    finals = result.of("transcript.final")
    assert finals[-1]["utterance_id"] == turns[-1]["utterance_id"]
    assert types.index("transcript.final", result.messages.index(turns[-1])) > result.messages.index(turns[-1])


async def test_a_finished_sentence_ends_at_the_text_checkpoint(idle_worker, speech_by_id):
    """The speculative decode at 0.1 s of silence reads as a finished sentence and the detector agrees:
    the turn ends there, not at the 0.3 s checkpoint (``decided_at`` is session time of the audio, so
    this holds however loaded the machine is)."""
    audio = concat(read_wav(speech_by_id["1998-15444-0003"].path), silence(2.0))
    result = await run(idle_worker.url, audio, speed=1.0)  # an upload's pauses are not read
    turn = result.of("turn.end")[-1]
    assert turn["reason"] == "turn" and turn["text"] == "finished", turn
    assert turn["decided_at"] == turn["timestamp"], turn
    speech_end = result.of("vad.speech_end")[-1]["timestamp"]
    assert speech_end == turn["timestamp"]
    final = result.of("transcript.final")[-1]
    assert final["text"].rstrip().endswith("investigation.") and final["utterance_id"] == turn["utterance_id"]


async def test_a_pause_inside_a_word_is_kept_open_where_the_silence_timer_cuts(idle_worker, speech_by_id):
    clip = samples(read_wav(speech_by_id["533-1066-0002"].path))
    cut = loud_point(clip, 0.5)
    gap = 0.8  # longer than endpoint_silence_s (0.5 s), shorter than turn_max_silence_s (1.0 s)
    spliced = concat(pcm(clip[:cut]), silence(gap), pcm(clip[cut:]), silence(2.0))
    lo, hi = cut / SR - 0.3, cut / SR + gap

    def ends_in_the_splice(result) -> list[dict]:
        return [m for m in result.of("vad.speech_end") if lo <= m["timestamp"] <= hi]

    silence_run = await run(idle_worker.url, spliced, endpointing="silence")
    assert ends_in_the_splice(silence_run), "the silence timer should cut a 0.8 s pause"
    assert all(t["reason"] == "silence" and t["probability"] is None and t["text"] is None
               for t in silence_run.of("turn.end"))

    turn_run = await run(idle_worker.url, spliced)
    assert not ends_in_the_splice(turn_run), (turn_run.of("turn.end"), cut / SR)
    # One final spans the splice: the words on both sides of the pause were decoded together.
    assert any(s["start"] < lo and s["end"] > hi for s in turn_run.end["segments"]), turn_run.end["segments"]


async def test_endpointing_silence_reproduces_the_silence_timer(idle_worker, speech_by_id):
    """endpointing=silence: the engine's fixed silence (with its longer wait for short utterances);
    each utterance ends at its last speech + post-roll, never by the detector."""
    audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.5))
    result = await run(idle_worker.url, audio, endpointing="silence")
    assert result.messages[0]["config"]["endpointing"] == "silence"
    assert [t["reason"] for t in result.of("turn.end")] == ["silence"] * len(result.of("turn.end")) != []
    assert result.end["transcript"].lower().startswith("and so my fellow americans")


async def test_silence_ms_and_eagerness_are_validated(idle_worker):
    for query, param in (({"endpointing": "sometimes"}, "endpointing"), ({"eagerness": "eager"}, "eagerness"),
                         ({"silence_ms": "50"}, "silence_ms")):
        async with connect(session_url(idle_worker.url, **query)) as ws:
            error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["code"] == "invalid_config" and error.get("param") == param, error


async def test_config_changes_endpointing_mid_session(idle_worker, speech_by_id):
    clip = read_wav(speech_by_id["533-1066-0002"].path)
    async with connect(session_url(idle_worker.url, turn_events=True, interim_results=False)) as ws:
        begin = json.loads(await ws.recv())
        assert begin["config"]["endpointing"] == "turn"
        await ws.send(json.dumps({"type": "config", "endpointing": "silence", "silence_ms": 300}))
        await ws.send(json.dumps({"type": "config", "eagerness": "sometimes"}))
        error = json.loads(await ws.recv())
        assert error["code"] == "invalid_config" and error["param"] == "eagerness" and error["recoverable"]
        await ws.send(json.dumps({"type": "config", "enable_vad": False}))
        error = json.loads(await ws.recv())
        assert error["param"] == "'enable_vad'", error
        for k in range(0, len(clip.pcm), 6400):
            await ws.send(clip.pcm[k:k + 6400])
        await ws.send(silence(1.0).pcm)
        await ws.send(json.dumps({"type": "end"}))
        messages = [json.loads(m) async for m in ws]
    reasons = [m["reason"] for m in messages if m["type"] == "turn.end"]
    assert reasons and set(reasons) == {"silence"} | ({"flush"} & set(reasons)), reasons


@pytest.mark.parametrize("eagerness", ["low", "high"])
async def test_eagerness_is_echoed(idle_worker, eagerness):
    async with connect(session_url(idle_worker.url, eagerness=eagerness)) as ws:
        begin = json.loads(await ws.recv())
    assert begin["config"]["eagerness"] == eagerness
