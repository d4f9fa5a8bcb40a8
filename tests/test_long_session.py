"""A one-hour session must not grow the worker's memory: finalized audio is released."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys

import psutil
import pytest

from host.client import concat, read_wav, session_url, silence, stream

from .support import SPEECH, WorkerProcess


def anonymous_rss(pid: int) -> int:
    """Bytes of the process's resident anonymous memory (RssAnon): what a leak grows. RSS also counts
    the model files' mapped pages, which come and go with the page cache (one CI run saw RSS 30 MiB
    higher from the first sample on, and its median drift past the bound, where two runs on the
    same machine stayed within 5 MiB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss  # not Linux: all of RSS


@pytest.fixture(scope="module")
def longform(tmp_path_factory):
    out = tmp_path_factory.mktemp("longform")
    subprocess.run([sys.executable, str(SPEECH / "build_longform.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return concat(*[read_wav(p) for p in sorted(out.glob("*.wav"))], silence(1.0))


async def test_one_hour_session_memory_is_bounded(tmp_path, longform):
    loops = int(3600 // longform.seconds) + 1
    hour = concat(*[longform] * loops)
    assert hour.seconds >= 3600
    # At 30x the hour takes two minutes, so trim at 1 s to match the default 30 s at real-time pace.
    worker = WorkerProcess(tmp_path, lag_limit_s=120, memory_trim_s=1)
    worker.wait_healthy()
    proc = psutil.Process(worker.proc.pid)
    samples: list[tuple[float, int]] = []
    sent = 0.0

    def on_sent(n: int) -> None:
        nonlocal sent
        sent += n / 32000
        if not samples or sent - samples[-1][0] >= 60:
            samples.append((sent, anonymous_rss(proc.pid)))

    try:
        result = await stream(session_url(worker.url, interim_results=False), hour, speed=30, on_sent=on_sent)
        await asyncio.sleep(0)
        samples.append((sent, anonymous_rss(proc.pid)))
    finally:
        worker.stop()
    assert result.end is not None and result.end["total_duration"] >= 3600
    assert len(result.finals) >= 400
    assert not result.of("error")
    # Medians, not single samples: RSS swings by tens of MiB between allocator trims, so one
    # unlucky sample says little. Keeping the hour's audio would add 115-230 MiB; a real leak
    # shows up as a shifted median and a high maximum.
    mib = [rss / 2**20 for _, rss in samples]
    early = statistics.median(rss / 2**20 for t, rss in samples if 600 <= t < 1800)
    late = statistics.median(rss / 2**20 for t, rss in samples if t >= 2400)
    peak = max(rss / 2**20 for t, rss in samples if t >= 600)
    print(f"\nRSS over the hour (MiB): {[round(m) for m in mib]}; median late-early {late - early:.1f}, "
          f"peak-early {peak - early:.1f}")
    assert late - early < 40, f"worker RSS median grew {late - early:.1f} MiB over a one-hour session"
    assert peak - early < 100, f"worker RSS peaked {peak - early:.1f} MiB above its early median"
