"""Live engines.d reload (SIGHUP): add, break and remove engine files while a session runs."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time

import yaml

from host.client import concat, read_wav, session_url, silence, stream

from .support import ENGINES, WorkerProcess, http_get


def engine_ids(worker) -> list[str]:
    return [e["id"] for e in http_get(worker.http + "/engines")[1]]


async def wait_for_engines(worker, expected: list[str], timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while (ids := engine_ids(worker)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return ids


async def test_reload_adds_breaks_and_removes_engines_without_dropping_sessions(tmp_path, speech):
    engines = tmp_path / "engines.d"
    engines.mkdir()
    shutil.copy(ENGINES / "whisper-streaming.yaml", engines)
    worker = WorkerProcess(tmp_path, engines_dir=engines)
    worker.wait_healthy()
    audio = concat(*[x for u in speech[:3] for x in (read_wav(u.path), silence(1.0))])
    try:
        first = asyncio.create_task(stream(session_url(worker.url, interim_results=False), audio, speed=1.5))
        await asyncio.sleep(1.0)

        # A second engine: greedy decoding of the same model under another id, fast variant only.
        spec = yaml.safe_load((ENGINES / "whisper-streaming.yaml").read_text())
        spec["id"], spec["name"] = "whisper-second", "Second engine"
        spec["capabilities"]["models"] = ["fast"]
        spec["pipeline"]["asr"]["options"]["models"] = {"fast": spec["pipeline"]["asr"]["options"]["models"]["fast"]}
        spec["config_schema"]["properties"]["model"] = {"type": "string", "enum": ["fast"], "default": "fast"}
        (engines / "second.yaml").write_text(yaml.safe_dump(spec))
        worker.proc.send_signal(signal.SIGHUP)
        assert await wait_for_engines(worker, ["whisper-second", "whisper-streaming"]) == [
            "whisper-second", "whisper-streaming"], worker.log()
        jfk = concat(read_wav(speech[3].path), silence(1.0))
        second = await stream(session_url(worker.url, engine="whisper-second"), jfk, speed=None)
        assert second.of("session.begin")[0]["engine"] == "whisper-second" and second.finals

        # A broken file is reported and ignored; a broken edit of a loaded engine keeps its last version.
        (engines / "broken.yaml").write_text("id: [unclosed\n")
        (engines / "second.yaml").write_text(yaml.safe_dump({**spec, "pipeline": {"asr": {}}}))
        worker.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "second.yaml" not in worker.log() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        log = worker.log()
        assert "broken.yaml: invalid YAML" in log and "second.yaml: pipeline" in log
        assert engine_ids(worker) == ["whisper-second", "whisper-streaming"]

        # Removing the file retires the engine: new sessions cannot pick it.
        (engines / "second.yaml").unlink()
        (engines / "broken.yaml").unlink()
        worker.proc.send_signal(signal.SIGHUP)
        assert await wait_for_engines(worker, ["whisper-streaming"]) == ["whisper-streaming"]
        refused = await stream(session_url(worker.url, engine="whisper-second"), jfk, speed=None)
        assert refused.of("error")[0]["code"] == "invalid_config" and refused.close_code == 1008

        result = await first  # the session that ran through all of it
        assert not result.of("error") and result.close_code == 1000
        assert len(result.finals) >= 3
        assert result.end["total_duration"] == round(audio.seconds, 3)
    finally:
        worker.stop()
    assert "Traceback" not in worker.log()


async def test_watched_directory_reloads_without_a_signal(tmp_path):
    engines = tmp_path / "engines.d"
    engines.mkdir()
    shutil.copy(ENGINES / "whisper-streaming.yaml", engines)
    worker = WorkerProcess(tmp_path, engines_dir=engines, engines_watch_s=0.3)
    worker.wait_healthy()
    try:
        spec = yaml.safe_load((ENGINES / "whisper-streaming.yaml").read_text())
        spec["id"] = "a-first-engine"  # a.yaml sorts first, so it is listed first, as after a restart
        (engines / "a.yaml").write_text(yaml.safe_dump(spec))
        assert await wait_for_engines(worker, ["a-first-engine", "whisper-streaming"], timeout=30) == [
            "a-first-engine", "whisper-streaming"], worker.log()
    finally:
        worker.stop()
