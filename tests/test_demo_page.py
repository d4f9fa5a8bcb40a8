"""The demo page (host/web/index.html) in headless Chromium against a real worker.

Chromium's fake microphone plays a WAV built from real speech; the page captures it with its
AudioWorklet and streams it to /session. A second test uploads a WAV through "Transcribe a file".
Both check what the page tells a first-time user (help texts, the engine and variant in use, the
input level, per-word confidence, the end-of-speech → final latency) from the DOM, never by timing.
Skipped when /usr/bin/chromium or playwright is missing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import struct
import threading
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


# --- resume after a lost connection -------------------------------------------------------------

# Records, from inside the page, every WebSocket it opens: its URL, what it sent (text, or the byte
# length of binary frames), every message it received and its close code.
RECORD_SOCKETS = """(() => {
  const Native = window.WebSocket;
  window.sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      const log = this.log = {url: String(args[0]), sent: [], received: [], close: null};
      window.sockets.push(log);
      this.addEventListener("message", (ev) => log.received.push(JSON.parse(ev.data)));
      this.addEventListener("close", (ev) => { log.close = ev.code; });
    }
    send(data) {
      if (this.readyState === Native.OPEN) this.log.sent.push(typeof data === "string" ? data : data.byteLength);
      super.send(data);
    }
  };
})()"""
# Every state of the connection line under the status, in order.
OBSERVE_CONNECTION = """() => {
  const el = document.getElementById("connection");
  window.connectionStates = [];
  new MutationObserver(() => window.connectionStates.push({state: el.dataset.state ?? null, text: el.textContent}))
    .observe(el, {attributes: true, attributeFilter: ["data-state"]});
}"""
RESUME_UTTERANCES = ["533-1066-0009", "jfk"]
RESUME_CUT_S = 4.0  # into the second utterance


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 between the page and the worker, over a network that fails once.

    Everything passes through unchanged, except the first ``/session`` connection: once the page has
    sent ``hold_after`` bytes of WebSocket frames on it, the rest of what it sends is held back (never
    reaches the worker), as on a link gone dead mid-stream; :meth:`drop` then resets both sides of it,
    the page's and the worker's, without a close frame. Later connections (the page's reconnects) pass."""

    def __init__(self, upstream_port: int, hold_after: int):
        self.upstream_port, self.hold_after = upstream_port, hold_after
        self.held = threading.Event()
        self.victim: tuple | None = None  # the first /session connection's two transports
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.http = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.transport.abort()
            return
        head = b""
        while b"\r\n\r\n" not in head:  # the request (an HTTP GET or the WebSocket handshake)
            chunk = await client_r.read(65536)
            if not chunk:
                client_w.close()
                up_w.close()
                return
            head += chunk
        victim = head.startswith(b"GET /session") and self.victim is None
        if victim:
            self.victim = (client_w.transport, up_w.transport)
        up_w.write(head)
        forwarded = len(head) - head.index(b"\r\n\r\n") - 4

        async def page_to_worker() -> None:
            nonlocal forwarded
            while data := await client_r.read(65536):
                if victim:
                    data = data[:max(0, self.hold_after - forwarded)]
                    forwarded += len(data)
                    if forwarded >= self.hold_after:
                        self.held.set()
                if data:
                    up_w.write(data)
                    await up_w.drain()

        async def worker_to_page() -> None:
            while data := await up_r.read(65536):
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.ensure_future(page_to_worker()), asyncio.ensure_future(worker_to_page())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except (ConnectionError, OSError):
            pass
        for pump in pumps:
            pump.cancel()
        client_w.close()
        up_w.close()

    def drop(self) -> None:
        """Reset both sides of the held connection (RST: SO_LINGER 0), as a network gone away does."""
        async def reset() -> None:
            for transport in self.victim:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
        self._run(reset())

    def close(self) -> None:
        self.server.close()
        self._run(self.server.wait_closed())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_file_session_resumes_after_a_dropped_connection(browser, worker, speech_by_id, tmp_path):
    """The page's connection dies mid-stream without a close frame (a proxy holds back what the page
    sends, then resets both sides): the page shows it is resuming, reconnects, resumes with the last
    seq it got, sends again the audio the worker lacks, and the session ends whole, each final once."""
    parts, reference = [silence(0.5)], []
    for i, uid in enumerate(RESUME_UTTERANCES):
        parts += [read_wav(speech_by_id[uid].path), silence(1.5 if i == 0 else 1.0)]
        reference.append(speech_by_id[uid].reference)
    audio = concat(*parts)
    cut = len(concat(*parts[:3]).pcm) + int(RESUME_CUT_S * 16000) * 2  # bytes of audio the worker gets first
    wav = write_wav(tmp_path / "two-utterances.wav", audio)
    # The page sends 0.1 s frames: 3200 bytes of audio plus an 8-byte (masked) frame header.
    proxy = FlakyProxy(worker.port, hold_after=cut // 3200 * 3208)
    try:
        page = browser.new_page(accept_downloads=True)
        page.add_init_script(RECORD_SOCKETS)
        page.console_lines = []
        page.on("console", lambda m: page.console_lines.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: page.console_lines.append(f"pageerror: {e}"))
        page.goto(proxy.http + "/")
        page.wait_for_function("document.querySelector('#engine').options.length > 0", timeout=10_000)
        assert page.is_hidden("#connection")
        page.evaluate(OBSERVE_CONNECTION)
        page.set_input_files("#file", str(wav))

        # The worker has the first utterance and part of the second; the first one's final and its
        # audio.ack reach the page (the link back still works). Then the connection dies.
        assert proxy.held.wait(60), "the page never sent that much audio"
        page.wait_for_function("window.sockets[0].received.some(m => m.type === 'audio.ack')", timeout=60_000)
        page.wait_for_selector("#transcript .final", timeout=30_000)
        assert page.evaluate("window.sockets.length") == 1 and page.is_hidden("#connection")
        proxy.drop()
        page.wait_for_selector("#connection[data-state=resumed]", timeout=60_000)
        save_screenshot(page, tmp_path, "demo-page-resumed.png")
        wait_done(page, timeout_ms=60_000)
        sockets = page.evaluate("window.sockets")
        states = page.evaluate("window.connectionStates")
        lines = page.eval_on_selector_all("#transcript .final", FINAL_LINES)
        taken = page.evaluate("sentSamples") * 2  # the audio bytes the page took from the file
        end = json.loads(download(page, "json", tmp_path))
    finally:
        proxy.close()

    # What the user saw: connection lost, resuming (as often as it took), resumed; no error.
    kinds = [s["state"] for s in states]
    assert kinds and kinds[0] == "resuming" and kinds[-1] == "resumed" and set(kinds) == {"resuming", "resumed"}, states
    assert "Connection lost" in states[0]["text"] and "Resumed" in page.text_content("#connection")
    assert page.text_content("#alerts") == "", page.text_content("#alerts")
    assert page.get_attribute("#session-info", "data-state") == "ended"

    first, last, between = sockets[0], sockets[-1], sockets[1:-1]
    assert "resumable=true" in first["url"] and first["close"] == 1006, first["close"]
    begin = first["received"][0]
    assert begin["type"] == "session.begin" and begin["seq"] == 1 and begin["resume_token"]
    last_seq = max(m["seq"] for m in first["received"])
    acks = [m["bytes"] for m in first["received"] if m["type"] == "audio.ack"]
    assert acks and acks[-1] <= cut
    # Reconnects the worker refused because it had not yet seen the old connection go: retried.
    for s in between:
        assert [m.get("code") for m in s["received"]] in ([], ["resume_in_use"]) and s["sent"] == [], s
    assert f"resume={begin['resume_token']}&last_seq={last_seq}" in last["url"], last["url"]
    resumed = last["received"][0]
    assert resumed["type"] == "session.resumed" and resumed["session_id"] == begin["session_id"], resumed
    assert resumed["last_seq"] == last_seq
    # The worker had every byte up to the hold (less a frame cut short), and the page sent the rest
    # from there: nothing missing, nothing twice.
    assert acks[-1] <= resumed["ack_bytes"] <= resumed["audio_bytes"] <= cut, (acks, resumed, cut)
    binary = [n for n in last["sent"] if isinstance(n, int)]
    assert resumed["audio_bytes"] + sum(binary) == taken, (resumed, sum(binary), taken)
    assert [t for t in last["sent"] if isinstance(t, str)] == ['{"type":"end"}']
    assert taken / 32000 == pytest.approx(audio.seconds, abs=0.15)
    assert end["total_duration"] == pytest.approx(audio.seconds, abs=0.15)

    # Every message once: seq 1, 2, 3… across both connections, the replay included.
    received = first["received"] + last["received"][1:]
    assert [m["seq"] for m in received] == list(range(1, len(received) + 1))
    assert page.evaluate("resume.lastSeq") == len(received)
    finals = [m for m in received if m["type"] == "transcript.final"]
    before = [f for f in finals if f in first["received"]]
    assert before and len(before) < len(finals), "no final on both sides of the drop"
    assert all(f["end"] <= cut / 32000 + 0.5 for f in before), before
    assert [f["segment_id"] for f in finals] == list(range(len(finals)))
    assert [f["utterance_id"] for f in finals] == sorted({f["utterance_id"] for f in finals})
    # On screen: each final once, in order, and the session's end has exactly those.
    assert received[-1] == end and end["type"] == "session.end"
    assert [line["text"] for line in lines] == [f["text"] for f in finals] == [s["text"] for s in end["segments"]]
    assert [s["id"] for s in end["segments"]] == [f["segment_id"] for f in finals]
    assert end["transcript"] == " ".join(f["text"] for f in finals)
    counts = word_errors(" ".join(reference), end["transcript"])
    print(f"resumed file WER {counts.wer:.3f} ({counts.errors}/{counts.words}) after "
          f"{len(sockets) - 1} reconnect(s), {resumed}: {end['transcript']!r}")
    assert counts.wer <= MAX_WER, (reference, end["transcript"])
    page.close()
