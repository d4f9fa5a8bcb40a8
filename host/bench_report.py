"""What ``engine-host bench`` reports: the worker's counters, percentiles, the machine and the table."""

from __future__ import annotations

import json
import os
import platform
import urllib.request
from pathlib import Path
from typing import Any

import psutil


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``values``, interpolated linearly; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _http_base(url: str) -> str:
    return url.replace("ws://", "http://").replace("wss://", "https://").split("/session")[0].rstrip("/")


def fetch_engine(url: str, engine: str | None) -> dict[str, Any]:
    """The worker's ``/engines`` entry for ``engine`` (its first engine when None or not served)."""
    with urllib.request.urlopen(_http_base(url) + "/engines", timeout=5) as r:
        engines = json.loads(r.read())
    return next((e for e in engines if e["id"] == engine), engines[0])


def worker_counters(url: str) -> dict[str, float] | None:
    """The worker's counters the bench reports on, summed over labels where the bench does not
    need them apart; None where /metrics does not answer (a router, metrics behind a key)."""
    try:
        with urllib.request.urlopen(_http_base(url) + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, value = line.rsplit(" ", 1)
        name, _, labels = sample.partition("{")
        kind = "partial" if 'kind="partial"' in labels else "decode"  # finals and speculative finals
        if name == "engine_host_vad_cpu_seconds_total":
            out["vad_cpu_seconds"] = float(value)
        elif name in ("engine_host_turn_cpu_seconds_total", "engine_host_turn_checks_total"):
            key = "turn_cpu_seconds" if "cpu" in name else "turn_checks"
            out[key] = out.get(key, 0.0) + float(value)
        elif name == "engine_host_inference_seconds_total":
            out[f"{kind}_seconds"] = out.get(f"{kind}_seconds", 0.0) + float(value)
        elif name == "engine_host_inference_jobs_total" and 'outcome="completed"' in labels:
            out[f"{kind}_jobs"] = out.get(f"{kind}_jobs", 0.0) + float(value)
        elif name == "engine_host_speculative_decodes_total":
            out["speculative_" + labels.split('"')[1]] = float(value)
    return out


def counter_fields(before: dict[str, float] | None, after: dict[str, float] | None, wall: float) -> dict:
    """Per-level figures from the worker's counters (None where the worker did not report them)."""
    if before is None or after is None or wall <= 0:
        return {"vad_cpu_percent": None, "turn_cpu_percent": None, "turn_checks": None, "asr_busy_percent": None,
                "decode_mean_s": None, "speculative": None}

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    busy = d("decode_seconds") + d("partial_seconds")
    return {
        "vad_cpu_percent": round(d("vad_cpu_seconds") / wall * 100, 1) if "vad_cpu_seconds" in after else None,
        # The turn detector's thread CPU in % of one core, and the end-of-turn checks it ran.
        "turn_cpu_percent": round(d("turn_cpu_seconds") / wall * 100, 2) if "turn_cpu_seconds" in after else None,
        "turn_checks": int(d("turn_checks")) if "turn_checks" in after else None,
        # Thread-busy time of the inference queue, in % of one thread: past 100 × threads it is saturated.
        "asr_busy_percent": round(busy / wall * 100, 1) if "decode_seconds" in after else None,
        # Mean time one final (or speculative final) took on its thread: how fast this machine decodes
        # right now, the figure to compare when the same command gives different results on a VM.
        "decode_mean_s": round(d("decode_seconds") / d("decode_jobs"), 3) if d("decode_jobs") else None,
        "speculative": {k: int(d("speculative_" + k)) for k in ("used", "wasted", "withdrawn")},
    }


def table(report: dict[str, Any]) -> str:
    """The report as the plain-text table ``engine-host bench`` prints without ``--json``."""
    cols = [("streams", "N"), ("endpointing", "endpointing"),
            ("end_of_speech_to_final_p50", "EoS p50"), ("end_of_speech_to_final_p95", "EoS p95"),
            ("first_partial_after_onset_p50", "onset p50"), ("first_partial_after_onset_p95", "onset p95"),
            ("finals_per_utterance", "finals/utt"),
            ("final_latency_p50", "final p50"), ("final_latency_p95", "final p95"),
            ("first_partial_latency_p50", "partial p50"), ("first_partial_latency_p95", "partial p95"),
            ("wer", "WER"), ("wer_vs_offline", "×offline"), ("cpu_percent", "CPU %"),
            ("client_cpu_percent", "client CPU %"), ("vad_cpu_percent", "VAD CPU %"),
            ("turn_cpu_percent", "turn CPU %"), ("turn_checks", "turn checks"),
            ("asr_busy_percent", "ASR busy %"), ("decode_mean_s", "decode s"), ("rss_mib", "RSS MiB"),
            ("lag_events", "lag"), ("realtime", "real-time")]
    lines = [f"engine {report['engine']} model {report['model']} language {report.get('language', 'default')}, "
             f"{report['utterances']} utterances, "
             f"speed {report['speed']}, partials {'on' if report['interim_results'] else 'off'}; "
             f"{report['machine']['cores']} cores"]
    if report.get("startup_seconds") is not None:
        lines.append(f"worker start-up to healthy {report['startup_seconds']} s, idle RSS {report['idle_rss_mib']} MiB")
    lines.append("  ".join(f"{h:>11}" for _, h in cols))
    for row in report["runs"]:
        lines.append("  ".join(f"{'-' if row.get(k) is None else row.get(k)!s:>11}" for k, _ in cols))
    lines.append("EoS: true end of speech → final; onset: true speech onset → first partial; finals/utt: finals "
                 "per reference utterance; final/partial: from the VAD's endpoint/onset (older results' figures)")
    for row in report["runs"]:
        for code, f in row.get("languages", {}).items():
            lines.append(f"{row['streams']} stream(s) {row.get('endpointing') or ''} {code}: WER {f['wer']} "
                         f"(×offline {f.get('wer_vs_offline', '-')}), language right in {f['language_accuracy']} "
                         f"of {f['finals']} finals")
    for c in report.get("comparison", []):
        lines.append(f"turn/silence at {c['streams']} stream(s): EoS p50 ×{c['end_of_speech_to_final_p50']}, "
                     f"p95 ×{c['end_of_speech_to_final_p95']}, finals/utt ×{c['finals_per_utterance']}, WER ×{c['wer']}")
    if "offline" in report:
        offline = report["offline"]
        lines.append(f"offline WER {offline.get('wer')} ({offline.get('settings') or offline.get('note', '')})")
    lines.append(f"largest real-time level: {report['max_realtime_streams']} stream(s)")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and Python version of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version()}


def round3(x: float | None) -> float | None:
    """``x`` rounded to 3 decimals (None stays None)."""
    return None if x is None else round(x, 3)


def mib(n: int | None) -> float | None:
    """``n`` bytes in MiB, 1 decimal (None stays None)."""
    return None if n is None else round(n / 2**20, 1)
