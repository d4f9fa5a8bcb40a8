"""Session recording: the received audio as a 16 kHz WAV and the final transcript as JSON.

Off unless ``SESSIONS_DIR`` is set. Files go to ``{dir}/{YYYY-MM-DD}/{session_id}.wav``
and ``.json``. All file work runs in order on one background thread the worker
shares between recordings, never on the event loop. Audio is written in chunks of about a second,
and the WAV header's sizes are rewritten after every chunk, so a worker that
crashes mid-session leaves a valid WAV of everything up to the last chunk.

A session may keep less than the worker records (:class:`Keep`: Dalston's ``store_audio`` and
``store_transcript``, host/compat/dalston.py): the part it does not keep is never written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from host.contracts import SAMPLE_RATE

log = logging.getLogger(__name__)

CHUNK_SAMPLES = SAMPLE_RATE  # about one second per write


def wav_header(data_bytes: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte PCM s16le mono WAV header for ``data_bytes`` of samples."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


@dataclass(frozen=True)
class Keep:
    """What of a session's recording is kept (both by default)."""

    audio: bool = True
    transcript: bool = True


KEEP_ALL = Keep()

class SessionRecorder:
    """Writes one session's audio and transcript; every method is safe to call from the event loop."""

    def __init__(self, directory: Path, session_id: str, io: ThreadPoolExecutor, keep: Keep = KEEP_ALL):
        self.keep = keep
        day = time.strftime("%Y-%m-%d", time.gmtime())
        self.wav_path = directory / day / f"{session_id}.wav"
        self.json_path = directory / day / f"{session_id}.json"
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._data_bytes = 0
        self._file: BinaryIO | None = None
        self._failed: str | None = None
        self._io = io  # one thread shared by all recordings: writes stay in order and off the loop
        self._last: asyncio.Future | None = None

    @property
    def audio_uri(self) -> str:
        return self.wav_path.resolve().as_uri()

    @property
    def transcript_uri(self) -> str:
        return self.json_path.resolve().as_uri()

    def append(self, samples: np.ndarray) -> None:
        """Record float32 16 kHz samples; written in ~1 s chunks."""
        if self._failed is not None or not samples.size or not self.keep.audio:
            return
        self._pending.append(samples)
        self._pending_samples += samples.size
        if self._pending_samples >= CHUNK_SAMPLES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pcm = np.clip(np.concatenate(self._pending), -1.0, 1.0)
        self._pending, self._pending_samples = [], 0
        data = (pcm * 32767.0).round().astype("<i2").tobytes()
        self._submit(self._write_audio, data)

    async def close(self, transcript: dict[str, Any]) -> tuple[str | None, str | None] | None:
        """Write the rest of the audio and the transcript JSON; return (audio_uri, transcript_uri),
        each None when not kept, or None when recording failed (the session is never failed for it)."""
        self._flush()
        self._submit(self._finish, transcript)
        assert self._last is not None  # _submit set it
        try:
            await self._last
        except Exception:  # noqa: BLE001 - reported in _failed
            pass
        if self._failed is not None:
            return None
        return (self.audio_uri if self.keep.audio else None,
                self.transcript_uri if self.keep.transcript else None)

    def _submit(self, fn, arg) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.run_in_executor(self._io, self._guarded, fn, arg)

    def _guarded(self, fn, arg) -> None:
        if self._failed is not None:
            return
        try:
            fn(arg)
        except OSError as exc:
            self._failed = f"{type(exc).__name__}: {exc}"
            log.error("recording %s failed: %s", self.wav_path, self._failed)

    # --- on the recording thread ------------------------------------------------

    def _write_audio(self, data: bytes) -> None:
        if self._file is None:
            self.wav_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.wav_path, "w+b")
            self._file.write(wav_header(0))
        f = self._file
        f.write(data)
        self._data_bytes += len(data)
        # Keep the header true after every chunk: a crash leaves a readable file.
        end = f.tell()
        f.seek(0)
        f.write(wav_header(self._data_bytes))
        f.seek(end)
        f.flush()

    def _finish(self, transcript: dict[str, Any]) -> None:
        if self.keep.audio:
            if self._file is None:
                self._write_audio(b"")
            assert self._file is not None
            self._file.close()
        if not self.keep.transcript:
            return
        if not self.keep.audio:  # the document must not name a file that was never written
            transcript = {**transcript, "audio_file": None}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(transcript, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, self.json_path)  # readers never see half a transcript


def delete_older_than(directory: Path, max_age_s: float) -> int:
    """Delete recordings (and emptied day folders) older than ``max_age_s``; return files removed."""
    cutoff = time.time() - max_age_s
    removed = 0
    for path in directory.glob("*/*"):
        if path.suffix in (".wav", ".json") and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed += 1
    for day in directory.glob("*"):
        if day.is_dir() and not any(day.iterdir()):
            day.rmdir()
    return removed


async def retention_loop(directory: Path, max_age_s: float, stop: asyncio.Event, every_s: float = 3600.0) -> None:
    """Apply the retention period now and then every ``every_s`` (file work off the loop)."""
    while not stop.is_set():
        try:
            removed = await asyncio.to_thread(delete_older_than, directory, max_age_s)
            if removed:
                log.info("retention: deleted %d recording file(s) older than %.0f h", removed, max_age_s / 3600)
        except OSError as exc:
            log.warning("retention sweep of %s failed: %s", directory, exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        except TimeoutError:
            pass
