"""engine-host bench: the true speech bounds of real clips, the metrics from them on made-up
sessions, the endpointing policies, and the bench end to end on a short manifest (no timing
asserts: presence, types, order and causality only; CI is a loaded 2-core machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest

from host import bench
from host.bench_report import counter_fields, table
from host.bench_stats import (
    ClipSpan,
    Reference,
    StreamStats,
    analyse,
    clip_spans,
    compare_policies,
    from_speech,
    language_fields,
)
from host.client import Audio, StreamResult, concat, read_wav, silence
from host.speech_bounds import speech_bounds

from .support import ROOT, SPEECH

FIELDS = {
    "streams", "endpointing", "final_latency_p50", "final_latency_p95", "first_partial_latency_p50",
    "first_partial_latency_p95", "end_of_speech_to_final_p50", "end_of_speech_to_final_p95",
    "first_partial_after_onset_p50", "first_partial_after_onset_p95", "finals_per_utterance",
    "utterances_without_final", "wer", "wer_project", "wer_vs_offline", "cpu_percent", "client_cpu_percent", "vad_cpu_percent",
    "turn_cpu_percent", "turn_checks", "asr_busy_percent", "decode_mean_s", "speculative", "rss_mib", "lag_events",
    "errors", "realtime",
}


# --- true speech bounds on real clips ------------------------------------------------------------

def test_speech_bounds_of_a_clean_clip(speech_by_id):
    # 2414-128291-0000: a quiet room (floor 52 dB under the peak); speech from ~0.55 s to ~2.53 s of 2.91 s
    onset, end = speech_bounds(read_wav(speech_by_id["2414-128291-0000"].path))
    assert onset == pytest.approx(0.55, abs=0.03) and end == pytest.approx(2.53, abs=0.03)


def test_speech_bounds_ignore_low_frequency_noise(speech_by_id):
    # 1998-15444-0004 ends in 0.6 s of rumble only ~30 dB under the speech: full-band energy calls it
    # speech up to the clip's last frame; above 300 Hz the speech ends at ~7.69 s.
    audio = read_wav(speech_by_id["1998-15444-0004"].path)
    onset, end = speech_bounds(audio)
    assert onset == pytest.approx(0.56, abs=0.05) and end == pytest.approx(7.69, abs=0.05)
    assert audio.seconds - end > 0.5


def test_speech_bounds_move_with_the_audio_not_its_level(speech_by_id):
    audio = read_wav(speech_by_id["1688-142285-0002"].path)
    onset, end = speech_bounds(audio)
    padded = speech_bounds(concat(silence(1.0), audio, silence(0.5)))
    assert padded == pytest.approx((onset + 1.0, end + 1.0), abs=1e-9)
    quiet = np.frombuffer(audio.pcm, "<i2") // 8
    assert speech_bounds(Audio(quiet.astype("<i2").tobytes(), audio.sample_rate, 1)) == pytest.approx((onset, end), abs=0.02)
    assert speech_bounds(silence(2.0)) is None and speech_bounds(silence(0.02)) is None


def test_speech_bounds_agree_with_silero_on_every_clip(speech):
    """Each clip's end lies a little before Silero's last speech window (which hangs on), not after
    it by more than a window or so: an independent check of the rule on all 48 clips."""
    from engine_host_vad_silero import build
    from host.contracts import LoadContext

    vad = build({"backend": "numpy"}, LoadContext(shared=lambda k, f: f(), engine_id="t"))
    lags = []
    for utt in speech:
        audio = read_wav(utt.path)
        onset, end = speech_bounds(audio)
        assert 0 <= onset < end <= audio.seconds + 1e-9, utt.id
        pad = np.zeros(24000, np.float32)  # 1.5 s: a warm recurrent state before the clip
        x = np.concatenate([pad, np.frombuffer(audio.pcm, "<i2").astype(np.float32) / 32768, pad])
        n = x.size // 512
        speech_windows = np.flatnonzero(vad.open_stream().probabilities(x[: n * 512].reshape(n, 512)) >= 0.5)
        silero_onset, silero_end = speech_windows[0] * 512 / 16000 - 1.5, (speech_windows[-1] + 1) * 512 / 16000 - 1.5
        assert -0.1 <= silero_end - end <= 0.35, utt.id
        assert -0.1 <= silero_onset - onset <= 0.8, utt.id  # a breath before speaking may start it early
        lags.append(silero_end - end)
    assert 0.0 < float(np.median(lags)) < 0.15


# --- metrics from the speech bounds, on made-up sessions ---------------------------------------

def test_clip_spans_count_samples_like_the_stream():
    clips = [Audio(b"\0\0" * 32008, 16000, 1), silence(1.0)]  # 2.0005 s
    spans = clip_spans(clips, [(0.5, 1.5), None], offset_s=0.3, gap_s=1.0)
    assert (spans[0].offset, spans[0].onset, spans[0].end) == pytest.approx((0.3, 0.8, 1.8))
    assert spans[0].region_end == spans[1].offset == pytest.approx(0.3 + 32008 / 16000 + 1.0)
    assert spans[1].onset is None and spans[1].region_end == math.inf


def _session(events: list[tuple[float, dict]]) -> StreamResult:
    result = StreamResult(started_at=100.0)
    for arrived, message in events:
        result.messages.append(message)
        result.received_at.append(arrived)
    return result


def test_latencies_from_the_true_speech_bounds():
    spans = [ClipSpan(0.0, 0.5, 3.0, 5.0), ClipSpan(5.0, 5.4, 8.0, 10.0), ClipSpan(10.0, 10.5, 12.0, math.inf)]
    final = {"type": "transcript.final"}
    partial = {"type": "transcript.partial", "text": "so"}
    result = _session([
        (100.6, {**partial, "text": "", "start": 0.2, "end": 0.6}),   # empty: not a partial a user sees
        (100.8, {**partial, "start": 0.2, "end": 0.7}),
        (103.7, {**final, "start": 0.2, "end": 3.2}),                  # clip 0: one final
        (105.9, {**partial, "start": 5.1, "end": 5.3}),                # ends before the onset: heard no speech
        (106.0, {**partial, "start": 5.1, "end": 5.6}),
        (107.0, {**final, "start": 5.1, "end": 6.5}),                  # clip 1 split at a pause...
        (108.9, {**final, "start": 6.8, "end": 8.2}),                  # ...the last one completes it
    ])                                                                 # clip 2: no final at all
    stats = StreamStats()
    from_speech(stats, result, spans, speed=1.0)
    assert stats.end_of_speech_latencies == pytest.approx([0.7, 0.9])
    assert stats.onset_partial_latencies == pytest.approx([0.3, 0.6])
    assert stats.finals_per_clip == [1, 2, 0] and stats.without_final == 1
    paced = StreamStats()
    from_speech(paced, result, spans, speed=2.0)  # at 2× the end of clip 0 was sent at 101.5
    assert paced.end_of_speech_latencies[0] == pytest.approx(103.7 - 101.5)
    unpaced = StreamStats()
    from_speech(unpaced, result, spans, speed=None)
    assert unpaced.end_of_speech_latencies == [] and unpaced.finals_per_clip == [1, 2, 0]


def test_a_merged_final_completes_both_clips():
    spans = [ClipSpan(0.0, 0.5, 3.0, 4.0), ClipSpan(4.0, 4.5, 6.0, math.inf)]
    result = _session([(106.5, {"type": "transcript.final", "start": 0.2, "end": 6.2})])
    stats = StreamStats()
    from_speech(stats, result, spans, speed=1.0)
    assert stats.end_of_speech_latencies == pytest.approx([3.5, 0.5])
    assert stats.finals_per_clip == [1, 0]  # its midpoint (3.2 s) lies in the first clip's region


def test_each_clip_is_scored_in_its_language_and_detection_is_counted():
    spans = [ClipSpan(0.0, 0.5, 3.0, 4.0), ClipSpan(4.0, 4.5, 7.0, math.inf)]
    refs = [Reference("er griff auch alles an", "de"), Reference("fue tanta la cantidad de gente", "es")]
    result = _session([
        (101.0, {"type": "transcript.final", "utterance_id": 0, "start": 0.5, "end": 2.0, "text": "Er griff auch",
                 "language": "de"}),
        (102.0, {"type": "transcript.final", "utterance_id": 1, "start": 2.0, "end": 3.0, "text": "alles an.",
                 "language": "en"}),
        (106.0, {"type": "transcript.final", "utterance_id": 2, "start": 4.5, "end": 7.0,
                 "text": "Fue tanta la cantidad de gente.", "language": "es"}),
        (107.0, {"type": "session.end", "transcript": "Er griff auch alles an. Fue tanta la cantidad de gente."}),
    ])
    stats = analyse(result, refs, 1.0, {}, spans)
    assert stats.wer.errors == 0 and stats.wer.words == 11
    assert stats.languages["de"].finals == 2 and stats.languages["de"].right == 1
    assert stats.languages["es"].right == 1 and stats.languages["es"].errors.words == 6
    fields = language_fields([stats, stats])
    assert fields["language_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert fields["languages"]["de"] == {"wer": 0.0, "words": 10, "finals": 4, "language_accuracy": 0.5}
    # Without a language column there is nothing per language, and the transcript is scored whole.
    plain = analyse(result, [Reference("er griff auch alles an fue tanta la cantidad de gente")], 1.0, {})
    assert plain.languages == {} and language_fields([plain]) == {} and plain.wer.words == 11


def test_compare_policies_gives_turn_over_silence():
    rows = [
        {"streams": 1, "endpointing": "turn", "end_of_speech_to_final_p50": 0.6, "end_of_speech_to_final_p95": 0.9,
         "finals_per_utterance": 1.0, "wer": 0.1},
        {"streams": 1, "endpointing": "silence", "end_of_speech_to_final_p50": 0.8, "end_of_speech_to_final_p95": 0.9,
         "finals_per_utterance": 2.0, "wer": 0.0},
        {"streams": 2, "endpointing": "silence", "end_of_speech_to_final_p50": 0.8},
    ]
    assert compare_policies(rows) == [{"streams": 1, "end_of_speech_to_final_p50": 0.75, "end_of_speech_to_final_p95": 1.0,
                                       "finals_per_utterance": 0.5, "wer": None}]


def test_turn_counters_are_read_like_the_vad_counter():
    before = {"vad_cpu_seconds": 1.0, "turn_cpu_seconds": 2.0, "turn_checks": 10.0}
    after = {"vad_cpu_seconds": 2.0, "turn_cpu_seconds": 2.5, "turn_checks": 14.0}
    fields = counter_fields(before, after, wall=10.0)
    assert fields["vad_cpu_percent"] == 10.0 and fields["turn_cpu_percent"] == 5.0 and fields["turn_checks"] == 4
    old_worker = counter_fields({"vad_cpu_seconds": 1.0}, {"vad_cpu_seconds": 2.0}, wall=10.0)
    assert old_worker["turn_cpu_percent"] is None and old_worker["turn_checks"] is None
    assert counter_fields(None, None, wall=10.0)["turn_checks"] is None


# --- endpointing policies -----------------------------------------------------------------------

def test_endpointing_verdict():
    begin = _session([(0.0, {"type": "session.begin", "config": {"endpointing": "silence"}})])
    assert bench.endpointing_verdict(begin, "turn") == (True, "silence")
    assert bench.endpointing_verdict(_session([(0.0, {"type": "session.begin", "config": {}})]), "turn") == (True, "turn")
    unknown = {"type": "error", "code": "invalid_config", "param": "endpointing",
               "message": "endpointing: unknown parameter (known: ...)"}
    assert bench.endpointing_verdict(_session([(0.0, unknown)]), "turn") == (False, None)
    bad_model = {"type": "error", "code": "invalid_config", "param": "model", "message": "model: 'x' is not one of"}
    with pytest.raises(SystemExit, match="did not open"):
        bench.endpointing_verdict(_session([(0.0, bad_model)]), "turn")
    with pytest.raises(SystemExit, match="close 1013"):
        bench.endpointing_verdict(StreamResult(close_code=1013, close_reason="Server at capacity"), "turn")


def _plan(monkeypatch, answers: dict) -> list:
    async def probe(url, args, policy):
        return answers[policy]
    monkeypatch.setattr(bench, "_probe", probe)
    return bench.plan_policies("ws://x", Namespace(endpointing=["turn", "silence"]))


def test_plan_policies(monkeypatch, capsys):
    assert _plan(monkeypatch, {"turn": (True, "turn"), "silence": (True, "silence")}) == ["turn", "silence"]
    assert capsys.readouterr().err == ""
    # an engine without a turn detector runs turn as silence: measured once
    assert _plan(monkeypatch, {"turn": (True, "silence"), "silence": (True, "silence")}) == ["turn"]
    assert "skipped" in capsys.readouterr().err
    # a worker without the parameter: each level once without it, one warning
    assert _plan(monkeypatch, {"turn": (False, None), "silence": (False, None)}) == [None]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "null" in err
    assert bench.policy_list("silence, turn,silence") == ["silence", "turn"]
    with pytest.raises(Exception, match="expected a comma list"):
        bench.policy_list("turn,vad")


# --- end to end ---------------------------------------------------------------------------------

def _assert_ordered(run: dict, name: str) -> None:
    p50, p95 = run[f"{name}_p50"], run[f"{name}_p95"]
    assert isinstance(p50, float) and isinstance(p95, float), (name, p50, p95)
    assert 0 < p50 <= p95, (name, p50, p95)  # > 0: a final or partial cannot come before the speech it answers


def test_bench_sweep_json(tmp_path, speech):
    manifest = tmp_path / "short.tsv"
    rows = [u for u in speech if u.id in ("jfk", "1688-142285-0002")]
    manifest.write_text("id\tpath\tduration_s\treference\n" + "".join(
        f"{u.id}\t{u.path}\t{u.duration}\t{u.reference}\n" for u in rows))
    out = subprocess.run([sys.executable, "-m", "host.cli", "bench", "--manifest", str(manifest), "--sweep", "1,2",
                          "--speed", "2", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    policies = report["endpointing_policies"]
    assert policies == [None] or set(policies) <= {"turn", "silence"}, policies
    assert [r["streams"] for r in report["runs"]] == [n for n in (1, 2) for _ in policies]
    for run in report["runs"]:
        assert FIELDS <= set(run), FIELDS - set(run)
        assert run["finals"] >= 2 and run["errors"] == []
        assert 0 <= run["wer"] <= 0.5
        assert run["final_latency_p50"] is not None and run["first_partial_latency_p50"] is not None
        _assert_ordered(run, "end_of_speech_to_final")
        _assert_ordered(run, "first_partial_after_onset")
        assert run["finals_per_utterance"] > 0 and run["utterances_without_final"] == 0
        assert run["vad_cpu_percent"] > 0  # read from the worker's /metrics
        assert run["asr_busy_percent"] > 0 and run["decode_mean_s"] > 0
        assert set(run["speculative"]) == {"used", "wasted", "withdrawn"}
        assert run["turn_checks"] is None or (isinstance(run["turn_checks"], int) and run["turn_checks"] >= 0)
        assert run["turn_cpu_percent"] is None or run["turn_cpu_percent"] >= 0
        if policies == [None]:
            assert run["endpointing"] is None
        else:
            assert run["endpointing"] in ("turn", "silence")
        if run["endpointing"] == "turn":
            assert run["turn_checks"] > 0  # the detector was asked at the pauses
        elif run["endpointing"] == "silence":
            assert run["turn_checks"] in (None, 0)
    ran = {r["endpointing"] for r in report["runs"]}
    if {"turn", "silence"} <= ran:
        assert [c["streams"] for c in report["comparison"]] == [1, 2]
        for c in report["comparison"]:
            assert set(c) == {"streams", "end_of_speech_to_final_p50", "end_of_speech_to_final_p95",
                              "finals_per_utterance", "wer"}
            assert c["end_of_speech_to_final_p50"] > 0 and c["finals_per_utterance"] > 0
    else:
        assert "comparison" not in report
    assert report["offline"]["wer"] is not None
    assert report["machine"]["cores"] >= 1 and report["startup_seconds"] > 0
    assert "max_realtime_streams" in report
    text = table(report)
    assert "EoS p50" in text and "onset p95" in text and "finals/utt" in text and "turn CPU %" in text
    assert SPEECH.is_dir()
