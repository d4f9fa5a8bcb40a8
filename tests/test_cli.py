"""The CLI client against real workers."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import wave

import pytest

from host.client import concat, read_wav, silence
from host.wer import word_errors

from .test_engines_and_plugins import run_cli


def test_transcribe_with_in_process_worker(speech_by_id):
    utt = speech_by_id["jfk"]
    out = run_cli("transcribe", str(utt.path), "--json")  # same as --format json: words included
    assert out.returncode == 0, out.stderr
    end = json.loads(out.stdout)
    assert end["type"] == "session.end"
    assert word_errors(utt.reference, end["transcript"]).wer <= 0.2
    assert all("words" in s for s in end["segments"])


@pytest.mark.parametrize("flags, words", [
    ([], None), (["--word-timestamps"], True), (["--json"], True), (["--format", "json"], True),
    (["--format", "srt"], True), (["--format", "vtt"], True),
])
def test_transcribe_asks_for_word_timestamps_when_its_format_needs_them(flags, words):
    from host.cli import build_parser
    from host.transcribe import params_for

    args = build_parser().parse_args(["transcribe", "x.wav", *flags])
    assert params_for(args, None)["word_timestamps"] is words


def test_transcribe_against_running_worker_prints_finals(worker, speech_by_id):
    utt = speech_by_id["1688-142285-0003"]
    out = run_cli("transcribe", str(utt.path), "--url", worker.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("[") and "]" in lines[0]  # a timed final line
    assert word_errors(utt.reference, lines[-1]).wer <= 0.35


def parse_cues(text: str, kind: str) -> list[tuple[float, float, str]]:
    """Cues of an SRT or WebVTT document, checked for the format's syntax on the way."""
    sep = "," if kind == "srt" else "."
    pattern = re.compile(rf"^(\d\d):(\d\d):(\d\d){re.escape(sep)}(\d\d\d) --> (\d\d):(\d\d):(\d\d){re.escape(sep)}(\d\d\d)$")
    blocks = [b for b in text.strip().split("\n\n") if b]
    if kind == "vtt":
        assert blocks.pop(0) == "WEBVTT"
    cues = []
    for i, block in enumerate(blocks, 1):
        lines = block.split("\n")
        if kind == "srt":
            assert lines.pop(0) == str(i)
        m = pattern.match(lines[0])
        assert m, lines[0]
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
        cues.append((h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000, " ".join(lines[1:])))
    return cues


@pytest.mark.parametrize("kind", ["srt", "vtt"])
def test_transcribe_writes_subtitles_with_monotonic_timestamps(worker, speech, kind, tmp_path):
    audio = concat(*[x for u in speech[:3] for x in (read_wav(u.path), silence(1.0))])
    wav = tmp_path / "three.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(audio.pcm)
    out_file = tmp_path / f"out.{kind}"
    out = run_cli("transcribe", str(wav), "--url", worker.url, "--format", kind, "--output", str(out_file))
    assert out.returncode == 0, out.stderr
    cues = parse_cues(out_file.read_text(), kind)
    assert len(cues) >= 3
    for (a, b, _), (c, _, _) in zip(cues, cues[1:] + [(float("inf"), 0, "")]):
        assert 0 <= a < b <= c
    assert cues[-1][1] <= audio.seconds
    text = " ".join(t for _, _, t in cues)
    assert word_errors(" ".join(u.reference for u in speech[:3]), text).wer <= 0.3


def test_transcribe_on_a_terminal_updates_partials_in_place(worker, speech_by_id):
    """Run under a pseudo-terminal: the live line is redrawn (CR + erase) with grey partials and a bar."""
    utt = speech_by_id["jfk"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with its stdout on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "host.cli", "transcribe", str(utt.path), "--url", worker.url,
                                  "--speed", "4"])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, screen
    assert "\r\x1b[2K\x1b[90m" in screen or "\r\x1b[2K[" in screen  # the live line is redrawn
    assert "%" in screen and "#" in screen  # the progress bar
    assert "\x1b[90m" in screen  # grey partial text
    assert "fellow americans" in screen.lower()


def test_transcribe_mic_without_a_device_says_why():
    out = run_cli("transcribe", "--mic")
    assert out.returncode == 2 and ("--mic needs" in out.stderr or "no input device" in out.stderr), out.stderr
    out = run_cli("transcribe")
    assert out.returncode == 2 and "WAV file or --mic" in out.stderr


BLAS_THREADS = """
import ctypes, host, numpy
numpy.ones((64, 64)) @ numpy.ones((64, 64))
paths = sorted({line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()})
for path in paths:
    lib = ctypes.CDLL(path)
    for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
        if hasattr(lib, name):
            print(getattr(lib, name)())
            raise SystemExit
print("none")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_numpy_blas_runs_one_thread_unless_the_operator_says_otherwise():
    """numpy's OpenBLAS threads spin after each call and take cores from the decoders."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", BLAS_THREADS], env=env, capture_output=True, text=True, check=True)
    if out.stdout.strip() == "none":
        pytest.skip("numpy here is not linked to OpenBLAS")
    assert out.stdout.strip() == "1"
    if (os.cpu_count() or 1) >= 2:
        env["OPENBLAS_NUM_THREADS"] = "2"
        out = subprocess.run([sys.executable, "-c", BLAS_THREADS], env=env, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == "2"
