"""The demo page (host/web/index.html) in headless Chromium against a real worker.

Chromium's fake microphone plays a WAV built from real speech; the page captures it with its
AudioWorklet and streams it to /session. A second test uploads a WAV through "Transcribe a file".
Both check what the page tells a first-time user (help texts, the engine and variant in use, the
input level, per-word confidence, the end-of-speech → final latency) from the DOM, never by timing.
Skipped when /usr/bin/chromium or playwright is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import statistics
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

WORD_TITLE = r"\d+\.\d\d–\d+\.\d\d s, confidence [01]\.\d\d"  # a word span's tooltip

# Records, from inside the page, what the test cannot poll reliably: every VAD state change, every
# partial line that was ever shown (the final replaces it in place), every value of the input level
# meter, and each update of the latency summary with the number of finals shown at that moment.
OBSERVE = """() => {
  const $ = (id) => document.getElementById(id);
  window.seen = {vad: [], partials: [], levels: [], latency: []};
  new MutationObserver(() => window.seen.vad.push($("vad").classList.contains("active")))
    .observe($("vad"), {attributes: true, attributeFilter: ["class"]});
  new MutationObserver(() => {
    for (const el of document.querySelectorAll("#transcript .partial"))
      window.seen.partials.push({text: el.querySelector(".text").textContent, color: getComputedStyle(el).color});
  }).observe($("transcript"), {subtree: true, childList: true, characterData: true, attributes: true});
  new MutationObserver(() => window.seen.levels.push(Number($("level").getAttribute("value"))))
    .observe($("level"), {attributes: true, attributeFilter: ["value"]});
  new MutationObserver(() => window.seen.latency.push(
      {count: Number($("latency").dataset.count), finals: document.querySelectorAll("#transcript .final").length}))
    .observe($("latency"), {attributes: true, attributeFilter: ["data-count"]});
}"""
# Each final line as the page shows it: its times, its text, its word spans and its latency.
FINAL_LINES = """els => els.map(e => ({
  time: e.querySelector("time").textContent, text: e.querySelector(".text").textContent,
  latency: e.querySelector(".lat")?.dataset.latencyMs ?? null,
  speech_latency: e.querySelector(".lat")?.dataset.speechLatencyMs ?? null,
  words: [...e.querySelectorAll(".w")].map(w => ({word: w.textContent, title: w.title, start: +w.dataset.start,
                                                  end: +w.dataset.end, confidence: w.dataset.confidence ?? null}))}))"""


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


def check_help(page, engine: dict) -> None:
    """What a first-time user is told: each control's help, and per variant its description and
    only the languages it serves (auto-detect only where it serves several)."""
    assert "microphone" in page.inner_text("#start").lower()
    assert "microphone" in page.text_content("#start-help") and "permission" in page.text_content("#start-help")
    file_help = page.text_content("#file-help")
    assert "16 kHz" in file_help and "real time" in file_help, file_help
    assert page.eval_on_selector_all("#pace option", "os => os.map(o => o.value)") == ["1", "8"]
    assert page.eval_on_selector("#pace", "s => s.value") == "8" and "8×" in page.inner_text("#pace")
    for help_id, words in (("interim-help", "partial"), ("words-help", "confidence"), ("key-help", "API keys"),
                           ("latency-help", "measured in this browser")):
        assert words.lower() in page.text_content(f"#{help_id}").lower(), help_id
    assert page.text_content("#engine-help").strip()
    page.click("#latency-help >> xpath=.. >> summary")  # "How these are measured"
    assert page.is_visible("#latency-help")
    variants = engine["capabilities"]["variants"]
    for model in engine["capabilities"]["models"]:
        page.select_option("#model", model)
        assert variants[model]["description"] in page.text_content("#model-help")
        offered = page.eval_on_selector_all("#language option", "os => os.map(o => o.value)")
        served = variants[model]["languages"]
        if len(served) == 1:  # fast (tiny.en): English only, no auto-detect
            assert offered == served, (model, offered)
            assert "only" in page.text_content("#language-help")
        else:  # accurate, multilingual: detection per utterance first, then each of Whisper's 99
            assert offered[0] == "auto" and sorted(offered[1:]) == sorted(served), (model, offered)
            assert f"among the {len(served)}" in page.text_content("#language-help")
    page.select_option("#model", "accurate")
    assert "German (de)" in page.inner_text("#language")


def check_latency(page, lines: list[dict], speech_ends_on_pause: bool) -> None:
    """Every final shows the time from its vad.speech_end's arrival to its own, and the summary is
    their median; the summary never counted more finals than were shown. Where a final also shows
    the time from sending the audio where its speech ended, that is the longer one: the server can
    only decide that speech ended after it has that audio."""
    latencies = [int(line["latency"]) for line in lines]  # None (no vad.speech_end first) fails here
    assert all(ms >= 0 for ms in latencies), latencies
    summary = page.eval_on_selector("#latency", "e => ({...e.dataset, text: e.textContent})")
    assert int(summary["count"]) == len(lines), summary
    assert abs(int(summary["medianMs"]) - statistics.median(latencies)) <= 1, (summary, latencies)
    assert "median" in summary["text"], summary
    updates = page.evaluate("window.seen.latency")
    assert updates and all(u["count"] <= u["finals"] for u in updates), updates
    # Not measured for an utterance cut by Stop or the end of a file; the microphone's WAV has a
    # second of silence after each utterance, so there each ends on a pause (the last one unless
    # the page started capturing so late that Stop came first).
    pairs = [(int(line["latency"]), int(line["speech_latency"])) for line in lines if line["speech_latency"]]
    if speech_ends_on_pause:
        assert all(line["speech_latency"] for line in lines[:-1]), lines
    assert all(speech >= decision - 1 for decision, speech in pairs), lines
    if not pairs:
        return
    summary = page.eval_on_selector("#speech-latency", "e => ({...e.dataset, text: e.textContent})")
    assert int(summary["count"]) == len(pairs), (summary, pairs)
    assert abs(int(summary["medianMs"]) - statistics.median(s for _, s in pairs)) <= 1, (summary, pairs)


def test_microphone_session(browser, worker, mic_audio, tmp_path):
    _wav, duration, reference = mic_audio
    page = open_page(browser, worker)
    # The pickers come from GET /engines.
    _, engines = http_get(worker.http + "/engines")
    assert page.eval_on_selector_all("#engine option", "os => os.map(o => o.value)") == [e["id"] for e in engines]
    assert (page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
            == engines[0]["capabilities"]["models"])
    check_help(page, engines[0])
    save_screenshot(page, tmp_path, "demo-page-options.png")
    page.select_option("#model", "fast")
    assert page.eval_on_selector_all("#language option", "os => os.map(o => o.value)") == ["en"]
    assert page.is_hidden("#session-info") and page.get_attribute("#latency", "data-count") == "0"
    assert page.text_content("#latency") == page.text_content("#speech-latency") == "no finals yet"
    page.check("#words")
    page.evaluate(OBSERVE)

    started = time.monotonic()
    page.click("#start")
    # The engine and variant in use, from session.begin.
    page.wait_for_selector("#session-info[data-state=live]", timeout=30_000)
    info = page.eval_on_selector("#session-info", "e => ({...e.dataset, text: e.innerText})")
    assert info["engine"] == engines[0]["id"] and info["model"] == "fast", info
    assert engines[0]["name"] in info["text"] and engines[0]["capabilities"]["variants"]["fast"]["description"] in info["text"]
    assert "microphone" in page.text_content("#info-source")
    assert "word timestamps on" in page.text_content("#info-options")
    assert page.is_visible("#legend") and page.is_visible("#word-info")
    page.wait_for_selector("#transcript .final", timeout=30_000)
    first = page.eval_on_selector_all("#transcript .final", FINAL_LINES)[0]
    assert first["words"] and all(w["confidence"] is not None for w in first["words"]), first
    assert first["latency"] is not None and page.get_attribute("#latency", "data-median-ms") is not None
    assert first["speech_latency"] is not None and page.get_attribute("#speech-latency", "data-median-ms")
    try:  # catch the next utterance's partial on the screenshot, if it comes in time
        page.wait_for_selector("#transcript .partial", timeout=4_000)
    except PlaywrightError:
        pass
    save_screenshot(page, tmp_path, "demo-page-live.png")
    # Stop once the whole file has played (a pause inside an utterance may split it, so counting
    # finals is not enough); Stop finalizes what is still open.
    page.wait_for_timeout(max(0.0, duration + 1.0 - (time.monotonic() - started)) * 1000)
    status = page.text_content("#status")
    levels = page.evaluate("window.seen.levels")
    page.click("#stop")
    wait_done(page)
    save_screenshot(page, tmp_path, "demo-page-microphone.png")

    # The level meter moved with the microphone (silence, then speech), and rests after Stop.
    assert len(set(levels)) >= 3 and max(levels) > 0.2 and min(levels) < max(levels), levels[:20]
    assert float(page.get_attribute("#level", "value")) == 0
    assert page.get_attribute("#session-info", "data-state") == "ended"

    end = json.loads(download(page, "json", tmp_path))
    assert end["type"] == "session.end" and end["segments"], end
    segments = end["segments"]
    lines = page.eval_on_selector_all("#transcript .final", FINAL_LINES)
    assert [line["text"] for line in lines] == [s["text"] for s in segments]
    assert all(re.fullmatch(r"\d\d:\d\d\.\d–\d\d:\d\d\.\d", line["time"]) for line in lines), lines
    assert page.locator("#transcript .partial").count() == 0
    assert all("words" in s for s in segments)
    # Word timestamps on: one span per word, with its times and confidence as the server sent them.
    for line, seg in zip(lines, segments):
        assert [w["word"] for w in line["words"]] == [w["word"] for w in seg["words"]], (line, seg)
        for shown, word in zip(line["words"], seg["words"]):
            assert float(shown["confidence"]) == pytest.approx(word["confidence"])
            assert (shown["start"], shown["end"]) == (word["start"], word["end"])
            assert re.fullmatch(WORD_TITLE, shown["title"]), shown
    assert page.eval_on_selector("#transcript .w", "w => getComputedStyle(w).borderBottomStyle") == "dotted"
    check_latency(page, lines, speech_ends_on_pause=True)
    # Pointing at the least confident word names its times and confidence under the transcript.
    low = min(range(sum(len(s["words"]) for s in segments)),
              key=lambda i: float(page.locator("#transcript .w").nth(i).get_attribute("data-confidence")))
    word = page.locator("#transcript .w").nth(low)
    word.hover()
    assert page.text_content("#word-info") == f"“{word.text_content()}”: {word.get_attribute('title')}"
    save_screenshot(page, tmp_path, "demo-page-words.png")

    # Session time 0 is where the page started sending, a little into the file. Should the file
    # loop anyway, its second pass starts LEAD_S of silence after `duration`, so segments starting
    # before `duration - 0.5` belong to the first pass as long as that lag stays under LEAD_S + 0.5 s.
    first_pass = [s for s in segments if s["start"] < duration - 0.5]
    hypothesis = " ".join(s["text"] for s in first_pass)
    counts = word_errors(reference, hypothesis)
    print(f"microphone WER {counts.wer:.3f} ({counts.errors}/{counts.words}), {status}, "
          f"latency {page.text_content('#latency')} / {page.text_content('#speech-latency')}\n"
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
    assert not page.is_checked("#words") and page.is_disabled("#rerun")
    page.evaluate(OBSERVE)
    started = time.monotonic()
    page.set_input_files("#file", str(utt.path))
    wait_done(page)
    elapsed = time.monotonic() - started
    end = json.loads(download(page, "json", tmp_path))
    assert end["total_duration"] == pytest.approx(utt.duration, abs=0.15)
    counts = word_errors(utt.reference, end["transcript"])
    print(f"file upload WER {counts.wer:.3f} ({counts.errors}/{counts.words}) in {elapsed:.1f} s "
          f"for {utt.duration:.1f} s of audio, latency {page.text_content('#latency')} / "
          f"{page.text_content('#speech-latency')}: {end['transcript']!r}")
    assert counts.wer <= MAX_WER, (utt.reference, end["transcript"])
    check_subtitles(page, tmp_path, end["segments"])
    # The file stays chosen, and the page says which file it transcribed, with which engine and variant.
    assert page.eval_on_selector("#file", "f => [...f.files].map(x => x.name)") == [utt.path.name]
    assert utt.path.name in page.text_content("#info-source") and "8×" in page.text_content("#info-source")
    assert page.get_attribute("#session-info", "data-model") == "fast"
    assert "word timestamps off" in page.text_content("#info-options")
    # Word timestamps off: plain text, no word spans, no confidence shading or legend.
    lines = page.eval_on_selector_all("#transcript .final", FINAL_LINES)
    assert [line["text"] for line in lines] == [s["text"] for s in end["segments"]]
    assert all(not line["words"] for line in lines) and page.locator("#transcript [data-confidence]").count() == 0
    assert page.is_hidden("#legend") and page.is_hidden("#word-info")
    check_latency(page, lines, speech_ends_on_pause=False)
    assert page.is_enabled("#rerun")
    save_screenshot(page, tmp_path, "demo-page-file.png")

    # "Transcribe it again" sends the same file once more, as a new session.
    first_session = end["session_id"]
    page.click("#rerun")
    page.wait_for_function(f"document.querySelector('#info-session').textContent !== {first_session!r}")
    wait_done(page)
    again = json.loads(download(page, "json", tmp_path))
    assert again["session_id"] != first_session and again["segments"], again
    assert again["total_duration"] == pytest.approx(utt.duration, abs=0.15)
    assert page.text_content("#info-session") == again["session_id"]
    assert page.eval_on_selector("#file", "f => [...f.files].map(x => x.name)") == [utt.path.name]
    page.close()


def test_errors_are_shown(browser, worker):
    page = open_page(browser, worker, "/web/index.html")  # its URLs resolve as from /
    # A config the server refuses: an error message, then close 1008.
    page.eval_on_selector("#language", "s => { s.add(new Option('de', 'de', true, true)); }")
    page.click("#start")
    page.wait_for_selector("#start:enabled")
    alerts = page.text_content("#alerts")
    assert "invalid_config" in alerts and "language" in alerts and "1008" in alerts, alerts
    assert page.is_hidden("#session-info")  # no session.begin, so no engine in use
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
