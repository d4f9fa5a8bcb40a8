"""The CLI client against real workers."""

from __future__ import annotations

import json

from host.wer import word_errors

from .test_engines_and_plugins import run_cli


def test_transcribe_with_in_process_worker(speech_by_id):
    utt = speech_by_id["jfk"]
    out = run_cli("transcribe", str(utt.path), "--json", "--word-timestamps")
    assert out.returncode == 0, out.stderr
    end = json.loads(out.stdout)
    assert end["type"] == "session.end"
    assert word_errors(utt.reference, end["transcript"]).wer <= 0.2
    assert all("words" in s for s in end["segments"])


def test_transcribe_against_running_worker_prints_finals(worker, speech_by_id):
    utt = speech_by_id["1688-142285-0003"]
    out = run_cli("transcribe", str(utt.path), "--url", worker.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("[") and "]" in lines[0]  # a timed final line
    assert word_errors(utt.reference, lines[-1]).wer <= 0.35
