"""Live partials, the inference scheduler and the lag budget."""

from __future__ import annotations

import asyncio
import threading

import pytest

from host.client import concat, read_wav, session_url, silence, stream
from host.partials import LocalAgreement
from host.scheduler import FINAL, PARTIAL, SPECULATIVE, InferenceQueue

from .support import WorkerProcess


def test_local_agreement_never_changes_a_confirmed_prefix():
    la = LocalAgreement()
    assert la.update("and so") == "and so"
    assert la.update("and so my fellow") == "and so my fellow"  # "and so" confirmed
    assert la.stable == ["and", "so"]
    assert la.update("and sew my fellow americans") == "and so my fellow americans"
    assert la.update("and so my fellow americans ask") == "and so my fellow americans ask"
    assert la.stable == ["and", "so", "my", "fellow", "americans"]
    assert la.update("And so my fellow Americans, ask not").startswith("and so my fellow americans")


def test_local_agreement_never_agrees_on_a_cut_off_last_word():
    """The newest hypothesis' last word is never stable ("began." where the speaker goes on), and
    its trailing cut-off marks are not shown."""
    la = LocalAgreement()
    assert la.update("He began...") == "He began"
    assert la.update("He began.") == "He began" and la.stable_text == "He"
    assert la.update("He began to double-") == "He began to double" and la.stable_text == "He began"
    assert la.update("He began to doubt, and") == "He began to doubt, and" and la.stable_text == "He began to"
    assert la.update("...") == "He began to"  # a hypothesis of marks only shows the stable words
    assert la.stable_text == "He began to"


async def test_partials_precede_their_final_and_never_follow_it(idle_worker, speech_by_id):
    utt = speech_by_id["jfk"]
    audio = concat(silence(0.5), read_wav(utt.path), silence(1.5))
    result = await stream(session_url(idle_worker.url), audio, speed=2.0)
    partials = result.of("transcript.partial")
    assert partials, "no partials with interim_results on"
    open_utt, closed, finalized = None, set(), set()
    utterance = -1
    for m in result.messages:
        if m["type"] == "vad.speech_start":
            utterance += 1
            open_utt = utterance
        elif m["type"] == "vad.speech_end":
            closed.add(open_utt)
            open_utt = None
        elif m["type"] == "transcript.partial":
            uid = m["utterance_id"]
            assert uid == open_utt, "partial outside its open utterance"
            assert uid not in finalized and uid not in closed
            assert m["start"] <= m["end"] and m["text"]
        elif m["type"] == "transcript.final":
            finalized.add(m["utterance_id"])
    # The final replaces the partials: session.end holds finals only.
    assert [s["text"] for s in result.end["segments"]] == [f["text"] for f in result.finals]
    # Stable words are never taken back: each partial starts with every earlier partial's stable prefix.
    stable: dict[int, str] = {}
    for p in partials:
        before = stable.get(p["utterance_id"], "")
        assert p["text"].startswith(p["stable"]) and p["stable"].startswith(before), (before, p)
        stable[p["utterance_id"]] = p["stable"]
    assert any(stable.values()), "no partial had stable words"


async def test_interim_results_false_sends_no_partials(idle_worker, speech_by_id):
    audio = concat(read_wav(speech_by_id["jfk"].path), silence(1.0))
    result = await stream(session_url(idle_worker.url, interim_results=False), audio, speed=2.0)
    assert result.finals and not result.of("transcript.partial")


def test_queue_serves_finals_first_then_in_order_and_skips_stale():
    async def scenario():
        q = InferenceQueue("t", threads=1)
        order = []
        gate = threading.Event()
        q.start()
        try:
            blocker = q.submit(lambda: gate.wait(5), FINAL)  # keeps the single thread busy
            await asyncio.sleep(0.05)
            tickets = [
                q.submit(lambda: order.append("p1"), PARTIAL),
                q.submit(lambda: order.append("s1"), SPECULATIVE),
                q.submit(lambda: order.append("f1"), FINAL),
                q.submit(lambda: order.append("stale"), PARTIAL, stale=lambda: True),
                q.submit(lambda: order.append("f2"), FINAL),
                q.submit(lambda: order.append("p2"), PARTIAL),
            ]
            withdrawn = q.submit(lambda: order.append("withdrawn"), FINAL)
            assert withdrawn.cancel()
            assert q.waiting(FINAL) == 3 and q.waiting(SPECULATIVE) == 4 and q.waiting(PARTIAL) == 7
            gate.set()
            await blocker.future
            for t in tickets:
                try:
                    await t.future
                except asyncio.CancelledError:
                    pass
            await asyncio.sleep(0.05)
            assert q.waiting(PARTIAL) == 0
            return order, tickets[3].future.cancelled(), q.skipped, q.usage
        finally:
            q.stop()

    order, stale_cancelled, skipped, usage = asyncio.run(scenario())
    assert order == ["f1", "f2", "s1", "p1", "p2"]
    assert stale_cancelled and skipped == 1
    # What each kind cost, for /metrics: the blocker and f1, f2 ran; one final was withdrawn.
    assert (usage[FINAL].completed, usage[FINAL].withdrawn, usage[FINAL].skipped) == (3, 1, 0)
    assert (usage[SPECULATIVE].completed, usage[PARTIAL].completed, usage[PARTIAL].skipped) == (1, 2, 1)
    assert usage[FINAL].seconds >= 0.04  # the blocker held its thread while the test slept


@pytest.fixture(scope="module")
def laggy_worker(tmp_path_factory):
    # No backpressure to speak of, so that a fast upload can queue finals far ahead of the decoder.
    w = WorkerProcess(tmp_path_factory.mktemp("laggy"), lag_warning_s=0.0, lag_limit_s=0.3, max_pending_finals=64)
    w.wait_healthy()
    yield w
    w.stop()


async def test_lag_budget_warns_then_ends_the_session(laggy_worker, speech_by_id):
    # Utterances arrive far faster than they can be decoded, so finals fall behind the audio.
    one = read_wav(speech_by_id["1688-142285-0000"].path)  # 15 s
    audio = concat(*[part for _ in range(6) for part in (one, silence(0.8))])
    result = await stream(session_url(laggy_worker.url, interim_results=False), audio, speed=None)
    warnings = result.of("warning")
    errors = result.of("error")
    assert warnings and warnings[0]["code"] == "processing_lag" and warnings[0]["lag_s"] >= 0
    assert errors and errors[-1]["code"] == "processing_lag" and errors[-1]["recoverable"] is False
    assert result.end is not None and result.close_code == 1013
    # Finals produced before the cut are not lost.
    assert [s["text"] for s in result.end["segments"]] == [f["text"] for f in result.finals]
