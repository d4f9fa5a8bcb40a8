"""Plugin contract v2 at load time: what a component declares is checked, what it shares is kept
apart, which plugin serves each stage is shown, and the new hook kinds register like the others."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from host import asr
from host.contracts import AsrResult, SessionOptions, TranscribeRequest, Word
from host.engines import load_engines
from host.hookspecs import hookimpl
from host.models import ComponentError, ModelManager
from host.plugins import load_plugins
from host.schemas import with_defaults

from .support import ENGINES, ROOT

DEFAULT = yaml.safe_load((ENGINES / "whisper-streaming.yaml").read_text())
ONLY_SHIPPED = {"ENGINE_HOST_PLUGINS": "vad_silero,asr_faster_whisper,turn_smart"}


def engine_dir(tmp_path: Path, **engines: dict) -> Path:
    for name, data in engines.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def copy_of_default(engine_id: str, languages=("en",)) -> dict:
    """The default engine with its tiny.en variant alone (``fast``), claiming ``languages``."""
    data = yaml.safe_load(yaml.safe_dump(DEFAULT))
    data["id"] = engine_id
    data["capabilities"].update(languages=list(languages), models=["fast"])
    data["capabilities"].pop("variants", None)
    data["config_schema"]["properties"]["model"]["enum"] = ["fast"]
    models = data["pipeline"]["asr"]["options"]["models"]
    data["pipeline"]["asr"]["options"]["models"] = {"fast": models["fast"]}
    return data


async def test_an_engine_declaring_a_language_its_model_lacks_does_not_load(tmp_path):
    """tiny.en declares ["en"]: an engine claiming German on it fails at load, the honest one serves."""
    plugins = load_plugins(env=ONLY_SHIPPED)
    directory = engine_dir(tmp_path, a=copy_of_default("claims-german", languages=["en", "de"]),
                           b=copy_of_default("english"))
    specs, errors = load_engines(directory, plugins)
    assert errors == []
    manager = ModelManager(plugins)
    await manager.load(specs)
    assert list(manager.engines) == ["english"]
    reason = manager.failed["claims-german"].reason
    assert "asr 'faster-whisper' (plugin asr_faster_whisper)" in reason
    assert "['de']" in reason and "declares: en" in reason
    variant = manager.engines["english"].asr.variants["fast"]
    assert variant.languages == ["en"]


def test_validate_load_reports_the_language_mismatch(tmp_path):
    directory = engine_dir(tmp_path, a=copy_of_default("claims-german", languages=["de"]))
    plain = subprocess.run([sys.executable, "-m", "host.cli", "validate", str(directory)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout + plain.stderr  # the file itself is valid
    loaded = subprocess.run([sys.executable, "-m", "host.cli", "validate", "--load", str(directory)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 1
    assert "does not load" in loaded.stdout and "which the model does not transcribe" in loaded.stdout
    assert "0 valid, 1 error(s)" in loaded.stdout


# --- small real components, registered the way a third party would ----------------------------


class EchoModel:
    """Transcribes nothing: answers with what the session asked for, so a test can see it arrive."""

    def __init__(self, key: tuple, languages=("en",), parallelism=1):
        self.key = key
        self.parallelism = parallelism
        self.languages = list(languages)

    def transcribe(self, audio, *, language, word_timestamps, partial=False, options=None):
        prompt = options.get("prompt") if options is not None else None
        return AsrResult(f"prompt={prompt}", [Word(" x", 0.0, len(audio) / 16000, 1.0)], language, 1.0)


class V1Model:
    """The version-1 signature: no options keyword. It must keep working."""

    key = ("v1",)
    parallelism = 1

    def transcribe(self, audio, *, language, word_timestamps, partial=False):
        return AsrResult("v1", [], language, 0.5)


class SharedKeys:
    """Two plugins asking ``context.shared`` for the same key."""

    def __init__(self, plugin_name: str):
        self.name = plugin_name
        self.loaded: list[str] = []

    @hookimpl
    def register_asr(self, register):
        def build(options, context):
            weights = context.shared(("weights",), lambda: object())
            self.loaded.append(context.plugin)
            model = EchoModel(("echo", id(weights)))
            return type("Engine", (), {"variants": {"fast": model, "accurate": model}, "weights": weights})()

        register(f"echo-{self.name}", build, {"type": "object", "properties": {"models": {"type": "object"}}})


class EnergyTurn:
    """A turn detector: a quiet ending means the turn is complete."""

    @hookimpl
    def register_turn_detector(self, register):
        def build(options, context):
            threshold = options["quiet_rms"]
            return type("Turn", (), {"probability": staticmethod(
                lambda audio: float(np.sqrt(np.mean(audio[-1600:] ** 2)) < threshold))})()

        register("energy-turn", build, {"type": "object", "properties": {"quiet_rms": {"type": "number", "default": 0.01}},
                                        "additionalProperties": False})


def engine_using(engine_id: str, asr_plugin: str, turn: str | None = None) -> dict:
    data = copy_of_default(engine_id)
    data["pipeline"]["asr"] = {"plugin": asr_plugin, "options": {"models": {"fast": {}, "accurate": {}}}}
    data["pipeline"].pop("turn")
    if turn is not None:
        data["pipeline"]["turn"] = {"plugin": turn}
    return data


async def test_shared_keys_are_kept_per_plugin_and_engines_name_their_plugins(tmp_path):
    one, two = SharedKeys("one"), SharedKeys("two")
    plugins = load_plugins(env=ONLY_SHIPPED, extra=[one, two, EnergyTurn()])
    assert plugins.errors == []
    directory = engine_dir(tmp_path, a=engine_using("first", "echo-one", turn="energy-turn"),
                           b=engine_using("second", "echo-two"), c=engine_using("third", "echo-one"))
    specs, errors = load_engines(directory, plugins)
    assert errors == [], [str(e) for e in errors]
    manager = ModelManager(plugins)
    await manager.load(specs)
    first, second, third = (manager.engines[e] for e in ("first", "second", "third"))
    assert first.asr.weights is third.asr.weights  # same plugin, same key: loaded once
    assert first.asr.weights is not second.asr.weights  # another plugin's key of the same name
    pipeline = first.spec.describe()["pipeline"]
    assert pipeline["vad"] == {"component": "silero", "plugin": "vad_silero"}
    assert pipeline["asr"]["component"] == "echo-one"
    assert pipeline["turn"]["component"] == "energy-turn"
    assert first.turn is not None and first.spec.pipeline["turn"].options == {"quiet_rms": 0.01}
    assert first.turn.probability(np.zeros(16000, dtype=np.float32)) == 1.0
    assert second.turn is None
    assert first.component("asr").startswith("asr 'echo-one' (plugin ")


def test_engines_json_names_the_plugin_of_each_stage():
    out = subprocess.run([sys.executable, "-m", "host.cli", "engines", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (engine,) = json.loads(out.stdout)
    assert engine["pipeline"] == {"vad": {"component": "silero", "plugin": "vad_silero"},
                                  "asr": {"component": "faster-whisper", "plugin": "asr_faster_whisper"},
                                  "assembler": {"component": "default", "plugin": "host.assembler"},
                                  "turn": {"component": "smart-turn", "plugin": "turn_smart"}}


class BrokenComponents:
    """Factories that return objects which break their contracts in the ways authors do."""

    @hookimpl
    def register_asr(self, register):
        register("no-parallelism", lambda o, c: type("E", (), {"variants": {
            "fast": type("M", (), {"key": ("k",), "transcribe": lambda self, a, **k: None})(),
            "accurate": V1Model()}})())

    @hookimpl
    def register_vad(self, register):
        register("no-window", lambda o, c: type("V", (), {"open_stream": lambda self: None})())


async def test_components_are_checked_against_their_contract_at_load(tmp_path):
    plugins = load_plugins(env=ONLY_SHIPPED, extra=[BrokenComponents()])
    bad_asr = copy_of_default("bad-asr")
    bad_asr["pipeline"]["asr"] = {"plugin": "no-parallelism", "options": {"models": {"fast": {}, "accurate": {}}}}
    bad_vad = copy_of_default("bad-vad")
    bad_vad["pipeline"]["vad"]["plugin"] = "no-window"
    del bad_vad["pipeline"]["vad"]["options"]["backend"]
    specs, errors = load_engines(engine_dir(tmp_path, a=bad_asr, b=bad_vad), plugins)
    assert errors == [], [str(e) for e in errors]
    manager = ModelManager(plugins)
    with pytest.raises(ComponentError, match="no engine could be loaded"):
        await manager.load(specs)
    assert "variant 'fast': parallelism must be a positive int" in manager.failed["bad-asr"].reason
    assert "window_samples must be a positive int" in manager.failed["bad-vad"].reason
    assert "vad 'no-window' (plugin " in manager.failed["bad-vad"].reason


# --- the ASR seam ---------------------------------------------------------------------------


def request(**options) -> TranscribeRequest:
    return TranscribeRequest(np.zeros(16000, dtype=np.float32), "en", True, options=SessionOptions(config=options))


def test_options_reach_a_v2_model_and_a_v1_model_still_works():
    assert asr.transcribe(EchoModel(("e",)), request(prompt="Kubernetes")).text == "prompt=Kubernetes"
    assert asr.takes_options(EchoModel(("e",))) and not asr.takes_options(V1Model())
    assert asr.AsrCall(V1Model(), request(prompt="ignored"), "asr 'v1'")().text == "v1"


def test_a_result_breaking_the_contract_is_refused_naming_the_component():
    class Backwards(V1Model):
        def transcribe(self, audio, *, language, word_timestamps, partial=False):
            return AsrResult("x", [Word(" x", 0.9, 0.1, 1.0)])

    class Raises(V1Model):
        def transcribe(self, audio, *, language, word_timestamps, partial=False):
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(asr.ComponentFailure, match=r"asr 'b' \(plugin p\): transcribe broke its contract: word ' x'"):
        asr.AsrCall(Backwards(), request(), "asr 'b' (plugin p)")()
    with pytest.raises(asr.ComponentFailure, match="transcribe raised RuntimeError: CUDA out of memory"):
        asr.AsrCall(Raises(), request(), "asr 'r' (plugin p)")()


def test_pattern_properties_defaults_are_filled():
    schema = {"type": "object", "patternProperties": {"^lang_": {"type": "object", "properties": {"beam": {"default": 5}}}},
              "additionalProperties": {"type": "object", "properties": {"other": {"default": True}}}}
    assert with_defaults(schema, {"lang_de": {}, "x": {}}) == {"lang_de": {"beam": 5}, "x": {"other": True}}


# --- the new hook kinds -----------------------------------------------------------------------


class Dialects:
    @hookimpl
    def register_dialect(self, register):
        register("fine", object, path="/v1/mine")
        register("taken", object, path="/v1/realtime")   # the OpenAI dialect's path: refused, ends the hook

    @hookimpl
    def register_vad(self, register):
        register("pathy", lambda o, c: None, path="/x")


def test_dialects_register_by_path_and_conflicts_are_named():
    plugins = load_plugins(env=ONLY_SHIPPED, extra=[Dialects()])
    routes = plugins.dialects()
    assert {"/v1/realtime", "/v1/speech-to-text/realtime", "/v1/listen", "/v1/mine"} <= set(routes)
    assert routes["/v1/realtime"].plugin == "host.compat.openai_realtime"
    messages = [str(e) for e in plugins.errors]
    assert any("path /v1/realtime is already served by dialect" in m for m in messages), messages
    assert any("vad 'pathy': only a dialect takes a path" in m for m in messages), messages


def test_tracing_switch_logs_hook_calls(caplog):
    with caplog.at_level(logging.INFO, logger="host.plugins.trace"):
        load_plugins(env={"ENGINE_HOST_PLUGINS": "", "ENGINE_HOST_TRACE_PLUGINS": "1"})
    assert any("call register_assembler" in r.getMessage() for r in caplog.records)
