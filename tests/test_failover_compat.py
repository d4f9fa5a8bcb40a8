"""Failover under a compatibility dialect: a Deepgram client (raw linear16 on /v1/listen) through the
router, whose worker is SIGKILLed mid-utterance. The dialect runs on the router over the native
relay, so its client must see its results go on: no Error, no result lost or repeated."""

from __future__ import annotations

import asyncio
import json
import signal
from itertools import pairwise

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.wer import word_errors

from .support import router_cluster
from .test_failover import GAP_S, HEARTBEAT_S, SPEED, conversation  # noqa: F401 - the fixture

pytest.importorskip("redis")

URL = "/v1/listen?encoding=linear16&sample_rate=16000&interim_results=true&punctuate=true"
FRAME = 3200  # 100 ms of 16 kHz s16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis, two workers of capacity 2 and a router, all real processes."""
    yield from router_cluster(tmp_path_factory.mktemp("failover-compat"), "d", HEARTBEAT_S)


async def deepgram_stream(url: str, pcm: bytes, kill_when=None) -> tuple[list[dict], int | None]:
    """Stream ``pcm`` at SPEED × real time as a Deepgram client, then CloseStream; every message and
    the close code. ``kill_when(messages)`` is checked after each message; once it is true it is
    called no more (the caller kills the worker there)."""
    messages: list[dict] = []
    async with connect(url, max_size=None) as ws:
        async def read():
            try:
                async for raw in ws:
                    messages.append(json.loads(raw))
                    if kill_when is not None and kill_when(messages):
                        return
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(read())
        for i in range(0, len(pcm), FRAME):
            await ws.send(pcm[i:i + FRAME])
            await asyncio.sleep(FRAME / 32000 / SPEED)
        await ws.send(json.dumps({"type": "CloseStream"}))
        await reader
        try:
            async for raw in ws:
                messages.append(json.loads(raw))
        except ConnectionClosed:
            pass
        return messages, ws.close_code


def finals(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["type"] == "Results" and m["is_final"] and m["channel"]["alternatives"][0]["transcript"]]


def transcript(messages: list[dict]) -> str:
    return " ".join(m["channel"]["alternatives"][0]["transcript"] for m in finals(messages))


async def test_deepgram_client_through_the_router_survives_its_worker(cluster, conversation):  # noqa: F811
    _, workers, router = cluster
    audio, spans, reference = conversation
    pcm = audio.pcm
    url = router.url + URL
    for w in workers:
        w.wait_idle()
    clean, code = await deepgram_stream(url, pcm)
    assert code == 1000 and not [m for m in clean if m["type"] == "Error"]

    for w in workers:
        w.wait_idle()
    killed: list = []

    def mid_utterance(messages: list[dict]) -> bool:
        """After a final, once the next utterance's interim results come: kill the worker serving it."""
        seen_final = False
        for m in messages:
            if m["type"] == "Results" and m["is_final"]:
                seen_final = True
            elif seen_final and m["type"] == "Results" and not m["is_final"]:
                (victim,) = [w for w in workers if w.health()["active_sessions"] == 1]
                victim.proc.send_signal(signal.SIGKILL)
                killed.append(victim)
                return True
        return False

    result, code = await asyncio.wait_for(deepgram_stream(url, pcm, mid_utterance), 240)
    assert killed, "the worker was never killed"
    assert code == 1000 and not [m for m in result if m["type"] == "Error"], [m for m in result if m["type"] == "Error"]
    assert result[-1]["type"] == "Metadata"
    got = finals(result)
    # None lost: every reference utterance has a final over it; none repeated: their spans do not overlap.
    for t0, t1 in spans:
        assert any(f["start"] < t1 and f["start"] + f["duration"] > t0 for f in got), (t0, t1)
    for a, b in pairwise(got):
        assert b["start"] >= a["start"] + a["duration"] - 1e-3, ("overlapping results", a, b)
    wer_clean = word_errors(reference, transcript(clean)).wer
    wer_failover = word_errors(reference, transcript(result)).wer
    assert wer_failover <= wer_clean + 0.02, (wer_failover, wer_clean, transcript(result))
    print(f"\nDeepgram client through the router, worker SIGKILLed mid-utterance at {SPEED}x (gaps {GAP_S} s): "
          f"WER {wer_failover:.3f} (fault-free {wer_clean:.3f}), {len(got)} finals")
