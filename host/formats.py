"""Transcript output formats for ``engine-host transcribe``: text, JSON, SRT and WebVTT.

Each takes the ``session.end`` message (its ``segments`` carry session-time
``start``/``end`` seconds and ``text``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

FORMATS = ("text", "json", "srt", "vtt")


def timestamp(seconds: float, decimal: str = ".") -> str:
    """``HH:MM:SS.mmm`` (WebVTT) or, with ``decimal=","``, ``HH:MM:SS,mmm`` (SRT)."""
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def _cues(end: dict[str, Any]) -> list[tuple[float, float, str]]:
    cues = []
    last = 0.0
    for seg in end.get("segments", []):
        text = (seg.get("text") or "").strip()
        if not text:
            continue
        start = max(float(seg["start"]), last)  # players want cues in order and non-overlapping
        stop = max(float(seg["end"]), start + 0.001)
        cues.append((start, stop, text))
        last = stop
    return cues


def to_srt(end: dict[str, Any]) -> str:
    return "".join(f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text}\n\n"
                   for i, (a, b, text) in enumerate(_cues(end), 1))


def to_vtt(end: dict[str, Any]) -> str:
    return "WEBVTT\n\n" + "".join(f"{timestamp(a)} --> {timestamp(b)}\n{text}\n\n" for a, b, text in _cues(end))


def to_text(end: dict[str, Any]) -> str:
    return (end.get("transcript") or "").strip() + "\n"


def to_json(end: dict[str, Any]) -> str:
    return json.dumps(end, indent=2, ensure_ascii=False) + "\n"


WRITERS: dict[str, Callable[[dict[str, Any]], str]] = {"text": to_text, "json": to_json, "srt": to_srt, "vtt": to_vtt}
