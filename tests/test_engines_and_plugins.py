"""engines.d validation, the validate CLI, and third-party plugins found through entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from host.client import concat, read_wav, session_url, silence, stream
from host.engines import load_engine_file, load_engines
from host.plugins import load_plugins
from host.wer import word_errors

from .support import ENGINES, ROOT, WorkerProcess, http_get

DEFAULT = yaml.safe_load((ENGINES / "whisper-streaming.yaml").read_text())


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def write_engine(directory: Path, name: str, data) -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def variant(**changes):
    data = yaml.safe_load(yaml.safe_dump(DEFAULT))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return data


_DELETE = object()


def test_default_engine_is_valid(plugins):
    engines, errors = load_engines(ENGINES, plugins)
    assert errors == []
    (engine,) = engines
    assert engine.models == ["fast", "accurate", "multilingual"]
    assert engine.pipeline["vad"].endpointing["threshold"] == 0.5
    assert engine.pipeline["vad"].options == {"backend": "numpy", "model_file": None}
    assert engine.pipeline["asr"].options["models"]["accurate"]["beam_size"] == 5
    assert engine.pipeline["assembler"].plugin == "default"


@pytest.mark.parametrize("changes, path, reason", [
    ({"id": _DELETE}, "", "'id' is a required property"),
    ({"type": "batch"}, "type", "'realtime' was expected"),
    ({"config_schema": {"type": "nonsense"}}, "config_schema.type", "not a valid JSON Schema"),
    ({"pipeline__vad__options__threshold": 1.5}, "pipeline.vad.options.threshold", "greater than the maximum"),
    ({"pipeline__vad__options__backend": "gpu"}, "pipeline.vad.options.backend", "is not one of"),
    ({"pipeline__asr__options__models__fast__beam_size": 0}, "pipeline.asr.options.models.fast.beam_size", "less than the minimum"),
    ({"pipeline__asr__plugin": "whisperx"}, "pipeline.asr.plugin", "no asr plugin named 'whisperx'"),
    ({"capabilities__models": ["fast", "accurate", "turbo"]}, "capabilities.models[2]", "'turbo' is not defined"),
    ({"config_schema__properties__model__default": "turbo"}, "config_schema.properties.model.default", "not in capabilities.models"),
])
def test_invalid_engine_names_file_and_path(tmp_path, plugins, changes, path, reason):
    file = write_engine(tmp_path, "bad.yaml", variant(**changes))
    spec, errors = load_engine_file(file, plugins)
    assert spec is None
    text = "\n".join(map(str, errors))
    assert str(file) in text
    assert any(e.path == path and reason in e.message for e in errors), text


def test_yaml_syntax_error_names_line(tmp_path, plugins):
    file = write_engine(tmp_path, "broken.yaml", "id: x\npipeline: [unclosed\n")
    _, errors = load_engine_file(file, plugins)
    assert "broken.yaml" in str(errors[0]) and "invalid YAML: line" in str(errors[0])


def test_duplicate_engine_id(tmp_path, plugins):
    write_engine(tmp_path, "a.yaml", DEFAULT)
    write_engine(tmp_path, "b.yaml", DEFAULT)
    engines, errors = load_engines(tmp_path, plugins)
    assert len(engines) == 1
    assert "already defined" in str(errors[0]) and "b.yaml" in str(errors[0])


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def test_validate_cli_exit_codes(tmp_path):
    ok = run_cli("validate", str(ENGINES))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 valid, 0 error(s)" in ok.stdout
    write_engine(tmp_path, "good.yaml", DEFAULT)
    write_engine(tmp_path, "bad.yaml", variant(pipeline__vad__options__threshold=2))
    bad = run_cli("validate", str(tmp_path))
    assert bad.returncode == 1
    assert f"{tmp_path / 'bad.yaml'}: pipeline.vad.options.threshold:" in bad.stdout
    assert "1 valid, 1 error(s)" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr
    assert run_cli("validate", str(tmp_path / "missing")).returncode == 1


# --- third-party plugins, installed the way pip installs them: a dist-info with entry points ----

ENERGY_VAD = '''
"""A third-party VAD: RMS energy mapped to a speech probability."""
import numpy as np
from host.hookspecs import hookimpl

class EnergyVad:
    window_samples = 480
    def __init__(self, floor_db):
        self.floor_db = floor_db
    def open_stream(self):
        return self
    def probabilities(self, windows):
        rms = np.sqrt(np.mean(np.square(windows), axis=1)) + 1e-9
        db = 20 * np.log10(rms)
        return np.clip((db - self.floor_db) / 10.0, 0.0, 1.0)

@hookimpl
def register_vad(register):
    register("energy", lambda options, context: EnergyVad(**options),
             {"type": "object", "properties": {"floor_db": {"type": "number", "default": -45}},
              "additionalProperties": False})
'''


def install_fake_dist(site: Path, dist: str, module: str, source: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[engine_host]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_dist(site, "energy-vad", "energy_vad", ENERGY_VAD)
    return site


def test_plugins_cli_lists_third_party(site):
    out = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    assert "energy_vad  [energy-vad 0.1]" in out.stdout
    assert "vad: energy" in out.stdout
    assert "vad: silero" in out.stdout and "asr: faster-whisper" in out.stdout
    assert "assembler: default" in out.stdout and "registry: memory" in out.stdout


def test_engine_host_plugins_env_limits_loading(site):
    out = run_cli("plugins", env={"PYTHONPATH": str(site), "ENGINE_HOST_PLUGINS": "energy_vad"})
    assert "vad: energy" in out.stdout
    assert "silero" not in out.stdout and "faster-whisper" not in out.stdout
    assert "registry: memory" in out.stdout  # built-ins always load


def test_broken_plugins_are_named_not_tracebacks(site):
    install_fake_dist(site, "broken-import", "broken_import", "import no_such_module_anywhere\n")
    install_fake_dist(site, "bad-schema", "bad_schema", '''
        from host.hookspecs import hookimpl
        @hookimpl
        def register_vad(register):
            register("bad", lambda o, c: None, {"type": "not-a-type"})
    ''')
    out = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert out.returncode == 1
    assert "plugin 'broken_import': failed to load entry point 'broken_import': ModuleNotFoundError" in out.stderr
    assert "plugin 'bad_schema': vad 'bad' has an invalid options schema" in out.stderr
    assert "Traceback" not in out.stderr
    assert "vad: energy" in out.stdout  # the good ones still load


async def test_third_party_vad_serves_sessions(tmp_path, site, speech_by_id):
    engines = tmp_path / "engines"
    engines.mkdir()
    data = variant(id="energy-whisper")
    data["pipeline"]["vad"] = {"plugin": "energy", "options": {"floor_db": -50, "threshold": 0.5}}
    write_engine(engines, "energy.yaml", data)
    assert run_cli("validate", str(engines), env={"PYTHONPATH": str(site)}).returncode == 0
    worker = WorkerProcess(tmp_path, engines_dir=engines, env={"PYTHONPATH": str(site)})
    try:
        worker.wait_healthy()
        assert worker.health()["engines"] == ["energy-whisper"]
        utt = speech_by_id["jfk"]
        audio = concat(silence(1.0), read_wav(utt.path), silence(1.5))
        result = await stream(session_url(worker.url, engine="energy-whisper"), audio, speed=None)
        assert result.of("vad.speech_start") and result.finals
        assert word_errors(utt.reference, result.end["transcript"]).wer <= 0.3
    finally:
        worker.stop()


async def test_a_broken_engine_leaves_the_others_serving(tmp_path, speech_by_id):
    """A third party's engine whose model path is wrong is reported and not served; the shipped
    engine beside it serves (before, the factory failure made ``serve`` exit 1 for both)."""
    engines = tmp_path / "engines"
    engines.mkdir()
    write_engine(engines, "whisper-streaming.yaml", DEFAULT)
    broken = variant(id="broken-whisper")
    for options in broken["pipeline"]["asr"]["options"]["models"].values():
        options["path"] = str(tmp_path / "no-such-model")
    write_engine(engines, "zz-broken.yaml", broken)
    worker = WorkerProcess(tmp_path, engines_dir=engines)
    try:
        worker.wait_healthy()
        health = worker.health()
        assert health["engines"] == ["whisper-streaming"]
        (failed,) = health["failed_engines"]
        assert failed["id"] == "broken-whisper" and failed["status"] == "failed"
        assert "no-such-model" in failed["reason"] and "asr" in failed["reason"], failed
        status, listed = http_get(worker.http + "/engines")
        assert status == 200 and [e["id"] for e in listed] == ["whisper-streaming", "broken-whisper"]
        assert listed[-1] == failed
        refused = await stream(session_url(worker.url, engine="broken-whisper"), silence(0.1), speed=None)
        (error,) = refused.of("error")
        assert error["code"] == "invalid_config" and error["param"] == "engine"
        assert "failed to load" in error["message"] and refused.close_code == 1008
        utt = speech_by_id["jfk"]
        served = await stream(session_url(worker.url), concat(read_wav(utt.path), silence(1.0)), speed=None)
        assert word_errors(utt.reference, served.end["transcript"]).wer <= 0.3
        assert "engine broken-whisper is not served" in worker.log()
    finally:
        worker.stop()
    assert "Traceback" not in worker.log()
