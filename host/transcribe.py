"""``engine-host transcribe``: stream a WAV file (or the microphone) to a server and print the transcript.

On a terminal the live view shows the partial of the open utterance updating in
place (grey), each final as a timestamped line, and a progress bar while a file
is sent. Not on a terminal, it prints plain final lines only. The finished
transcript is written as text, JSON, SRT or WebVTT (``--format``) to stdout or
``--output``.

The session is resumable (docs/protocol.md, "Resume"): when the connection is lost (a network drop,
a router restarted), the file or the microphone goes on where the server is, after a reconnect with
backoff, and nothing said is lost (:func:`host.client.stream_source`).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

from host.client import Audio, StreamResult, read_wav, session_url, stream, stream_source
from host.formats import WRITERS, timestamp

GREY, RESET, CLEAR_LINE = "\x1b[90m", "\x1b[0m", "\r\x1b[2K"


class LiveView:
    """What the user sees while the session runs."""

    def __init__(self, out: TextIO, total_s: float | None = None):
        self.out = out
        self.tty = out.isatty()
        self.total_s = total_s
        self.sent_s = 0.0
        self.partial = ""

    def message(self, m: dict[str, Any]) -> None:
        kind = m["type"]
        if kind == "transcript.partial":
            self.partial = m["text"]
            self._status()
        elif kind == "transcript.final":
            self.partial = ""
            line = f"[{timestamp(m['start'])[3:11]} → {timestamp(m['end'])[3:11]}] {m['text']}"
            self._line(line)
        elif kind in ("error", "warning"):
            self._line(f"{kind} {m['code']}: {m['message']}", sys.stderr)

    def sent(self, n_bytes: int, bytes_per_s: float) -> None:
        self.sent_s += n_bytes / bytes_per_s
        self._status()

    def done(self) -> None:
        if self.tty:
            self.out.write(CLEAR_LINE)
            self.out.flush()

    def _line(self, text: str, stream: TextIO | None = None) -> None:
        if self.tty:
            self.out.write(CLEAR_LINE)
        print(text, file=stream or self.out, flush=True)
        self._status()

    def _status(self) -> None:
        """The last line on a terminal: progress bar (files) and the current partial."""
        if not self.tty:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        bar = ""
        if self.total_s:
            done = min(1.0, self.sent_s / self.total_s)
            bar = f"[{'#' * int(done * 20):<20}] {done * 100:3.0f}% "
        text = (bar + self.partial)[:width]
        self.out.write(f"{CLEAR_LINE}{bar}{GREY}{text[len(bar):]}{RESET}")
        self.out.flush()


def output_format(args) -> str:
    """The transcript format asked for: ``--json`` is the same as ``--format json``."""
    return "json" if args.json else args.format


def params_for(args, audio: Audio | None) -> dict[str, Any]:
    rate = audio.sample_rate if audio is not None else 16000
    channels = audio.channels if audio is not None else 1
    # Subtitle cues keep the tight first-to-last-word times: without word timestamps a final's
    # times are its utterance's VAD bounds (pre-roll and post-roll included).
    return dict(engine=args.engine, model=args.model, language=args.language,
                word_timestamps=args.word_timestamps or output_format(args) in ("json", "srt", "vtt") or None,
                enable_vad=False if args.no_vad else None,
                sample_rate=rate if rate != 16000 else None, channels=channels if channels != 1 else None,
                api_key=args.api_key)


async def run(args) -> int:
    audio = None if args.mic else read_wav(args.file)
    fmt = output_format(args)
    # Live lines go to stdout only for plain text to a terminal-less pipe or screen; a document
    # format (or --output) keeps stdout clean, so the live view moves to stderr.
    live_out = sys.stdout if fmt == "text" and args.output is None else sys.stderr
    view = LiveView(live_out, audio.seconds if audio is not None and not args.mic else None)
    params = params_for(args, audio)

    async def session(url: str) -> StreamResult:
        if args.mic:
            return await stream_source(session_url(url, **params), microphone_frames(), on_message=view.message,
                                       interruptible=True)
        assert audio is not None  # read from the file argument when not --mic
        speed = args.speed if args.speed else (1.0 if args.realtime else None)
        per_s = audio.sample_rate * audio.channels * 2
        return await stream(session_url(url, **params), audio, speed=speed, on_message=view.message,
                            on_sent=lambda n: view.sent(n, per_s), resume=True)

    if args.url:
        result = await session(args.url)
    else:
        from host.server import Worker
        from host.settings import settings_from

        settings = settings_from(port=0, host="127.0.0.1", log_level="WARNING",
                                 engines_dir=args.engines_dir, worker_id="transcribe", endpoint="-")
        worker = Worker(settings)
        await worker.start()
        try:
            result = await session(f"ws://127.0.0.1:{worker.port}")
        finally:
            await worker.shutdown()
    view.done()
    end = result.end
    if end is None:
        print(f"no session.end received (close {result.close_code} {result.close_reason})", file=sys.stderr)
        return 1
    document = WRITERS[fmt](end)
    if args.output is not None:
        await asyncio.to_thread(Path(args.output).write_text, document, encoding="utf-8")
    else:
        if fmt == "text" and not view.tty:
            print()
        sys.stdout.write(document)
    return 0


async def microphone_frames(rate: int = 16000, frame_s: float = 0.1) -> AsyncIterator[bytes]:
    """16 kHz mono s16le frames from the default input device (needs the ``mic`` extra: sounddevice)."""
    import sounddevice  # optional: pip install 'realtime-engine-host[mic]'

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def callback(data, frames, time_info, status) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, bytes(data))

    with sounddevice.RawInputStream(samplerate=rate, channels=1, dtype="int16", blocksize=int(rate * frame_s),
                                    callback=callback):
        print("listening; Ctrl-C to stop", file=sys.stderr)
        while True:
            yield await queue.get()


def mic_available() -> str | None:
    """None when a microphone can be used, else why not."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: PortAudio itself is missing
        return f"--mic needs sounddevice and PortAudio (pip install 'realtime-engine-host[mic]'): {exc}"
    try:
        sounddevice.query_devices(kind="input")
    except Exception as exc:  # noqa: BLE001 - PortAudio reports a missing device in several ways
        return f"no input device: {exc}"
    return None
