"""``engine-host bench``: stream real speech over N concurrent sessions and measure.

Each stream is the manifest's utterances (stream k starts at utterance k) joined
by ``--gap`` seconds of silence, sent in ``--chunk`` frames at ``--speed`` ×
real time (a frame leaves once its audio has "happened", like a microphone).

- final latency: from the moment the endpoint silence has elapsed in the sent
  audio (``speech_end + endpoint_silence_s - postroll_s``, or
  ``short_endpoint_silence_s`` for an utterance shorter than ``short_utterance_s``;
  from the engine's endpointing settings) to the arrival of ``transcript.final``;
- first-partial latency: from the speech onset in the sent audio
  (``speech_start + preroll_s``) to the arrival of the utterance's first
  ``transcript.partial``;
- WER of the streamed transcripts against the references, and of the same engine and model
  transcribing each utterance whole, without streaming (``--offline``, :mod:`host.offline`);
- CPU and RSS of the worker process (when the bench started it, or ``--pid``), and
  the CPU the bench itself spent sending and receiving (on the same machine, the
  load generator takes cores from the worker);
- VAD CPU: the thread time the worker's VAD spent on speech probabilities during
  the level, as a percentage of one core (from its /metrics);
- from the same counters: how busy the inference threads were, the mean time one
  final took on its thread (this VM's speed at that moment: results of the same
  command on a shared VM differ with it), and what became of the speculative
  finals (used, wasted because speech resumed, withdrawn before they ran).

A level of N streams is *real-time* when final latency p95 ≤ ``--max-p95``
and no session got a processing_lag warning or error.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from host import adversary
from host.bench_report import counter_fields, fetch_engine, machine, mib, percentile, round3, table, worker_counters
from host.client import Audio, concat, read_wav, session_url, silence, stream
from host.endpointing import EndpointingOptions
from host.offline import offline_wer
from host.wer import WerCounts, word_errors

DEFAULT_MANIFEST = Path("../shared/speech/manifest.tsv")


@dataclass
class Item:
    id: str
    audio: Audio
    reference: str


@dataclass
class StreamStats:
    audio_seconds: float = 0.0
    wer: WerCounts = field(default_factory=lambda: WerCounts(0, 0))
    final_latencies: list[float] = field(default_factory=list)
    first_partial_latencies: list[float] = field(default_factory=list)
    partials: int = 0
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Progress:
    """Seconds of audio sent so far over all streams, drawn as a bar on stderr."""

    total: float
    label: str = ""
    sent: float = 0.0
    _last: float = 0.0

    def add(self, seconds: float) -> None:
        self.sent += seconds
        now = time.monotonic()
        if now - self._last >= (0.2 if sys.stderr.isatty() else 10.0) or self.sent >= self.total:
            self._last = now
            self.draw()

    def draw(self) -> None:
        frac = min(1.0, self.sent / self.total) if self.total else 1.0
        bar = "#" * int(frac * 30)
        end = "\r" if sys.stderr.isatty() and frac < 1 else "\n"
        sys.stderr.write(f"{self.label} [{bar:<30}] {frac * 100:5.1f}% of {self.total:.0f} s audio{end}")
        sys.stderr.flush()


def load_manifest(path: Path, limit: int | None) -> list[Item]:
    if not path.is_file():
        raise SystemExit(f"manifest not found: {path} (the real speech set lives in ../shared/speech)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:limit]
    return [Item(r["id"], read_wav(path.parent / r["path"]), r["reference"]) for r in rows]


def analyse(result, reference: str, speed: float | None, endpointing: dict[str, Any]) -> StreamStats:
    """Latencies, WER and problems of one streamed session."""
    stats = StreamStats()
    stats.wer = word_errors(reference, result.end["transcript"] if result.end else "")
    options = EndpointingOptions.from_options({"postroll_s": 0.0, "preroll_s": 0.0, **endpointing})
    postroll, preroll = options.postroll_s, options.preroll_s
    start_at: dict[int, float] = {}
    onset_at: dict[int, float] = {}
    end_at: dict[int, float] = {}
    utterance = -1
    for message, arrived in zip(result.messages, result.received_at):
        kind = message["type"]
        if kind == "vad.speech_start":
            utterance += 1
            start_at[utterance] = message["timestamp"]
            onset_at[utterance] = message["timestamp"] + preroll
        elif kind == "vad.speech_end":
            # The endpoint fired this much silence after the last speech (speech_end carries the
            # post-roll); the endpointer waits longer while an utterance is short.
            speech = message["timestamp"] - postroll - start_at.get(utterance, 0.0)
            end_at[utterance] = message["timestamp"] + options.endpoint_silence_for(speech) - postroll
        elif kind == "transcript.partial":
            stats.partials += 1
            uid = message["utterance_id"]
            if speed and uid in onset_at:
                stats.first_partial_latencies.append(arrived - (result.started_at + onset_at.pop(uid) / speed))
        elif kind == "transcript.final" and speed and message["utterance_id"] in end_at:
            stats.final_latencies.append(arrived - (result.started_at + end_at[message["utterance_id"]] / speed))
        elif kind == "warning":
            stats.warnings.append(message["code"])
        elif kind == "error":
            stats.errors.append(message["code"])
    if result.end is None:
        stats.errors.append(f"no session.end (close {result.close_code})")
    return stats


async def run_stream(url: str, items: list[Item], args, endpointing: dict, progress: Progress,
                     offset: float = 0.0) -> StreamStats:
    audio = concat(silence(offset), *[part for it in items for part in (it.audio, silence(args.gap))])
    rate = audio.sample_rate * 2 * audio.channels
    result = await stream(url, audio, chunk_s=args.chunk, speed=args.speed,
                          on_sent=lambda n: progress.add(n / rate))
    stats = analyse(result, " ".join(it.reference for it in items), args.speed, endpointing)
    stats.audio_seconds = audio.seconds
    return stats


def start_worker(engines_dir: Path | None, max_sessions: int) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "host.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--max-sessions", str(max_sessions), "--log-level", "WARNING"]
    if engines_dir:
        args += ["--engines-dir", str(engines_dir)]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, f"ws://127.0.0.1:{port}", time.monotonic() - t0
        except OSError:
            time.sleep(0.05)


async def bench_level(url: str, items: list[Item], n: int, args, endpointing: dict,
                      proc: psutil.Process | None) -> dict[str, Any]:
    params = dict(engine=args.engine, model=args.model, interim_results=False if args.no_partials else None)
    surl = session_url(url, **{k: v for k, v in params.items() if v is not None})
    per_stream = [items[k % len(items):] + items[:k % len(items)] for k in range(n)]
    total_audio = n * sum(it.audio.seconds + args.gap for it in items) + n * args.stagger / 2
    progress = Progress(total_audio, label=f"{n:3d} stream(s)")
    rss_before = proc.memory_info().rss if proc else None
    if proc:
        proc.cpu_percent(None)
    counters_before = worker_counters(url)
    t0, client_t0 = time.monotonic(), time.process_time()
    # Users do not all start talking on the same 50 ms: offsets spread the streams (golden-ratio
    # spacing over --stagger seconds), or endpoints of rotated copies would coincide.
    offsets = [((k * 0.6180339887) % 1.0) * args.stagger for k in range(n)]
    stop = asyncio.Event()
    hostile = start_adversaries(url, items, args, stop)
    try:
        results = await asyncio.gather(*(run_stream(surl, s, args, endpointing, progress, off)
                                         for s, off in zip(per_stream, offsets)))
    finally:
        stop.set()
    wall = time.monotonic() - t0
    adversaries = await hostile
    client_cpu = round((time.process_time() - client_t0) / wall * 100, 1) if wall > 0 else None
    progress.sent = progress.total
    progress.draw()
    cpu = proc.cpu_percent(None) if proc else None
    rss = proc.memory_info().rss if proc else None
    counters = counter_fields(counters_before, worker_counters(url) if counters_before else None, wall)
    finals = [x for r in results for x in r.final_latencies]
    partials = [x for r in results for x in r.first_partial_latencies]
    wer = WerCounts(sum(r.wer.errors for r in results), sum(r.wer.words for r in results))
    lag = sum(1 for r in results for w in r.warnings + r.errors if w == "processing_lag")
    errors = sorted({e for r in results for e in r.errors})
    p95 = percentile(finals, 0.95)
    return {
        "streams": n,
        "audio_seconds": round(sum(r.audio_seconds for r in results), 1),
        "wall_seconds": round(wall, 1),
        "finals": len(finals),
        "final_latency_p50": round3(percentile(finals, 0.5)),
        "final_latency_p95": round3(p95),
        "first_partial_latency_p50": round3(percentile(partials, 0.5)),
        "first_partial_latency_p95": round3(percentile(partials, 0.95)),
        "partials": sum(r.partials for r in results),
        "wer": round(wer.wer, 4),
        "cpu_percent": cpu,
        "client_cpu_percent": client_cpu,
        **counters,
        "rss_mib": mib(rss),
        "rss_growth_mib": mib(rss - rss_before) if rss and rss_before else None,
        "lag_events": lag,
        "errors": errors,
        "realtime": bool(finals) and p95 is not None and p95 <= args.max_p95 and lag == 0 and not errors,
        **adversaries,
    }


def start_adversaries(url: str, items: list[Item], args, stop: asyncio.Event) -> asyncio.Task:
    """``--flood`` flush storms and ``--uploads`` clients that upload the manifest's audio again and
    again, beside the measured streams until ``stop``; the task's result sums up what they got."""
    storms = [adversary.flush_storm(session_url(url, enable_vad=False), stop) for _ in range(args.flood)]
    uploads = []
    if args.uploads:
        recording = concat(*[part for it in items for part in (it.audio, silence(0.5))])
        uploads = [adversary.upload_loop(session_url(url, interim_results=False), recording, stop)
                   for _ in range(args.uploads)]

    async def run() -> dict[str, Any]:
        if not storms and not uploads:
            return {}
        # Both kinds start now, beside the measured streams (awaiting one list first would hold the other).
        storm_tasks = [asyncio.create_task(c) for c in storms]
        upload_tasks = [asyncio.create_task(c) for c in uploads]
        return adversary.summary(list(await asyncio.gather(*storm_tasks)), list(await asyncio.gather(*upload_tasks)))

    return asyncio.create_task(run())


def main(args) -> int:
    items = load_manifest(Path(args.manifest), args.limit)
    levels = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.streams]
    worker, url, startup = None, args.url, None
    if not url:
        # Room for the adversaries too: they are there to compete for the decoders, not to be refused.
        worker, url, startup = start_worker(args.engines_dir, max(levels) + args.flood + args.uploads)
    proc = psutil.Process(worker.pid if worker else args.pid) if (worker or args.pid) else None
    try:
        engine = fetch_engine(url, args.engine)
        report: dict[str, Any] = {
            "machine": machine(), "engine": engine["id"], "model": args.model or "default",
            "manifest": str(args.manifest), "utterances": len(items), "speed": args.speed, "chunk_s": args.chunk,
            "gap_s": args.gap, "stagger_s": args.stagger, "interim_results": not args.no_partials, "startup_seconds": round3(startup),
            "idle_rss_mib": mib(proc.memory_info().rss) if proc else None, "runs": [],
        }
        for n in levels:
            row = asyncio.run(bench_level(url, items, n, args, engine.get("endpointing") or {}, proc))
            report["runs"].append(row)
        ok = [r["streams"] for r in report["runs"] if r["realtime"]]
        report["max_realtime_streams"] = max(ok) if ok else 0
        if args.offline:
            report["offline"] = offline_wer(items, engine["id"], args.model, args.engines_dir)
            offline = report["offline"].get("wer")
            for row in report["runs"]:
                row["wer_vs_offline"] = round(row["wer"] / offline, 3) if offline else None
    finally:
        if worker:
            worker.terminate()
            worker.wait(30)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="default: ../shared/speech/manifest.tsv")
    p.add_argument("--limit", type=int, default=None, help="use the first N manifest rows")
    p.add_argument("--url", help="a running worker (default: start one)")
    p.add_argument("--pid", type=int, default=None, help="the running worker's pid, for CPU and RSS")
    p.add_argument("--engines-dir", type=Path, default=None)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--sweep", help="comma-separated stream counts, e.g. 1,2,4,8,16")
    p.add_argument("--speed", type=float, default=1.0, help="× real time (0: as fast as possible)")
    p.add_argument("--chunk", type=float, default=0.05, help="frame length in seconds")
    p.add_argument("--gap", type=float, default=1.0, help="silence between utterances (s)")
    p.add_argument("--stagger", type=float, default=3.0,
                   help="spread stream starts over this many seconds (leading silence)")
    p.add_argument("--max-p95", type=float, default=1.0, help="final p95 (s) a real-time level may reach")
    p.add_argument("--engine")
    p.add_argument("--model")
    p.add_argument("--no-partials", action="store_true", help="interim_results=false")
    p.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the engine's model on the same utterances transcribed whole, offline")
    p.add_argument("--json", action="store_true")
    p.add_argument("--flood", type=int, default=0,
                   help="flush-storm sessions (32 ms + flush, 45/s) running beside the measured streams")
    p.add_argument("--uploads", type=int, default=0,
                   help="sessions uploading the manifest's audio as fast as possible beside the measured streams")
