"""The demo page (host/web/index.html) in headless Chromium against a real worker.

Chromium's fake microphone plays a WAV built from real speech; the page captures it with its
AudioWorklet and streams it to /session. A second test uploads a WAV through "Transcribe a file".
Skipped when /usr/bin/chromium or playwright is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
import wave
from pathlib import Path

import pytest

from host.client import Audio, concat, read_wav, silence
from host.wer import word_errors
from tests.support import http_get

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
MIC_UTTERANCES = ["librivox-sas01-0880", "1688-142285-0009", "533-1066-0009"]
FILE_UTTERANCE = "jfk"
LEAD_S, GAP_S, TAIL_S = 1.0, 1.0, 1.5
MAX_WER = 0.35
GREY_PARTIAL = "rgb(107, 107, 107)"  # --grey in the page's CSS

# Records, from inside the page, what the test cannot poll reliably: every VAD state change and
# every partial line that was ever shown (the final replaces it in place).
OBSERVE = """() => {
  window.seen = {vad: [], partials: []};
  new MutationObserver(() => window.seen.vad.push(document.getElementById("vad").classList.contains("active")))
    .observe(document.getElementById("vad"), {attributes: true, attributeFilter: ["class"]});
  new MutationObserver(() => {
    for (const el of document.querySelectorAll("#transcript .partial"))
      window.seen.partials.push({text: el.lastChild.textContent, color: getComputedStyle(el).color});
  }).observe(document.getElementById("transcript"), {subtree: true, childList: true, characterData: true,
                                                      attributes: true});
}"""


def write_wav(path: Path, audio: Audio) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(audio.channels)
        w.setsampwidth(2)
        w.setframerate(audio.sample_rate)
        w.writeframes(audio.pcm)
    return path


@pytest.fixture(scope="module")
def mic_audio(speech_by_id, tmp_path_factory):
    """The fake microphone's WAV (16 kHz mono; Chromium converts it to the capture rate), its length
    and the references of the utterances in it."""
    parts = [silence(LEAD_S)]
    for i, uid in enumerate(MIC_UTTERANCES):
        parts += [read_wav(speech_by_id[uid].path), silence(TAIL_S if i == len(MIC_UTTERANCES) - 1 else GAP_S)]
    audio = concat(*parts)
    path = write_wav(tmp_path_factory.mktemp("mic") / "mic.wav", audio)
    return path, audio.seconds, " ".join(speech_by_id[u].reference for u in MIC_UTTERANCES)


@pytest.fixture(scope="module")
def browser(mic_audio):
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    wav = mic_audio[0]
    with sync_playwright() as p:
        try:
            # %noloop: play the file once, then silence; Chromium loops it by default.
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}%noloop"])
        except PlaywrightError as e:
            pytest.skip(f"{CHROMIUM} does not start under playwright: {e}")
        yield b
        b.close()


def open_page(browser, worker, path: str = "/"):
    page = browser.new_page(accept_downloads=True)
    page.console_lines = []
    page.on("console", lambda m: page.console_lines.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.console_lines.append(f"pageerror: {e}"))
    page.goto(worker.http + path)
    page.wait_for_function("document.querySelector('#engine').options.length > 0", timeout=10_000)
    return page


def download(page, fmt: str, tmp_path: Path) -> str:
    with page.expect_download() as info:
        page.click(f"[data-format={fmt}]")
    target = tmp_path / info.value.suggested_filename
    info.value.save_as(target)
    assert target.suffix == "." + fmt
    return target.read_text(encoding="utf-8")


def wait_done(page, timeout_ms: int = 30_000) -> None:
    page.wait_for_selector("#start:enabled", timeout=timeout_ms)
    assert page.text_content("#status").startswith("Done"), (page.text_content("#status"),
                                                              page.text_content("#alerts"), page.console_lines)


def parse_cues(text: str, sep: str) -> list[tuple[float, float, str]]:
    """Cues of an SRT (sep ',') or WebVTT (sep '.') file; checks their syntax on the way."""
    stamp = rf"(\d\d):(\d\d):(\d\d){re.escape(sep)}(\d\d\d)"
    blocks = [b for b in text.strip("\n").split("\n\n")]
    if sep == ".":
        assert blocks.pop(0) == "WEBVTT"
    cues = []
    for i, block in enumerate(blocks, 1):
        rows = block.split("\n")
        if sep == ",":
            assert rows.pop(0) == str(i), block
        m = re.fullmatch(rf"{stamp} --> {stamp}", rows[0])
        assert m, rows[0]
        g = [int(x) for x in m.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        assert len(rows) == 2 and rows[1].strip(), block
        cues.append((start, end, rows[1]))
    return cues


def check_subtitles(page, tmp_path: Path, segments: list[dict]) -> None:
    for fmt, sep in (("srt", ","), ("vtt", ".")):
        cues = parse_cues(download(page, fmt, tmp_path), sep)
        assert [c[2] for c in cues] == [s["text"] for s in segments]
        for (start, end, _), seg in zip(cues, segments):
            assert start == pytest.approx(seg["start"], abs=0.0011) and end == pytest.approx(seg["end"], abs=0.0011)
            assert start <= end
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(cues)), cues
    txt = download(page, "txt", tmp_path)
    assert txt.splitlines() == [s["text"] for s in segments]


def save_screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("TEST_ARTIFACTS_DIR"):
        os.makedirs(os.environ["TEST_ARTIFACTS_DIR"], exist_ok=True)
        path = Path(shutil.copy(path, os.environ["TEST_ARTIFACTS_DIR"]))
    print(f"demo page screenshot: {path}")


def test_microphone_session(browser, worker, mic_audio, tmp_path):
    _wav, duration, reference = mic_audio
    page = open_page(browser, worker)
    # The pickers come from GET /engines.
    _, engines = http_get(worker.http + "/engines")
    assert page.eval_on_selector_all("#engine option", "os => os.map(o => o.value)") == [e["id"] for e in engines]
    assert (page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
            == engines[0]["capabilities"]["models"])
    languages = 'os => os.map(o => o.value)'
    # Each variant offers the languages it serves: fast (tiny.en) English only, accurate detection and 99.
    assert page.eval_on_selector_all("#language option", languages) == ["en"]
    page.select_option("#model", "accurate")
    offered = page.eval_on_selector_all("#language option", languages)
    assert offered[0] == "auto" and {"de", "es", "fr", "pt"} <= set(offered), offered
    assert "German (de)" in page.inner_text("#language")
    assert "Whisper base" in page.inner_text("#model")
    page.select_option("#model", "fast")
    assert page.eval_on_selector_all("#language option", languages) == ["en"]
    page.check("#words")
    page.evaluate(OBSERVE)

    started = time.monotonic()
    page.click("#start")
    page.wait_for_selector("#transcript .final", timeout=30_000)
    try:  # catch the next utterance's partial on the screenshot, if it comes in time
        page.wait_for_selector("#transcript .partial", timeout=4_000)
    except PlaywrightError:
        pass
    save_screenshot(page, tmp_path, "demo-page-live.png")
    # Stop once the whole file has played (a pause inside an utterance may split it, so counting
    # finals is not enough); Stop finalizes what is still open.
    page.wait_for_timeout(max(0.0, duration + 1.0 - (time.monotonic() - started)) * 1000)
    status = page.text_content("#status")
    page.click("#stop")
    wait_done(page)
    save_screenshot(page, tmp_path, "demo-page-microphone.png")

    end = json.loads(download(page, "json", tmp_path))
    assert end["type"] == "session.end" and end["segments"], end
    segments = end["segments"]
    shown = page.eval_on_selector_all("#transcript .final", "els => els.map(e => [e.firstChild.textContent,"
                                                            " e.lastChild.textContent])")
    assert [text for _, text in shown] == [s["text"] for s in segments]
    assert all(re.fullmatch(r"\d\d:\d\d\.\d–\d\d:\d\d\.\d", t) for t, _ in shown), shown
    assert page.locator("#transcript .partial").count() == 0
    assert all("words" in s for s in segments)
    # Session time 0 is where the page started sending, a little into the file. Should the file
    # loop anyway, its second pass starts LEAD_S of silence after `duration`, so segments starting
    # before `duration - 0.5` belong to the first pass as long as that lag stays under LEAD_S + 0.5 s.
    first_pass = [s for s in segments if s["start"] < duration - 0.5]
    hypothesis = " ".join(s["text"] for s in first_pass)
    counts = word_errors(reference, hypothesis)
    print(f"microphone WER {counts.wer:.3f} ({counts.errors}/{counts.words}), {status}\n"
          f"  segments: {[(s['start'], s['end'], s['text']) for s in segments]}")
    assert counts.wer <= MAX_WER, (reference, hypothesis)

    seen = page.evaluate("window.seen")
    assert seen["partials"], "no partial was ever shown"
    assert all(p["color"] == GREY_PARTIAL for p in seen["partials"]), seen["partials"][:3]
    assert True in seen["vad"] and False in seen["vad"], seen["vad"]
    assert page.get_attribute("#vad", "class") in ("", None)
    check_subtitles(page, tmp_path, segments)
    page.close()


def test_file_upload(browser, worker, speech_by_id, tmp_path):
    utt = speech_by_id[FILE_UTTERANCE]
    page = open_page(browser, worker)
    started = time.monotonic()
    page.set_input_files("#file", str(utt.path))
    wait_done(page)
    elapsed = time.monotonic() - started
    end = json.loads(download(page, "json", tmp_path))
    assert end["total_duration"] == pytest.approx(utt.duration, abs=0.15)
    counts = word_errors(utt.reference, end["transcript"])
    print(f"file upload WER {counts.wer:.3f} ({counts.errors}/{counts.words}) in {elapsed:.1f} s "
          f"for {utt.duration:.1f} s of audio: {end['transcript']!r}")
    assert counts.wer <= MAX_WER, (utt.reference, end["transcript"])
    check_subtitles(page, tmp_path, end["segments"])
    save_screenshot(page, tmp_path, "demo-page-file.png")
    page.close()


def test_errors_are_shown(browser, worker):
    page = open_page(browser, worker, "/web/index.html")  # its URLs resolve as from /
    # A config the server refuses: an error message, then close 1008.
    page.eval_on_selector("#language", "s => { s.add(new Option('de', 'de', true, true)); }")
    page.click("#start")
    page.wait_for_selector("#start:enabled")
    alerts = page.text_content("#alerts")
    assert "invalid_config" in alerts and "language" in alerts and "1008" in alerts, alerts
    # A worker at capacity closes the connection with 1013 before session.begin.
    page.route_web_socket(re.compile(r".*/session\?.*"),
                          lambda ws: ws.close(code=1013, reason="Server at capacity"))
    page.eval_on_selector("#language", "s => { s.value = 'en'; }")
    page.click("#start")
    page.wait_for_function("document.querySelector('#alerts').textContent.includes('1013')", timeout=10_000)
    alerts = page.text_content("#alerts")
    assert "Server at capacity" in alerts and "busy" in alerts, alerts
    assert page.text_content("#status") == "Disconnected."
    page.close()
