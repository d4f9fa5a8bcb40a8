"""The per-utterance ASR policy (host.decoding) and the failures a session meets at its seams.

Unit tests drive :class:`UtteranceDecoder` with the real scheduler and a small real ASR model
(tests/fault_plugins.py); end to end, an in-process worker serves the same test plugins, and the
shipped engine shows that a per-session option reaches faster-whisper.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from websockets.asyncio.client import connect

from host.asr import ComponentFailure
from host.audio import AudioBuffer
from host.client import concat, read_wav, session_url, silence, stream
from host.contracts import AsrResult
from host.decoding import UtteranceDecoder
from host.endpointing import EndpointingOptions
from host.metrics import Metrics
from host.plugins import load_plugins
from host.scheduler import FINAL, Scheduler
from host.server import Worker
from host.settings import Settings
from host.vad import VadBatcher, VadStage, checked_probabilities
from host.wer import word_errors

from . import fault_plugins
from .fault_plugins import RECORDS, ScriptedAsr

COMPONENT = "asr 'scripted' (plugin test)"


@pytest.fixture
def scheduler():
    s = Scheduler()
    yield s
    s.stop()


def decoder_for(model: ScriptedAsr, scheduler: Scheduler, sent: list | None = None, **config) -> UtteranceDecoder:
    async def send(message):
        if sent is not None:
            sent.append(message)

    config = {"language": "auto", "interim_results": False, "word_timestamps": False, **config}
    return UtteranceDecoder(model, scheduler.queue_for(model.key, 1), AudioBuffer(), component=COMPONENT,
                            config=config, session_id="sess_test", recorded=False, partial_interval_s=0.5,
                            metrics=Metrics(), send=send)


def noise(seconds: float) -> np.ndarray:
    return np.random.default_rng(0).uniform(-0.1, 0.1, int(seconds * 16000)).astype(np.float32)


async def test_session_options_and_previous_text_reach_the_model(scheduler):
    model = ScriptedAsr(("scripted", "unit"), text="first words")
    decoding = decoder_for(model, scheduler, prompt="Kubernetes, kubectl")
    decoding.buffer.append(noise(2.0))
    uid = decoding.start(0)
    utterance, ticket = decoding.finalize(uid, 0, 16000)
    result = await decoding.result(uid, ticket.future)
    assert result.text == "first words 1" and utterance.end == 1.0
    decoding.previous_text = result.text  # what the session does when it delivers the final
    uid = decoding.start(16000)
    _, ticket = decoding.finalize(uid, 16000, 32000)
    await decoding.result(uid, ticket.future)
    (_, first), (_, second) = model.calls
    assert first.get("prompt") == second.get("prompt") == "Kubernetes, kubectl"
    assert first.previous_text == "" and second.previous_text == "first words 1"
    assert second.session_id == "sess_test" and second.get("language") == "auto"


async def test_a_speculative_decode_of_exactly_the_final_audio_is_reused(scheduler):
    model = ScriptedAsr(("scripted", "spec"))
    decoding = decoder_for(model, scheduler)
    decoding.buffer.append(noise(2.0))
    uid = decoding.start(0)
    decoding.pause(16000)
    speculative = decoding._speculative
    assert speculative is not None
    await speculative.ticket.future  # decoded during the pause
    _, ticket = decoding.finalize(uid, 0, 16000)
    assert ticket is speculative.ticket and len(model.calls) == 1
    uid = decoding.start(20000)
    decoding.pause(28000)
    await decoding._speculative.ticket.future
    _, ticket = decoding.finalize(uid, 20000, 30000)  # speech went on: the guess is wasted
    assert ticket is not speculative.ticket
    await ticket.future
    assert len(model.calls) == 3


class GatedAsr(ScriptedAsr):
    """A scripted model whose calls wait for ``gate`` and that takes ``sentence_end`` (recorded)."""

    def __init__(self, key: tuple):
        super().__init__(key)
        self.gate = threading.Event()
        self.asked: list[bool] = []

    def transcribe(self, audio: np.ndarray, *, sentence_end: bool = False, **kwargs) -> AsrResult:
        self.gate.wait(30)
        self.asked.append(sentence_end)
        result = super().transcribe(audio, **kwargs)
        result.sentence_end = 0.95 if sentence_end else None
        return result


async def test_the_text_checkpoint_waits_for_the_speculative_decode_only_when_a_thread_can_run_it(scheduler):
    model = GatedAsr(("scripted", "gated"))
    decoding = decoder_for(model, scheduler)
    decoding.buffer.append(noise(1.5))  # less than BULK_AHEAD_S ahead of the clock: a real-time session
    blocker = decoding.queue.submit(lambda: model.gate.wait(30), priority=FINAL, owner="another session")
    while not blocker.started:  # the only decoder thread is taken
        await asyncio.sleep(0.005)
    uid = decoding.start(0)
    decoding.pause(16000, sentence_end=True)
    # Queued behind the other session's decode: not waited for (the session's windows would stall).
    assert await decoding.speculated(16000, longest_s=30) is None
    model.gate.set()
    await blocker.future
    decoding.client_gone = True  # an upload (or a session whose client left) is never waited for
    assert await decoding.speculated(16000, longest_s=30) is None
    decoding.client_gone = False
    result = await decoding.speculated(16000, longest_s=30)  # a thread is free now: waited for
    assert result is not None and result.sentence_end == 0.95 and model.asked == [True]
    _, ticket = decoding.finalize(uid, 0, 16000)
    assert await ticket.future is result  # the same decode is the final
    assert await decoding.speculated(16000, longest_s=30) is None  # no open utterance


async def test_the_first_partial_is_decoded_before_the_utterance_opens_and_shown_after(scheduler):
    """SpeechLikely (early_partial_s of speech) starts the first partial; SpeechStart at the same
    sample adopts it, so it does not wait for min_speech_s; a blip's early decode is stale."""
    model = ScriptedAsr(("scripted", "early"), text="ask")
    sent: list[dict] = []
    decoding = decoder_for(model, scheduler, sent, interim_results=True)
    decoding.buffer.append(noise(0.4))
    alive = [True]
    decoding.likely(1600, lambda: alive[0])
    decoding.buffer.append(noise(0.15))  # the utterance opens 0.15 s of audio later
    uid = decoding.start(1600)
    for _ in range(50):
        if sent:
            break
        await asyncio.sleep(0.01)
    (partial,) = sent
    assert partial["type"] == "transcript.partial" and partial["utterance_id"] == uid
    assert partial["end"] == 0.4  # decoded up to where the speech was only likely
    assert [p for p, _ in model.calls] == [True]
    decoding.close()
    # A blip: likely, then gone before it opened. Its decode is skipped when its turn comes.
    decoding.likely(16000, lambda: alive[0])
    alive[0] = False
    decoding.buffer.append(noise(0.5))
    uid = decoding.start(12000)  # another start: the early job is withdrawn, not adopted
    await asyncio.sleep(0.05)
    assert len(model.calls) == 1 and decoding._early is None


async def test_a_failed_final_names_the_component(scheduler):
    model = ScriptedAsr(("scripted", "fails"), fail="finals")
    decoding = decoder_for(model, scheduler)
    decoding.buffer.append(noise(1.0))
    uid = decoding.start(0)
    _, ticket = decoding.finalize(uid, 0, 16000)
    failure = await decoding.result(uid, ticket.future)
    assert isinstance(failure, ComponentFailure)
    assert str(failure) == f"{COMPONENT}: transcribe raised RuntimeError: scripted final failure"
    assert decoding.all_failed() == f"asr failed on all 1 utterance: {failure}"


async def test_failed_partials_are_logged_once_per_distinct_failure(scheduler, caplog):
    model = ScriptedAsr(("scripted", "partials"), fail="partials")
    decoding = decoder_for(model, scheduler, interim_results=True)
    uid = decoding.start(0)
    with caplog.at_level(logging.WARNING, logger="host.decoding"):
        for _ in range(3):
            decoding.buffer.append(noise(1.0))
            decoding.request_partial()
            await asyncio.gather(*decoding._partial_tasks)
    assert [partial for partial, _ in model.calls] == [True, True, True]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "host.decoding"]
    assert f"utterance {uid}" in warning and "sess_test" in warning
    assert f"{COMPONENT}: transcribe raised RuntimeError: scripted partial failure" in warning


# --- end to end, with the test plugins in an in-process worker ---------------------------------------


@pytest.fixture
async def fault_worker(tmp_path):
    """An in-process worker whose engines serve the test plugins: ``engine=<fail>`` picks how its ASR
    fails, ``engine=vad-<fault>`` how its VAD breaks (after 13 s of audio)."""
    engines = tmp_path / "engines"
    engines.mkdir()
    for fail in ("never", "finals", "first_final", "partials"):
        (engines / f"{fail}.yaml").write_text(fault_plugins.engine_yaml(fail, fail=fail))
    for fault in ("count", "nan", "raise"):
        (engines / f"vad-{fault}.yaml").write_text(fault_plugins.engine_yaml(f"vad-{fault}", fault=fault,
                                                                             break_after_s=13.0))
    plugins = load_plugins(env={"ENGINE_HOST_PLUGINS": ""}, extra=[fault_plugins])
    assert plugins.errors == []
    worker = Worker(Settings(host="127.0.0.1", port=0, engines_dir=str(engines), worker_id="fault"), plugins)
    await worker.start()
    RECORDS.clear()
    try:
        yield worker
    finally:
        await worker.shutdown()


async def flushed_utterances(url: str, n: int) -> list[dict]:
    """``n`` utterances of noise, each cut by ``flush`` (the next sent after its flush.done, so after
    its final), then ``end``: every message the session sent."""
    messages: list[dict] = []
    async with connect(url) as ws:
        for _ in range(n):
            await ws.send((noise(0.5) * 32767).astype("<i2").tobytes())
            await ws.send(json.dumps({"type": "flush"}))
            while not messages or messages[-1]["type"] != "flush.done":
                messages.append(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "end"}))
        async for raw in ws:
            messages.append(json.loads(raw))
    return messages


async def record_of(session_id: str):
    """The session's SessionRecord: the session_ended hook runs after the close, so wait for it."""
    for _ in range(1000):
        found = [r for r in RECORDS if r.session_id == session_id]
        if found:
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no record of {session_id}")


def url_of(worker: Worker, engine: str, **params) -> str:
    return session_url(f"ws://127.0.0.1:{worker.port}", engine=engine, enable_vad=False, interim_results=False,
                       **params)


def component(worker: Worker, engine: str, stage: str) -> str:
    return worker.models.engines[engine].component(stage)


async def test_options_and_previous_text_reach_the_model_through_a_session(fault_worker):
    messages = await flushed_utterances(url_of(fault_worker, "never", prompt="Ada Lovelace"), 2)
    assert messages[0]["config"]["prompt"] == "Ada Lovelace"
    assert [m["text"] for m in messages if m["type"] == "transcript.final"] == ["hello world 1", "hello world 2"]
    model = fault_worker.models.engines["never"].asr.variants["fast"]
    first, second = (options for _, options in model.calls)
    assert first.get("prompt") == second.get("prompt") == "Ada Lovelace"
    assert first.session_id == second.session_id == messages[0]["session_id"]
    assert (first.previous_text, second.previous_text) == ("", "hello world 1")


async def test_every_final_failing_is_reported_per_utterance_and_recorded_as_an_error(fault_worker, caplog):
    with caplog.at_level(logging.ERROR, logger="host"):
        messages = await flushed_utterances(url_of(fault_worker, "finals"), 3)
    name = component(fault_worker, "finals", "asr")
    assert name.startswith("asr 'scripted' (plugin ")
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["utterance_id"] for e in errors] == [0, 1, 2]
    for e in errors:
        assert e["code"] == "internal_error" and e["recoverable"] is True
        assert e["message"] == (f"transcription of utterance {e['utterance_id']} failed: {name}: "
                                "transcribe raised RuntimeError: scripted final failure")
    assert messages[-1]["type"] == "session.end" and messages[-1]["segments"] == []
    session_id = messages[0]["session_id"]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and session_id in r.getMessage()]
    assert len(logged) == 3 and all(name in line and "utterance" in line for line in logged), logged
    record = await record_of(session_id)
    assert record.status == "error"
    assert record.error == f"asr failed on all 3 utterances: {name}: transcribe raised RuntimeError: scripted final failure"


async def test_a_session_with_some_finals_stays_completed(fault_worker):
    messages = await flushed_utterances(url_of(fault_worker, "first_final"), 2)
    outcomes = [(m["type"], m["utterance_id"]) for m in messages if m["type"] in ("error", "transcript.final")]
    assert outcomes == [("error", 0), ("transcript.final", 1)]
    assert messages[-1]["type"] == "session.end" and len(messages[-1]["segments"]) == 1
    record = await record_of(messages[0]["session_id"])
    assert record.status == "completed" and record.error is None


async def test_failed_partials_are_logged_and_the_finals_still_come(fault_worker, caplog, speech_by_id):
    audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.0))
    with caplog.at_level(logging.WARNING, logger="host.decoding"):
        result = await stream(session_url(f"ws://127.0.0.1:{fault_worker.port}", engine="partials"), audio, speed=None)
    assert result.finals and not result.of("transcript.partial") and not result.of("error")
    warnings = [r.getMessage() for r in caplog.records if result.end["session_id"] in r.getMessage()]
    assert len(warnings) == 1 and component(fault_worker, "partials", "asr") in warnings[0], warnings


@pytest.mark.parametrize("fault, says", [
    ("count", r"probabilities returned (\d+) probabilities for (\d+) windows"),
    ("nan", r"probabilities returned \d+ non-finite value\(s\) for \d+ windows"),
    ("raise", r"probabilities raised ValueError: cue reached"),
])
async def test_a_broken_vad_ends_the_session_with_the_finals_before_it(fault_worker, speech_by_id, fault, says):
    """The cue VAD breaks after 13 s of audio, after the first speech has been endpointed."""
    jfk = read_wav(speech_by_id["jfk"].path)
    audio = concat(silence(0.5), jfk, silence(1.5), jfk, silence(1.0))
    engine = f"vad-{fault}"
    result = await stream(session_url(f"ws://127.0.0.1:{fault_worker.port}", engine=engine), audio, speed=None)
    types = [m["type"] for m in result.messages]
    (error,) = result.of("error")
    assert error["code"] == "internal_error" and error["recoverable"] is False
    assert error["message"].startswith(component(fault_worker, engine, "vad") + ": ")
    found = re.search(says, error["message"])
    assert found and error["message"].endswith("; the session is ending"), error
    if fault == "count":
        assert int(found[1]) == int(found[2]) - 1
    assert types[-1] == "session.end" and types.index("error") < types.index("session.end")
    assert result.close_code == 1011
    finals = result.finals
    assert finals and all(f["end"] <= 13.0 for f in finals), finals
    assert [s["text"] for s in result.end["segments"]] == [f["text"] for f in finals]
    record = await record_of(result.end["session_id"])
    assert record.status == "error" and record.error == error["message"].removesuffix("; the session is ending")


async def test_a_per_session_prompt_reaches_faster_whisper(idle_worker, speech_by_id):
    """The shipped engine declares ``prompt``: session.begin echoes it, and the final still transcribes."""
    utt = speech_by_id["jfk"]
    prompt = "President Kennedy's inaugural address."
    result = await stream(session_url(idle_worker.url, prompt=prompt), concat(read_wav(utt.path), silence(1.0)),
                          speed=None)
    (begin,) = result.of("session.begin")
    assert begin["config"]["prompt"] == prompt
    assert word_errors(utt.reference, result.end["transcript"]).wer <= 0.3
    assert not result.of("error")


# --- the VAD seam ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, says", [
    (np.zeros(2), "returned 2 probabilities for 3 windows"),
    (np.zeros((3, 1)), "returned shape (3, 1) probabilities for 3 windows"),
    (["a", "b", "c"], "returned list of <U1, not numbers for 3 windows"),
    (np.array([0.1, np.inf, np.nan]), "returned 2 non-finite value(s) for 3 windows"),
])
def test_probabilities_that_break_the_contract_are_refused(answer, says):
    with pytest.raises(ComponentFailure) as failure:
        checked_probabilities(answer, 3, "vad 'x' (plugin y)")
    assert str(failure.value) == f"vad 'x' (plugin y): probabilities {says}"
    assert list(checked_probabilities([0.0, 0.5, 1.0], 3, "vad")) == [0.0, 0.5, 1.0]


class _Streams:
    """A VAD model whose streams are given by the test."""

    window_samples = 480

    def open_stream(self):
        return _Quiet()


class _Quiet:
    def probabilities(self, windows):
        return np.zeros(len(windows))


class _Broken:
    def probabilities(self, windows):
        raise ValueError("broken stream")


class _ShortBatches(_Streams):
    def run_batch(self, streams, windows):
        return []


async def test_a_broken_stream_fails_only_its_own_session():
    windows = np.zeros((3, 480), dtype=np.float32)
    with ThreadPoolExecutor(1) as executor:
        batcher = VadBatcher(_Streams(), executor)
        good, bad = await asyncio.gather(batcher.probabilities(_Quiet(), windows),
                                         batcher.probabilities(_Broken(), windows), return_exceptions=True)
    assert list(good) == [0.0, 0.0, 0.0]
    assert isinstance(bad, ValueError) and str(bad) == "broken stream"


async def test_a_batch_with_too_few_results_fails_its_sessions_instead_of_leaving_them_waiting():
    model = _ShortBatches()
    stage = VadStage(model, EndpointingOptions())
    windows = stage.take_windows(np.zeros(3 * 480, dtype=np.float32))
    with ThreadPoolExecutor(1) as executor:
        with pytest.raises(ComponentFailure) as failure:
            await stage.probabilities(windows, VadBatcher(model, executor), "vad 'short' (plugin y)")
    assert str(failure.value) == ("vad 'short' (plugin y): probabilities raised ValueError: "
                                  "run_batch returned 0 results for 1 streams")
