"""Batched ASR in the inference scheduler (contract v2 ``transcribe_many``), with the real tiny.en model.

The test model is a real component: each request of a batch is decoded by the faster-whisper variant
the host loads from engines.d. Batches are made deterministic by causality (a call that waits on an
event until the test has queued what must follow, or jobs queued before the queue starts), never by
timing.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from engine_host_asr_faster_whisper import OPTIONS_SCHEMA as WHISPER_OPTIONS
from engine_host_asr_faster_whisper import build as build_whisper
from host.asr import DEFAULT_MAX_BATCH, AsrCall, ComponentFailure
from host.client import concat, read_wav, session_url, silence, stream
from host.contracts import AsrModel, AsrResult, SessionOptions, TranscribeRequest
from host.engines import load_engines
from host.hookspecs import hookimpl
from host.models import ModelManager
from host.plugins import load_plugins
from host.scheduler import FINAL, PARTIAL, InferenceQueue
from host.server import Worker
from host.settings import Settings
from host.wer import word_errors

from .support import ENGINES

COMPONENT = "asr 'batched-whisper' (plugin tests.test_batching)"
SHORT = ["1688-142285-0002", "1688-142285-0008", "1688-142285-0009", "533-1066-0006", "librivox-sas01-0930",
         "533-1066-0009"]
"""Short utterances tiny.en decodes well, each with different words (so a result in the wrong future shows)."""


class BatchingWhisper:
    """A contract-v2 ASR model with ``transcribe_many``: a real faster-whisper variant decodes each
    request. It records the batches (request tags: ``options.session_id``) and single calls it
    is given, and follows a plan per batch call: wait on an event, ``"raise"``, or ``"short"``
    (one result too few)."""

    def __init__(self, inner: Any, *, max_batch: int = DEFAULT_MAX_BATCH, parallelism: int | None = None):
        self.inner = inner
        self.key = inner.key
        self.parallelism = parallelism or inner.parallelism
        self.languages = inner.languages
        self.max_batch = max_batch
        self.batches: list[list[str]] = []
        self.singles: list[str] = []
        self.plan: deque[str | threading.Event] = deque()
        self._cv = threading.Condition()

    def transcribe(self, audio: np.ndarray, *, language: str | None, word_timestamps: bool, partial: bool = False,
                   options: SessionOptions | None = None) -> AsrResult:
        with self._cv:
            self.singles.append(options.session_id if options is not None else "")
        return self.inner.transcribe(audio, language=language, word_timestamps=word_timestamps, partial=partial,
                                     options=options)

    def transcribe_many(self, requests: list[TranscribeRequest]) -> list[AsrResult]:
        with self._cv:
            self.batches.append([r.options.session_id for r in requests])
            step = self.plan.popleft() if self.plan else None
            self._cv.notify_all()
        if isinstance(step, threading.Event):
            step.wait(60)
        elif step == "raise":
            raise RuntimeError("the device is gone")
        results = [self.inner.transcribe(r.audio, language=r.language, word_timestamps=r.word_timestamps,
                                         partial=r.partial, options=r.options) for r in requests]
        return results[:-1] if step == "short" else results

    def wait_calls(self, n: int, timeout: float = 60) -> bool:
        """Block until ``transcribe_many`` has been called ``n`` times."""
        with self._cv:
            return self._cv.wait_for(lambda: len(self.batches) >= n, timeout)


# --- the test plugin: faster-whisper variants that take batches --------------------------------------


BUILT: list[BatchingWhisper] = []
"""Every model the plugin's factory made (the end-to-end test reaches its model here)."""


class BatchedEngine:
    def __init__(self, variants: dict[str, BatchingWhisper]):
        self.variants = variants


def build_batched(options: dict, context) -> BatchedEngine:
    """The faster-whisper engine, each variant on one thread so that a session's decode makes others wait."""
    engine = build_whisper(options, context)
    variants = {name: BatchingWhisper(v, parallelism=1) for name, v in engine.variants.items()}
    BUILT.extend(variants.values())
    return BatchedEngine(variants)


@hookimpl
def register_asr(register):
    register("batched-whisper", build_batched, WHISPER_OPTIONS)


# --- fixtures and helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper() -> Any:
    """The default engine's real ``fast`` variant (tiny.en int8), loaded the way the worker loads it."""
    plugins = load_plugins()
    specs, errors = load_engines(ENGINES, plugins)
    assert not errors, [str(e) for e in errors]
    manager = ModelManager(plugins)
    asyncio.run(manager.load([s for s in specs if s.id == "whisper-streaming"]))
    return manager.engines["whisper-streaming"].asr.variants["fast"]


@pytest.fixture(scope="module")
def utterances(speech_by_id) -> dict[str, tuple[np.ndarray, str]]:
    """Short utterance id -> (float32 16 kHz samples, reference)."""
    out = {}
    for uid in SHORT:
        audio = read_wav(speech_by_id[uid].path)
        assert (audio.sample_rate, audio.channels) == (16000, 1)
        out[uid] = (np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768.0, speech_by_id[uid].reference)
    return out


def call(model: BatchingWhisper, audio: np.ndarray, who: str, partial_: bool = False) -> AsrCall:
    return AsrCall(model, TranscribeRequest(audio, "en", False, partial_, SessionOptions(session_id=who)), COMPONENT)


def assert_text(result: AsrResult, reference: str) -> None:
    assert isinstance(result, AsrResult)
    assert word_errors(reference, result.text).wer <= 0.25, (reference, result.text)


async def until_called(model: BatchingWhisper, n: int) -> None:
    assert await asyncio.to_thread(model.wait_calls, n), model.batches


# --- unit tests: the queue with a batching model ------------------------------------------------------


async def test_jobs_waiting_behind_a_call_go_to_the_model_in_one_batch(whisper, utterances):
    """The first call holds the only thread until three sessions' finals, a stale partial, a withdrawn
    final and a plain (functools.partial) job are queued: the next call carries exactly the three
    finals, each future gets its own utterance's text, and the plain job runs on its own."""
    model = BatchingWhisper(whisper)
    gate = threading.Event()
    model.plan.append(gate)
    ids = iter(SHORT)
    q = InferenceQueue("batch", threads=1)
    q.start()
    try:
        first_id = next(ids)
        first = q.submit(call(model, utterances[first_id][0], "a"), FINAL, owner="a")
        await until_called(model, 1)
        assert first.started and not first.cancel()
        finals = {who: (uid, q.submit(call(model, utterances[uid][0], who), FINAL, owner=who))
                  for who, uid in zip("bcd", ids)}
        withdrawn = q.submit(call(model, utterances[SHORT[0]][0], "withdrawn"), FINAL, owner="e")
        assert withdrawn.cancel()
        stale = q.submit(call(model, utterances[SHORT[0]][0], "stale", partial_=True), PARTIAL, owner="f",
                         stale=lambda: True)
        audio, reference = utterances[SHORT[4]]
        plain = q.submit(partial(model.transcribe, audio, language="en", word_timestamps=False,
                                 options=SessionOptions(session_id="plain")), FINAL, owner="g")
        second = threading.Event()
        model.plan.append(second)  # hold the batch, to see its jobs marked started before it decodes
        gate.set()
        await until_called(model, 2)
        assert model.batches == [["a"], ["b", "c", "d"]]
        assert all(t.started and not t.cancel() for _, t in finals.values())
        assert q.busy == 1 and not plain.started  # a batch is one thread
        second.set()
        assert_text(await first.future, utterances[first_id][1])
        for uid, ticket in finals.values():
            assert_text(await ticket.future, utterances[uid][1])
        assert_text(await plain.future, reference)
        with pytest.raises(asyncio.CancelledError):
            await stale.future
        assert withdrawn.future.cancelled()
    finally:
        q.stop()
    # Neither the stale nor the withdrawn job reached the model; the plain job was one transcribe().
    assert model.batches == [["a"], ["b", "c", "d"]] and model.singles == ["plain"]
    usage = q.usage
    assert (usage[FINAL].completed, usage[FINAL].batched, usage[FINAL].withdrawn) == (5, 3, 1)
    assert (usage[PARTIAL].completed, usage[PARTIAL].skipped) == (0, 1)
    assert q.batches == 2 and q.busy == 0 and q.depth == 0


async def test_a_batch_never_mixes_two_models_and_keeps_to_max_batch(whisper, utterances):
    """Two model objects on one queue (variants sharing a key decode differently): queued alternately
    before the queue starts, each model gets only its own requests, at most ``max_batch`` at a time,
    in the queue's order."""
    one, two = BatchingWhisper(whisper, max_batch=2), BatchingWhisper(whisper, max_batch=2)
    q = InferenceQueue("two-models", threads=1)
    plan = [(one, "o1"), (two, "t1"), (one, "o2"), (two, "t2"), (one, "o3")]
    tickets = [(uid, q.submit(call(model, utterances[uid][0], who), FINAL, owner=who))
               for (model, who), uid in zip(plan, SHORT)]
    await run_queued(q, tickets, utterances)
    assert one.batches == [["o1", "o2"], ["o3"]] and two.batches == [["t1", "t2"]]
    assert one.singles == two.singles == []


async def run_queued(q: InferenceQueue, tickets: list, utterances: dict) -> None:
    """Start ``q`` on the jobs queued before it, check each text, stop it."""
    q.start()
    try:
        for uid, ticket in tickets:
            assert_text(await ticket.future, utterances[uid][1])
    finally:
        q.stop()


async def test_a_batch_leaves_its_share_of_the_waiting_jobs_to_an_idle_thread(whisper, utterances):
    """Two threads, six jobs queued before they start: however the threads interleave, one batch
    does not take all six while the other thread has nothing to do."""
    model = BatchingWhisper(whisper, parallelism=2)
    q = InferenceQueue("share", threads=model.parallelism)
    tickets = [(uid, q.submit(call(model, utterances[uid][0], f"s{i}"), FINAL, owner=f"s{i}"))
               for i, uid in enumerate(SHORT)]
    await run_queued(q, tickets, utterances)
    assert len(model.batches) >= 2 and sorted(t for b in model.batches for t in b) == [f"s{i}" for i in range(6)]


async def test_a_failing_batch_fails_each_of_its_jobs_and_the_queue_goes_on(whisper, utterances):
    """``transcribe_many`` raises for one batch and returns one result too few for the next: every job
    of both fails with its own ComponentFailure naming the component; the next batch decodes."""
    model = BatchingWhisper(whisper, max_batch=2)
    model.plan.extend(["raise", "short"])
    q = InferenceQueue("failing", threads=1)
    tickets = [q.submit(call(model, utterances[uid][0], f"s{i}"), FINAL, owner=f"s{i}") for i, uid in enumerate(SHORT)]
    q.start()
    try:
        errors = []
        for ticket in tickets[:4]:
            with pytest.raises(ComponentFailure) as caught:
                await ticket.future
            errors.append(caught.value)
        for uid, ticket in zip(SHORT[4:], tickets[4:]):
            assert_text(await ticket.future, utterances[uid][1])
    finally:
        q.stop()
    assert model.batches == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]
    assert all(e.component == COMPONENT and str(e).startswith(COMPONENT) for e in errors)
    assert "transcribe_many raised RuntimeError: the device is gone" in str(errors[0]) and str(errors[1]) == str(errors[0])
    assert "returned 1 results for 2 requests" in str(errors[2]) and str(errors[3]) == str(errors[2])
    assert len({id(e) for e in errors}) == 4  # each session raises its own exception object
    assert isinstance(errors[0].__cause__, RuntimeError)
    assert q.usage[FINAL].completed == 6  # run, if failed: they cost decoder time


async def test_an_owner_at_its_thread_cap_joins_a_batch_only_when_nobody_else_waits(whisper, utterances):
    """Two threads, one each per owner while others wait. Owner x holds a thread with a plain job; its
    AsrCall stays out of owner z's batch while owner w's plain job waits, and runs once nobody else does."""
    model = BatchingWhisper(whisper)
    gate = threading.Event()
    q = InferenceQueue("cap", threads=2)
    held = q.submit(lambda: gate.wait(60), FINAL, owner="x")
    x_call = q.submit(call(model, utterances[SHORT[0]][0], "x"), FINAL, owner="x")
    z_call = q.submit(call(model, utterances[SHORT[1]][0], "z"), FINAL, owner="z")
    w_plain = q.submit(lambda: "w", FINAL, owner="w")
    q.start()
    try:
        assert_text(await z_call.future, utterances[SHORT[1]][1])
        assert await w_plain.future == "w"
        assert_text(await x_call.future, utterances[SHORT[0]][1])
        assert not held.future.done()  # x's own thread was held all along
        gate.set()
        await held.future
    finally:
        gate.set()
        q.stop()
    assert model.batches == [["z"], ["x"]]


# --- end to end: a worker whose engine batches --------------------------------------------------------


@pytest.fixture
def batched_engines(tmp_path) -> Path:
    """engines.d with one engine: the default one, its ASR served by the batching test plugin (fast only)."""
    raw = yaml.safe_load((ENGINES / "whisper-streaming.yaml").read_text())
    raw["id"] = "batched-streaming"
    raw["capabilities"]["models"] = ["fast"]
    raw["config_schema"]["properties"]["model"]["enum"] = ["fast"]
    asr = raw["pipeline"]["asr"]
    asr["plugin"] = "batched-whisper"
    asr["options"]["models"] = {"fast": asr["options"]["models"]["fast"]}
    (tmp_path / "batched.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


async def test_concurrent_sessions_are_decoded_in_batches(batched_engines, speech_by_id):
    """Three sessions stream real speech at once to a worker whose model decodes on one thread in
    batches. Its first call waits until two other finals are queued, so the next call is a batch of
    several sessions' utterances; every session's transcript is right."""
    BUILT.clear()
    worker = Worker(Settings(host="127.0.0.1", port=0, engines_dir=batched_engines),
                    load_plugins(extra=[sys.modules[__name__]]))
    await worker.start()
    try:
        model = BUILT[-1]
        assert isinstance(model, AsrModel)
        gate = threading.Event()
        model.plan.append(gate)
        utts = [speech_by_id[uid] for uid in SHORT[:3]]
        url = session_url(f"ws://127.0.0.1:{worker.port}", interim_results=False)
        sessions = [asyncio.create_task(stream(url, concat(silence(0.5 + 0.3 * i), read_wav(u.path), silence(1.5))))
                    for i, u in enumerate(utts)]
        try:
            await until_called(model, 1)
            queue = worker.scheduler.queues[model.key]
            while queue.waiting(FINAL) < 2 and not all(s.done() for s in sessions):
                await asyncio.sleep(0.05)  # waits for a condition; nothing is timed
        finally:
            gate.set()
        results = await asyncio.gather(*sessions)
    finally:
        await worker.shutdown()
    for u, result in zip(utts, results):
        assert result.end is not None and not result.of("error"), result.of("error")
        assert word_errors(u.reference, result.end["transcript"]).wer <= 0.25, (u.reference, result.end["transcript"])
    assert max(len(b) for b in model.batches) >= 2, model.batches
    assert model.singles == [], "every decode of a batching model goes through transcribe_many"
