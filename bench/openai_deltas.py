"""OpenAI Realtime transcription deltas on real speech: do they grow while the speaker talks, and do
they always add up to a prefix of the item's ``completed`` transcript?

Streams the English dev set (../shared/speech) clip by clip through the real ``openai`` SDK (GA client,
server VAD, 24 kHz pcm16 at real time) into a running worker, once with ``?deltas=live`` (the default)
and once with ``?deltas=final``, and prints per mode:

- items, and the share whose deltas concatenate to a prefix of their ``completed`` transcript;
- live share: words of the ``completed`` transcript that had arrived as deltas before the item's
  ``input_audio_buffer.speech_stopped`` (so while its speaker was talking), mean over items;
- WER of the ``completed`` transcripts (jiwer, Whisper's English normaliser).

    engine-host serve --port 9000 &
    python bench/openai_deltas.py --url ws://127.0.0.1:9000 [--limit 24] [--speed 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import sys
from pathlib import Path

import numpy as np
import soxr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host.client import concat, read_wav, silence  # noqa: E402
from host.wer import WerCounts, field_errors  # noqa: E402

MANIFEST = ROOT.parent / "shared" / "speech" / "manifest.tsv"
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


async def one_clip(url: str, deltas: str, audio, speed: float) -> list:
    """The events of one clip's session, in order."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="bench", websocket_base_url=f"{url}/v1")
    pcm = soxr.resample(np.frombuffer(audio.pcm, dtype="<i2"), audio.sample_rate, 24000).astype("<i2").tobytes()
    events: list = []
    async with client.realtime.connect(model="gpt-4o-transcribe",
                                       extra_query={"intent": "transcription", "deltas": deltas}) as conn:
        async def collect():
            async for event in conn:
                events.append(event)
        reader = asyncio.create_task(collect())
        piece = 4800  # 100 ms
        for i in range(0, len(pcm), piece):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + piece]).decode())
            await asyncio.sleep(0.1 / speed)
        while sum(e.type == COMPLETED for e in events) < sum(e.type == "input_audio_buffer.committed" for e in events):
            await asyncio.sleep(0.05)
        reader.cancel()
    return events


def score(events: list) -> tuple[int, int, list[float], str]:
    """(items, items whose deltas are a prefix of their transcript, live shares, the transcript)."""
    items = prefix = 0
    live: list[float] = []
    texts = []
    for done in (e for e in events if e.type == COMPLETED):
        seq = [e for e in events if getattr(e, "item_id", None) == done.item_id]
        sent = "".join(e.delta for e in seq if e.type == DELTA)
        stopped = next((i for i, e in enumerate(seq) if e.type == "input_audio_buffer.speech_stopped"), len(seq))
        early = "".join(e.delta for e in seq[:stopped] if e.type == DELTA)
        items += 1
        prefix += done.transcript.startswith(sent)
        words = len(done.transcript.split())
        if words:
            live.append(len(early.split()) / words)
        texts.append(done.transcript)
    return items, prefix, live, " ".join(texts)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a running worker, ws://host:port")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--modes", default="live,final", help="comma-separated ?deltas= values to run")
    args = parser.parse_args()
    rows = list(csv.DictReader(MANIFEST.open(), delimiter="\t"))[: args.limit]
    for mode in args.modes.split(","):
        items = prefix = 0
        live: list[float] = []
        wer = WerCounts(0, 0)
        for row in rows:
            audio = concat(silence(0.5), read_wav(MANIFEST.parent / row["path"]), silence(1.5))
            n, p, shares, text = score(await one_clip(args.url, mode, audio, args.speed))
            items, prefix, live = items + n, prefix + p, live + shares
            wer += field_errors(row["reference"], text, "en")
        mean_live = sum(live) / len(live) if live else 0.0
        print(f"deltas={mode}: {items} items, deltas a prefix of the transcript in {prefix}/{items}, "
              f"live share {mean_live:.2f} of the words before speech_stopped, WER {wer.wer:.4f} over {wer.words} words")


if __name__ == "__main__":
    asyncio.run(main())
