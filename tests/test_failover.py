"""Transparent failover behind the router: real redis-server, two real workers, a real router, real
speech, and a SIGKILL of the worker serving the session mid-utterance."""

from __future__ import annotations

import asyncio
import re
import signal
from itertools import pairwise

import pytest

from host.client import concat, read_wav, session_url, silence, stream
from host.wer import word_errors

from .support import router_cluster

pytest.importorskip("redis")

HEARTBEAT_S = 0.5
GAP_S = 1.5  # silence between the utterances of the stream
SPEED = 2.0  # × real time, like a live microphone


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis, two workers of capacity 2 and a router, all real processes."""
    yield from router_cluster(tmp_path_factory.mktemp("failover"), "f", HEARTBEAT_S)


@pytest.fixture(scope="module")
def conversation(speech):
    """Five utterances with silence between them; each one's span in the stream and its reference."""
    picked = [u for u in speech if 4.0 <= u.duration <= 12.0][:5]
    assert len(picked) == 5
    parts, spans, t = [silence(0.5)], [], 0.5
    for u in picked:
        audio = read_wav(u.path)
        parts += [audio, silence(GAP_S)]
        spans.append((t, t + audio.seconds))
        t += audio.seconds + GAP_S
    return concat(*parts), spans, " ".join(u.reference for u in picked)


async def test_offsets_continue_another_sessions_timeline(cluster, speech_by_id):
    """The native start offsets: every time shifted, ids starting at the offsets, echoed in
    session.begin; bad values refused with invalid_config naming the parameter."""
    _, workers, _ = cluster
    audio = concat(silence(0.3), read_wav(speech_by_id["jfk"].path), silence(1.0))
    params = {"interim_results": False, "word_timestamps": True}
    plain = await stream(session_url(workers[0].url, **params), audio, speed=None)
    shifted = await stream(session_url(workers[0].url, time_offset=100.25, segment_offset=5, utterance_offset=7,
                                       **params), audio, speed=None)
    config = shifted.messages[0]["config"]
    assert (config["time_offset"], config["segment_offset"], config["utterance_offset"]) == (100.25, 5, 7)
    assert "time_offset" not in plain.messages[0]["config"]  # echoed only when set
    assert plain.finals and len(shifted.finals) == len(plain.finals)
    for a, b in zip(plain.finals, shifted.finals, strict=True):
        assert b["text"] == a["text"] and b["segment_id"] == a["segment_id"] + 5
        assert b["utterance_id"] == a["utterance_id"] + 7
        assert b["start"] == pytest.approx(a["start"] + 100.25, abs=1e-3)
        assert b["end"] == pytest.approx(a["end"] + 100.25, abs=1e-3)
        assert [w["start"] for w in b["words"]] == pytest.approx([w["start"] + 100.25 for w in a["words"]], abs=1e-3)
    vad = lambda r: [m["timestamp"] for m in r.messages if m["type"].startswith("vad.")]  # noqa: E731
    assert vad(shifted) == pytest.approx([t + 100.25 for t in vad(plain)], abs=1e-3)
    assert shifted.end["total_duration"] == pytest.approx(plain.end["total_duration"] + 100.25, abs=1e-3)
    assert shifted.end["total_speech_duration"] == plain.end["total_speech_duration"]
    assert [s["id"] for s in shifted.end["segments"]] == [f["segment_id"] for f in shifted.finals]
    for bad in ({"time_offset": -1}, {"time_offset": "nan"}, {"segment_offset": "x"}, {"utterance_offset": -2}):
        refused = await stream(session_url(workers[0].url, **bad), silence(0.1), speed=None)
        (error,) = refused.of("error")
        assert error["code"] == "invalid_config" and error["param"] == next(iter(bad)), error
        assert refused.close_code == 1008


async def test_worker_killed_mid_utterance_fails_over_without_loss(cluster, conversation):
    _, workers, router = cluster
    audio, spans, reference = conversation
    url = session_url(router.url, interim_results=False, word_timestamps=True)
    for w in workers:
        w.wait_idle()
    clean = await stream(url, audio, speed=SPEED)
    assert clean.close_code == 1000 and not clean.of("error") and not clean.of("warning")
    check_transcript(clean, clean.end, spans)

    # The same stream again; the worker serving it is killed once a final is out and the next
    # utterance has begun (mid-utterance: its audio is partly with the dead worker only).
    for w in workers:
        w.wait_idle()
    mid_utterance = asyncio.Event()
    finals = 0

    def on_message(m):
        nonlocal finals
        finals += m["type"] == "transcript.final"
        if m["type"] == "vad.speech_start" and finals >= 1:
            mid_utterance.set()

    running = asyncio.create_task(stream(url, audio, speed=SPEED, on_message=on_message))
    await asyncio.wait_for(mid_utterance.wait(), 120)
    (victim,) = [w for w in workers if w.health()["active_sessions"] == 1]
    survivor = next(w for w in workers if w is not victim)
    finals_before_kill = finals
    victim.proc.send_signal(signal.SIGKILL)
    result = await asyncio.wait_for(running, 180)

    types = [m["type"] for m in result.messages]
    assert types.count("session.begin") == 1 and types[-1] == "session.end", types
    assert not result.of("error"), result.of("error")
    (warning,) = result.of("warning")
    assert warning["code"] == "worker_lost" and victim.worker_id in warning["message"]
    assert result.close_code == 1000
    seam = types.index("warning")
    before = [m for m in result.messages[:seam] if m["type"] == "transcript.final"]
    after = [m for m in result.messages[seam:] if m["type"] == "transcript.final"]
    assert len(before) >= finals_before_kill and after, (len(before), len(after))
    # The new worker's timeline starts where the last final's utterance ended.
    assert warning["resumed_at"] >= before[-1]["end"]
    assert after[0]["start"] >= warning["resumed_at"] - 1e-3
    check_transcript(result, result.end, spans)
    assert result.end.get("failovers") == 1 and "incomplete" not in result.end
    assert result.end["total_duration"] == pytest.approx(audio.seconds, abs=0.01)
    assert survivor.proc.poll() is None

    wer_clean = word_errors(reference, " ".join(f["text"] for f in clean.finals)).wer
    wer_failover = word_errors(reference, " ".join(f["text"] for f in result.finals)).wer
    assert wer_failover <= wer_clean + 0.02, (wer_failover, wer_clean, [f["text"] for f in result.finals])

    # The measurement for the issue: the longest gap between two finals, with and without the failover
    # (the one spanning the seam is the failover's), and the replay buffer's size.
    arrivals = {id(m): t for t, m in zip(result.received_at, result.messages, strict=True)}
    seam_gap = arrivals[id(after[0])] - arrivals[id(before[-1])]
    # Each final's arrival (since its stream began) against the same segment's in the fault-free run.
    clean_at = {m["segment_id"]: t - clean.started_at
                for t, m in zip(clean.received_at, clean.messages, strict=True) if m["type"] == "transcript.final"}
    late = max(arrivals[id(f)] - result.started_at - clean_at[f["segment_id"]]
               for f in after if f["segment_id"] in clean_at)
    log = router.log()
    replayed = [int(x) for x in re.findall(r"replaying (\d+) bytes", log)]
    peak = [int(x) for x in re.findall(r"replay buffer peak (\d+) bytes", log)]
    assert replayed and peak and max(peak) <= (30 + 10) * 32000
    print(f"\nfailover at {SPEED}x real time: gap between the finals around the seam {seam_gap:.2f} s; "
          f"finals after the seam at most {late:+.2f} s later than in the fault-free run; "
          f"longest gap between finals {gap(result):.2f} s (fault-free run: {gap(clean):.2f} s); "
          f"WER {wer_failover:.3f} (fault-free {wer_clean:.3f}); replayed {replayed[-1]} bytes; "
          f"replay buffer peak per session {max(peak)} bytes (bound {(30 + 10) * 32000} at 16 kHz s16 mono)")


def gap(result) -> float:
    """The longest wait between two finals' arrivals."""
    times = [t for t, m in zip(result.received_at, result.messages, strict=True) if m["type"] == "transcript.final"]
    return max((b - a for a, b in pairwise(times)), default=0.0)


def check_transcript(result, end, spans) -> None:
    """Finals continuous and not repeated, every utterance transcribed, session.end equal to the finals."""
    finals = result.finals
    assert [f["segment_id"] for f in finals] == list(range(len(finals)))
    for a, b in pairwise(finals):
        assert b["start"] >= a["end"] - 1e-3, ("overlapping finals", a, b)  # none repeated
        assert b["start"] > a["start"]
    assert len({f["utterance_id"] for f in finals}) == len(finals)
    for t0, t1 in spans:  # every reference utterance has a final over it
        assert any(f["start"] < t1 and f["end"] > t0 for f in finals), (t0, t1, finals)
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in end["segments"]] == \
        [(f["segment_id"], f["start"], f["end"], f["text"]) for f in finals]
    assert end["transcript"] == " ".join(f["text"] for f in finals)


async def test_no_worker_to_take_over_reports_worker_lost(cluster, conversation):
    """Runs last: with the other worker dead, a lost session has nowhere to go: the old path."""
    _, workers, router = cluster
    audio, _spans, _ = conversation
    (alive,) = [w for w in workers if w.proc.poll() is None]
    got_final = asyncio.Event()
    running = asyncio.create_task(stream(session_url(router.url, interim_results=False), audio, speed=SPEED,
                                         on_message=lambda m: m["type"] == "transcript.final" and got_final.set()))
    await asyncio.wait_for(got_final.wait(), 120)
    assert alive.health()["active_sessions"] == 1
    alive.proc.send_signal(signal.SIGKILL)
    result = await asyncio.wait_for(running, 60)
    (error,) = result.of("error")
    assert error["code"] == "worker_lost" and error["recoverable"] is False
    assert not result.of("warning")
    end = result.end
    assert end is not None and end["incomplete"] is True
    assert [s["text"] for s in end["segments"]] == [f["text"] for f in result.finals] and result.finals
    assert result.messages[-2:] == [error, end] and result.close_code == 1011
    assert "no worker can take session" in router.log()

