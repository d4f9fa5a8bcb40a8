"""engine-host bench end to end on a short manifest (no timing asserts: only that it runs and reports)."""

from __future__ import annotations

import json

from .support import SPEECH
from .test_engines_and_plugins import run_cli

FIELDS = {
    "streams", "final_latency_p50", "final_latency_p95", "first_partial_latency_p50", "first_partial_latency_p95",
    "wer", "wer_vs_offline", "cpu_percent", "client_cpu_percent", "vad_cpu_percent", "asr_busy_percent",
    "decode_mean_s", "speculative", "rss_mib", "lag_events", "errors", "realtime",
}


def test_bench_sweep_json(tmp_path, speech):
    manifest = tmp_path / "short.tsv"
    rows = [u for u in speech if u.id in ("jfk", "1688-142285-0002")]
    manifest.write_text("id\tpath\tduration_s\treference\n" + "".join(
        f"{u.id}\t{u.path}\t{u.duration}\t{u.reference}\n" for u in rows))
    out = run_cli("bench", "--manifest", str(manifest), "--sweep", "1,2", "--speed", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["streams"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert FIELDS <= set(run), FIELDS - set(run)
        assert run["finals"] >= 2 and run["errors"] == []
        assert 0 <= run["wer"] <= 0.5
        assert run["final_latency_p50"] is not None and run["first_partial_latency_p50"] is not None
        assert run["vad_cpu_percent"] > 0  # read from the worker's /metrics
        assert run["asr_busy_percent"] > 0 and run["decode_mean_s"] > 0
        assert set(run["speculative"]) == {"used", "wasted", "withdrawn"}
    assert report["offline"]["wer"] is not None
    assert report["machine"]["cores"] >= 1 and report["startup_seconds"] > 0
    assert "max_realtime_streams" in report
    assert SPEECH.is_dir()
