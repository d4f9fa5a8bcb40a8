"""``engine-host bench``: stream real speech over N concurrent sessions and measure.

Each stream is the manifest's utterances (stream k starts at utterance k) joined by ``--gap``
seconds of silence after a leading offset (spread over ``--stagger`` seconds), sent in ``--chunk``
frames at ``--speed`` × real time (a frame leaves once its audio has "happened", like a
microphone). Session times are the sent audio's clock; the moment a session time ``t`` was sent
is ``stream start + t / speed`` (stream start: the first audio byte). Each level (stream count)
runs once per ``--endpointing`` policy (``turn``, ``silence``: the session's ``endpointing=``
query parameter), and each row says which (``endpointing``: the effective value from
``session.begin``'s ``config``, else the one asked; null where the server does not take the
parameter, then each level runs once without it and the bench says so on stderr). Per row:

- **end of speech → final** (``end_of_speech_to_final_p50``/``_p95``), what a user waits for: for
  every reference utterance (manifest clip) of a stream, its true end of speech found in the clean
  clip (:mod:`host.speech_bounds`: the end of the last 50 ms run of 10 ms frames whose energy
  above 300 Hz is within 38 dB of the clip's loudest frame, and at least 6 dB over its noise
  floor) placed at the clip's offset in the stream; from the moment that was sent to the arrival
  of the last ``transcript.final`` whose [start, end] overlaps the clip's speech span (the final
  that completes the utterance). Includes the endpointing delay; ``utterances_without_final``
  counts the clips no final overlapped;
- **first partial after onset** (``first_partial_after_onset_p50``/``_p95``): from the moment the
  clip's true speech onset (the start of the first such run) was sent to the arrival of the first
  ``transcript.partial`` with text whose [start, end] overlaps the clip's speech span;
- **finals per utterance** (``finals_per_utterance``): finals whose midpoint lies in a clip's
  region (from its offset to the next clip's offset), averaged over the clips: 1.0 is ideal, more
  means sentences were split at pauses, less that utterances were merged (or lost);
- **from the endpoint** (``final_latency_p50``/``_p95``, ``first_partial_latency_*``; the figures
  of older results, kept so that they stay comparable; they leave out the endpointing delay):
  final latency from the moment the endpoint silence had elapsed in the sent audio as the server's
  VAD saw it (``speech_end + endpoint_silence_s - postroll_s``, or ``short_endpoint_silence_s`` for
  an utterance shorter than ``short_utterance_s``; from the engine's endpointing settings) to the
  arrival of ``transcript.final``; first-partial latency from the VAD's onset
  (``speech_start + preroll_s``) to the utterance's first ``transcript.partial``;
- WER of the streamed transcripts against the references, and of the same engine and model
  transcribing each utterance whole, without streaming (``--offline``, :mod:`host.offline`), and
  their ratio ``wer_vs_offline``;
- CPU and RSS of the worker process (when the bench started it, or ``--pid``), and
  the CPU the bench itself spent sending and receiving (on the same machine, the
  load generator takes cores from the worker);
- VAD CPU and turn-detector CPU: the thread time the worker's VAD spent on speech probabilities
  (``vad_cpu_percent``) and its turn detector on end-of-turn checks (``turn_cpu_percent``, with
  ``turn_checks`` the checks it ran) during the level, as a percentage of one core over the
  level's wall time (from its /metrics; null where the worker has no such counter);
- from the same counters: how busy the inference threads were, the mean time one
  final took on its thread (this VM's speed at that moment: results of the same
  command on a shared VM differ with it), and what became of the speculative
  finals (used, wasted because speech resumed, withdrawn before they ran).

Percentiles (``_p50``/``_p95``) are interpolated over all the level's utterances (all its
streams); at ``--speed 0`` (as fast as possible) there is no pace to measure latency from, and
the latencies are null. When both policies ran, ``comparison`` gives per stream count the ratios turn / silence of end of
speech → final p50 and p95, finals per utterance and WER.

A level of N streams is *real-time* when final latency (from the endpoint) p95 ≤ ``--max-p95``
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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import psutil

from host import adversary
from host.bench_report import counter_fields, fetch_engine, machine, mib, percentile, round3, table, worker_counters
from host.bench_stats import Reference, StreamStats, analyse, clip_spans, compare_policies, language_fields, speech_fields
from host.client import Audio, StreamResult, concat, read_wav, session_url, silence, stream
from host.endpointing_options import EAGERNESS
from host.offline import offline_wer
from host.speech_bounds import speech_bounds
from host.wer import WerCounts

DEFAULT_MANIFEST = Path("../shared/speech/manifest.tsv")


POLICIES = ("turn", "silence")


@dataclass
class Item:
    id: str
    audio: Audio
    reference: str
    language: str | None = None
    """The manifest's ``language`` column, when it has one."""

    @cached_property
    def bounds(self) -> tuple[float, float] | None:
        """The true speech onset and end in the clip (:func:`host.speech_bounds.speech_bounds`)."""
        return speech_bounds(self.audio)


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
    return [Item(r["id"], read_wav(path.parent / r["path"]), r["reference"], r.get("language") or None) for r in rows]


async def run_stream(url: str, items: list[Item], args, endpointing: dict, progress: Progress,
                     offset: float = 0.0) -> StreamStats:
    audio = concat(silence(offset), *[part for it in items for part in (it.audio, silence(args.gap))])
    rate = audio.sample_rate * 2 * audio.channels
    result = await stream(url, audio, chunk_s=args.chunk, speed=args.speed,
                          on_sent=lambda n: progress.add(n / rate))
    spans = clip_spans([it.audio for it in items], [it.bounds for it in items], offset, args.gap)
    stats = analyse(result, [Reference(it.reference, it.language) for it in items], args.speed, endpointing, spans)
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


def session_params(args) -> dict[str, Any]:
    """The query parameters every measured session gets (besides ``endpointing``)."""
    params = dict(engine=args.engine, model=args.model, language=args.language,
                  eagerness=args.eagerness, interim_results=False if args.no_partials else None)
    return {k: v for k, v in params.items() if v is not None}


async def bench_level(url: str, items: list[Item], n: int, args, endpointing: dict,
                      proc: psutil.Process | None, policy: str | None = None) -> dict[str, Any]:
    """One level: ``n`` streams at once with endpointing ``policy`` (None: no ``endpointing=``)."""
    surl = session_url(url, **session_params(args), endpointing=policy)
    per_stream = [items[k % len(items):] + items[:k % len(items)] for k in range(n)]
    total_audio = n * sum(it.audio.seconds + args.gap for it in items) + n * args.stagger / 2
    progress = Progress(total_audio, label=f"{n:3d} stream(s)" + (f" {policy}" if policy else ""))
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
    effective = next((r.endpointing for r in results if r.endpointing), policy) if policy else None
    return {
        "streams": n,
        "endpointing": effective,
        **level_fields(results, args.max_p95, wall),
        "cpu_percent": cpu,
        "client_cpu_percent": client_cpu,
        **counters,
        "rss_mib": mib(rss),
        "rss_growth_mib": mib(rss - rss_before) if rss and rss_before else None,
        **adversaries,
    }


def level_fields(results: list[StreamStats], max_p95: float, wall: float) -> dict[str, Any]:
    """A level's latencies, WER and problems over its streams (``realtime``: see the module docstring)."""
    finals = [x for r in results for x in r.final_latencies]
    partials = [x for r in results for x in r.first_partial_latencies]
    wer = WerCounts(sum(r.wer.errors for r in results), sum(r.wer.words for r in results))
    wer_project = WerCounts(sum(r.wer_project.errors for r in results), sum(r.wer_project.words for r in results))
    lag = sum(1 for r in results for w in r.warnings + r.errors if w == "processing_lag")
    errors = sorted({e for r in results for e in r.errors})
    p95 = percentile(finals, 0.95)
    return {
        "audio_seconds": round(sum(r.audio_seconds for r in results), 1),
        "wall_seconds": round(wall, 1),
        "finals": len(finals),
        **speech_fields(results),
        "final_latency_p50": round3(percentile(finals, 0.5)),
        "final_latency_p95": round3(p95),
        "first_partial_latency_p50": round3(percentile(partials, 0.5)),
        "first_partial_latency_p95": round3(percentile(partials, 0.95)),
        "partials": sum(r.partials for r in results),
        "wer": round(wer.wer, 4),
        "wer_project": round(wer_project.wer, 4),
        **language_fields(results),
        "lag_events": lag,
        "errors": errors,
        "realtime": bool(finals) and p95 is not None and p95 <= max_p95 and lag == 0 and not errors,
    }


def endpointing_verdict(result: StreamResult, policy: str) -> tuple[bool, str | None]:
    """What a session opened with ``endpointing=policy`` says of it: (accepted, effective policy).
    Refused (False, None) on ``invalid_config`` about ``endpointing`` (a worker without the
    parameter: unknown parameter); any other failure to open a session stops the bench."""
    first = result.messages[0] if result.messages else None
    if first is not None and first["type"] == "session.begin":
        return True, (first.get("config") or {}).get("endpointing", policy)
    if first is not None and first["type"] == "error" and first.get("code") == "invalid_config" and (
            first.get("param") == "endpointing" or str(first.get("message", "")).startswith("endpointing")):
        return False, None
    what = first if first is not None else f"close {result.close_code} {result.close_reason}".strip()
    raise SystemExit(f"bench: a session with endpointing={policy} did not open: {what}")


def plan_policies(url: str, args) -> list[str | None]:
    """The ``--endpointing`` policies to run, each tried first with an empty session. A policy the
    worker refuses is dropped, and one that runs as a policy already planned (``turn`` on an engine
    without a turn detector answers ``silence``) too, each with a note on stderr; when none is
    left, each level runs once without the parameter ([None])."""
    plan: list[str | None] = []
    seen: set[str | None] = set()
    refused = []
    for policy in args.endpointing:
        accepted, effective = asyncio.run(_probe(url, args, policy))
        if not accepted:
            refused.append(policy)
        elif effective in seen:
            print(f"bench: endpointing={policy} runs as {effective}, measured already: skipped", file=sys.stderr)
        else:
            seen.add(effective)
            plan.append(policy)
    if refused:
        print(f"bench: warning: the server refuses endpointing={','.join(refused)} (an older worker?); "
              + ("each level runs once without it, \"endpointing\": null" if not plan else "those are not measured"),
              file=sys.stderr)
    return plan or [None]


async def _probe(url: str, args, policy: str) -> tuple[bool, str | None]:
    result = await stream(session_url(url, **session_params(args), endpointing=policy), silence(0.0), speed=None)
    return endpointing_verdict(result, policy)


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
            "language": args.language or "default", "eagerness": args.eagerness or "default",
            "manifest": str(args.manifest), "utterances": len(items), "speed": args.speed, "chunk_s": args.chunk,
            "gap_s": args.gap, "stagger_s": args.stagger, "interim_results": not args.no_partials, "startup_seconds": round3(startup),
            "idle_rss_mib": mib(proc.memory_info().rss) if proc else None, "runs": [],
        }
        report["endpointing_policies"] = policies = plan_policies(url, args)
        for n in levels:
            for policy in policies:
                report["runs"].append(asyncio.run(bench_level(url, items, n, args, engine.get("endpointing") or {},
                                                              proc, policy)))
        ok = [r["streams"] for r in report["runs"] if r["realtime"]]
        report["max_realtime_streams"] = max(ok) if ok else 0
        if comparison := compare_policies(report["runs"]):
            report["comparison"] = comparison
        if args.offline:
            report["offline"] = offline_wer(items, engine["id"], args.model, args.engines_dir)
            offline = report["offline"].get("wer")
            by_language = report["offline"].get("languages", {})
            for row in report["runs"]:
                row["wer_vs_offline"] = round(row["wer"] / offline, 3) if offline else None
                for code, figures in row.get("languages", {}).items():
                    base = by_language.get(code, {}).get("wer")
                    figures["wer_vs_offline"] = round(figures["wer"] / base, 3) if base else None
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
    p.add_argument("--max-p95", type=float, default=1.0,
                   help="final p95 (s, from the endpoint) a real-time level may reach")
    p.add_argument("--endpointing", type=policy_list, default=list(POLICIES),
                   help="comma-separated endpointing policies, each level runs once per policy (default: turn,silence)")
    p.add_argument("--engine")
    p.add_argument("--model")
    p.add_argument("--language", help="the sessions' language parameter: auto, a code, or candidates en,de,es "
                                      "(a manifest with a language column gets WER and detection per language)")
    p.add_argument("--eagerness", choices=list(EAGERNESS),
                   help="the sessions' eagerness parameter (endpointing=turn): low waits longer before a final")
    p.add_argument("--no-partials", action="store_true", help="interim_results=false")
    p.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the engine's model on the same utterances transcribed whole, offline")
    p.add_argument("--json", action="store_true")
    p.add_argument("--flood", type=int, default=0,
                   help="flush-storm sessions (32 ms + flush, 45/s) running beside the measured streams")
    p.add_argument("--uploads", type=int, default=0,
                   help="sessions uploading the manifest's audio as fast as possible beside the measured streams")


def policy_list(text: str) -> list[str]:
    """``--endpointing``: a comma list of :data:`POLICIES`, in order, without repeats."""
    policies = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in policies if x not in POLICIES]
    if bad or not policies:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(POLICIES)}, got {text!r}")
    return policies
