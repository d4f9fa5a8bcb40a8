"""``engine-host bench``: stream real speech over N concurrent sessions and measure.

Each stream is the manifest's utterances (stream k starts at utterance k) joined
by ``--gap`` seconds of silence, sent in ``--chunk`` frames at ``--speed`` ×
real time (a frame leaves once its audio has "happened", like a microphone).

Final latency is measured from the moment the endpoint silence has elapsed in
the sent audio (``speech_end + endpoint_silence_s - postroll_s``, from the
engine's endpointing settings) to the arrival of ``transcript.final``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from host.client import Audio, concat, read_wav, session_url, silence, stream
from host.wer import WerCounts, word_errors

DEFAULT_MANIFEST = Path("../shared/speech/manifest.tsv")


@dataclass
class Item:
    id: str
    audio: Audio
    reference: str


@dataclass
class StreamStats:
    wer_errors: int = 0
    wer_words: int = 0
    final_latencies: list[float] = field(default_factory=list)
    decode_latencies: list[float] = field(default_factory=list)
    """From the arrival of vad.speech_end to the arrival of its final."""
    errors: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0


def load_manifest(path: Path, limit: int | None) -> list[Item]:
    if not path.is_file():
        raise SystemExit(f"manifest not found: {path} (the real speech set lives in ../shared/speech)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:limit]
    return [Item(r["id"], read_wav(path.parent / r["path"]), r["reference"]) for r in rows]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run_stream(url: str, items: list[Item], gap: float, chunk: float, speed: float | None,
                     endpoint_delay: float) -> StreamStats:
    audio = concat(*[part for it in items for part in (it.audio, silence(gap))])
    result = await stream(url, audio, chunk_s=chunk, speed=speed)
    stats = StreamStats(audio_seconds=audio.seconds)
    reference = " ".join(it.reference for it in items)
    counts = word_errors(reference, result.end["transcript"] if result.end else "")
    stats.wer_errors, stats.wer_words = counts.errors, counts.words
    speech_end_at: dict[int, tuple[float, float]] = {}
    utterance = -1
    for message, arrived in zip(result.messages, result.received_at):
        kind = message["type"]
        if kind == "vad.speech_start":
            utterance += 1
        elif kind == "vad.speech_end":
            speech_end_at[utterance] = (message["timestamp"], arrived)
        elif kind == "transcript.final" and message["utterance_id"] in speech_end_at:
            timestamp, end_arrived = speech_end_at[message["utterance_id"]]
            stats.decode_latencies.append(arrived - end_arrived)
            if speed:
                endpoint_wall = result.started_at + (timestamp + endpoint_delay) / speed
                stats.final_latencies.append(arrived - endpoint_wall)
        elif kind == "error":
            stats.errors.append(message["code"])
    if result.end is None:
        stats.errors.append(f"no session.end (close {result.close_code})")
    return stats


def start_worker(engines_dir: Path | None, max_sessions: int) -> tuple[subprocess.Popen, str, float]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "host.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--max-sessions", str(max_sessions), "--log-level", "WARNING"]
    if engines_dir:
        args += ["--engines-dir", str(engines_dir)]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile())
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, f"ws://127.0.0.1:{port}", time.monotonic() - t0
        except OSError:
            time.sleep(0.05)


def engine_endpointing(url: str, engine: str | None) -> dict[str, Any]:
    http = url.replace("ws://", "http://").replace("wss://", "https://").split("/session")[0]
    with urllib.request.urlopen(http.rstrip("/") + "/engines", timeout=5) as r:
        engines = json.loads(r.read())
    chosen = next((e for e in engines if e["id"] == engine), engines[0])
    return chosen.get("endpointing") or {}


async def bench_once(url: str, items: list[Item], streams: int, args, pid: int | None) -> dict[str, Any]:
    ep = engine_endpointing(url, args.engine)
    endpoint_delay = ep.get("endpoint_silence_s", 0.5) - ep.get("postroll_s", 0.0)
    params = dict(engine=args.engine, model=args.model, interim_results=not args.no_partials or None)
    surl = session_url(url, **{k: v for k, v in params.items() if v is not None})
    proc = psutil.Process(pid) if pid else None
    if proc:
        proc.cpu_percent(None)
    t0 = time.monotonic()
    per_stream = [items[k % len(items):] + items[:k % len(items)] for k in range(streams)]
    results = await asyncio.gather(*(run_stream(surl, s, args.gap, args.chunk, args.speed, endpoint_delay)
                                     for s in per_stream))
    wall = time.monotonic() - t0
    cpu = proc.cpu_percent(None) if proc else None
    rss = proc.memory_info().rss if proc else None
    finals = [x for r in results for x in r.final_latencies]
    decodes = [x for r in results for x in r.decode_latencies]
    total = WerCounts(sum(r.wer_errors for r in results), sum(r.wer_words for r in results))
    audio = sum(r.audio_seconds for r in results)
    return {
        "streams": streams,
        "audio_seconds": round(audio, 1),
        "wall_seconds": round(wall, 1),
        "final_latency_p50": _r(percentile(finals, 0.5)),
        "final_latency_p95": _r(percentile(finals, 0.95)),
        "decode_latency_p50": _r(percentile(decodes, 0.5)),
        "decode_latency_p95": _r(percentile(decodes, 0.95)),
        "finals": len(finals) if args.speed else len(decodes),
        "wer": round(total.wer, 4),
        "cpu_percent": cpu,
        "rss_mib": round(rss / 2**20, 1) if rss else None,
        "errors": sorted({e for r in results for e in r.errors}),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def main(args) -> int:
    items = load_manifest(Path(args.manifest), args.limit)
    levels = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.streams]
    proc = None
    startup = None
    url = args.url
    if not url:
        proc, url, startup = start_worker(args.engines_dir, max(levels))
    try:
        report = {"machine": machine(), "startup_seconds": _r(startup), "speed": args.speed, "chunk_s": args.chunk,
                  "runs": []}
        for n in levels:
            row = asyncio.run(bench_once(url, items, n, args, proc.pid if proc else None))
            report["runs"].append(row)
            if not args.json:
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if args.json:
            print(json.dumps(report, indent=2))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    return 0


def machine() -> dict[str, Any]:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()}


def add_arguments(p) -> None:
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--limit", type=int, default=None, help="use the first N manifest rows")
    p.add_argument("--url", help="a running worker (default: start one)")
    p.add_argument("--engines-dir", type=Path, default=None)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--sweep", help="comma-separated stream counts, e.g. 1,2,4")
    p.add_argument("--speed", type=float, default=1.0, help="× real time (0: as fast as possible)")
    p.add_argument("--chunk", type=float, default=0.05, help="frame length in seconds")
    p.add_argument("--gap", type=float, default=1.0, help="silence between utterances (s)")
    p.add_argument("--engine")
    p.add_argument("--model")
    p.add_argument("--no-partials", action="store_true")
    p.add_argument("--json", action="store_true")
