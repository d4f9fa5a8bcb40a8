"""engines.d: loading and validating ``engine.yaml`` files.

Each ``*.yaml`` file describes one engine: its identity, capabilities, the
JSON Schema of its per-session configuration (``config_schema``) and the
``pipeline`` naming a plugin component (and its options) for each stage.
Every problem is reported as ``file: json.path: reason``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from host.endpointing_options import ENDPOINTING_KEYS, ENDPOINTING_SCHEMA
from host.plugins import PluginSet
from host.schemas import Validator, json_path, problems, with_defaults

STAGES = ("vad", "asr", "assembler")
"""Stages every engine has (the assembler defaults to ``default``)."""
OPTIONAL_STAGES = ("turn",)
"""Stages an engine may add: ``turn`` names a turn detector."""
COMPONENT_KIND = {"vad": "vad", "asr": "asr", "assembler": "assembler", "turn": "turn_detector"}
"""The plugin component kind each stage takes."""
DEFAULT_STAGES = {"assembler": {"plugin": "default", "options": {}}}

_STAGE = {
    "type": "object",
    "required": ["plugin"],
    "properties": {
        "plugin": {"type": "string", "minLength": 1},
        "options": {"type": "object", "default": {}},
    },
    "additionalProperties": False,
}

ENGINE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "engine.yaml",
    "type": "object",
    "required": ["id", "type", "name", "version", "capabilities", "config_schema", "pipeline"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]*$"},
        "type": {"const": "realtime"},
        "name": {"type": "string", "minLength": 1},
        "version": {"type": ["string", "number"]},
        "description": {"type": "string"},
        "container": {"type": "object"},
        "capabilities": {
            "type": "object",
            "required": ["languages", "models"],
            "properties": {
                "languages": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "models": {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": True},
                "streaming": {"type": "boolean"},
                "word_timestamps": {"type": "boolean"},
                "max_sessions": {"type": "integer", "minimum": 1},
                "variants": {
                    "type": "object",
                    "description": "per model variant, what users choosing one should know",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "description": {"type": "string"},
                            "relative_cost": {"type": "number", "exclusiveMinimum": 0,
                                              "description": "compute per second of audio, against the cheapest variant"},
                        },
                    },
                },
            },
        },
        "config_schema": {"type": "object"},
        "pipeline": {
            "type": "object",
            "required": ["vad", "asr"],
            "properties": {stage: _STAGE for stage in STAGES + OPTIONAL_STAGES},
            "additionalProperties": False,
        },
    },
}
Validator.check_schema(ENGINE_SCHEMA)

ANY_LANGUAGE = {"all", "*", "auto"}


@dataclass
class Stage:
    plugin: str
    options: dict[str, Any]
    """The plugin's own options (defaults applied); passed to its factory."""
    endpointing: dict[str, Any] | None = None
    """For the vad stage: the host-owned endpointing options found among its options."""
    provider: str = ""
    """The plugin (entry point name) that registered the component."""


@dataclass
class EngineSpec:
    """A validated engine.yaml."""

    id: str
    name: str
    version: str
    description: str
    file: Path
    capabilities: dict[str, Any]
    config_schema: dict[str, Any]
    pipeline: dict[str, Stage]
    raw: dict[str, Any] = field(repr=False)
    served: dict[str, list[str]] = field(default_factory=dict)
    """Per model variant, the languages it serves: the engine's ``capabilities.languages`` that its
    loaded model declares (all the model declares where the engine names ``*``). Filled when the
    engine is loaded; before that (``engine-host validate``) every variant serves the engine's list."""

    @property
    def models(self) -> list[str]:
        return list(self.capabilities["models"])

    @property
    def languages(self) -> list[str]:
        """What the engine serves, over all its variants."""
        if self.served and set(self.capabilities["languages"]) & ANY_LANGUAGE:
            return sorted({code for codes in self.served.values() for code in codes})
        return list(self.capabilities["languages"])

    def languages_of(self, model: str | None) -> list[str]:
        """The languages variant ``model`` serves (the engine's, when unknown)."""
        if model is not None and model in self.served:
            return list(self.served[model])
        return self.languages

    def unserved_languages(self, codes: tuple[str, ...], model: str | None = None) -> list[str]:
        """Those of ``codes`` that variant ``model`` (or the engine) does not serve."""
        langs = set(self.languages_of(model))
        if langs & ANY_LANGUAGE:
            return []
        return [code for code in codes if code not in langs]

    def variants(self) -> dict[str, dict[str, Any]]:
        """Per variant, what ``/engines`` says of it: the engine.yaml's ``capabilities.variants``
        entry (description, relative cost) and the languages it serves."""
        described = self.capabilities.get("variants") or {}
        return {name: {**described.get(name, {}), "languages": self.languages_of(name)} for name in self.models}

    def describe(self) -> dict[str, Any]:
        """The public description served by ``GET /engines``."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "capabilities": {**self.capabilities, "languages": self.languages, "variants": self.variants()},
            "config_schema": self.config_schema,
            "endpointing": self.pipeline["vad"].endpointing,
            "pipeline": {name: {"component": st.plugin, "plugin": st.provider} for name, st in self.pipeline.items()},
        }


@dataclass
class EngineError:
    file: Path
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else str(self.file)
        return f"{where}: {self.message}"


class EngineLoadError(Exception):
    """Raised when engines must all be valid and some are not."""

    def __init__(self, errors: list[EngineError]):
        self.errors = errors
        super().__init__("\n".join(map(str, errors)))


def engine_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.yaml") if p.is_file())


def load_engines(directory: Path, plugins: PluginSet) -> tuple[list[EngineSpec], list[EngineError]]:
    """Load every ``*.yaml`` in ``directory``; return the valid engines and all errors."""
    directory = Path(directory)
    if not directory.is_dir():
        return [], [EngineError(directory, "", "engines directory not found")]
    engines, errors = [], []
    seen: dict[str, Path] = {}
    for path in engine_files(directory):
        spec, errs = load_engine_file(path, plugins)
        if spec is not None and spec.id in seen:
            errs.append(EngineError(path, "id", f"engine id {spec.id!r} is already defined in {seen[spec.id]}"))
            spec = None
        errors.extend(errs)
        if spec is not None:
            seen[spec.id] = path
            engines.append(spec)
    if not engines and not errors:
        errors.append(EngineError(directory, "", "no *.yaml engine files found"))
    return engines, errors


def load_engine_file(path: Path, plugins: PluginSet) -> tuple[EngineSpec | None, list[EngineError]]:
    """Parse and validate one engine file."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return None, [EngineError(path, "", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}")]
    except OSError as exc:
        return None, [EngineError(path, "", f"cannot read: {exc.strerror}")]
    return validate_engine(raw, path, plugins)


def validate_engine(raw: Any, path: Path, plugins: PluginSet) -> tuple[EngineSpec | None, list[EngineError]]:
    errors = [EngineError(path, p.path, p.message) for p in problems(ENGINE_SCHEMA, raw)]
    if errors:
        return None, errors
    raw = with_defaults(ENGINE_SCHEMA, raw)

    config_schema = raw["config_schema"]
    try:
        Validator.check_schema(config_schema)
    except jsonschema.SchemaError as exc:
        errors.append(EngineError(path, json_path(exc.absolute_path, "config_schema"), f"not a valid JSON Schema: {exc.message}"))
        return None, errors

    pipeline: dict[str, Stage] = {}
    stages = {**copy.deepcopy(DEFAULT_STAGES), **raw["pipeline"]}
    for stage_name in STAGES + OPTIONAL_STAGES:
        stage = stages.get(stage_name)
        if stage is None:
            continue
        opts, endpointing, errs = _validate_stage(stage_name, stage, path, plugins)
        errors.extend(errs)
        registered = plugins.component(COMPONENT_KIND[stage_name], stage["plugin"])
        pipeline[stage_name] = Stage(stage["plugin"], opts, endpointing, registered.plugin if registered else "")

    caps = raw["capabilities"]
    asr = pipeline.get("asr")
    if asr is not None and not errors:
        defined = asr.options.get("models")
        if not isinstance(defined, dict):
            errors.append(EngineError(path, "pipeline.asr.options.models", "must map each model variant to its options"))
        else:
            for i, variant in enumerate(caps["models"]):
                if variant not in defined:
                    errors.append(EngineError(
                        path, f"capabilities.models[{i}]",
                        f"variant {variant!r} is not defined in pipeline.asr.options.models (defined: {sorted(defined)})",
                    ))
    errors.extend(_check_config_schema(config_schema, caps, path))
    if errors:
        return None, errors
    spec = EngineSpec(
        id=raw["id"],
        name=raw["name"],
        version=str(raw["version"]),
        description=str(raw.get("description", "")).strip(),
        file=Path(path),
        capabilities=caps,
        config_schema=config_schema,
        pipeline=pipeline,
        raw=raw,
    )
    return spec, []


def _validate_stage(
    stage_name: str, stage: dict, path: Path, plugins: PluginSet
) -> tuple[dict, dict | None, list[EngineError]]:
    """Validate a stage's options; returns (plugin options, endpointing options, errors)."""
    where = f"pipeline.{stage_name}"
    kind = COMPONENT_KIND[stage_name]
    component = plugins.component(kind, stage["plugin"])
    if component is None:
        known = ", ".join(plugins.names(kind)) or "none loaded"
        return {}, None, [EngineError(path, f"{where}.plugin",
                                      f"no {kind} plugin named {stage['plugin']!r} (available: {known})")]
    options = dict(stage.get("options") or {})
    endpointing = None
    errs = []
    if stage_name == "vad":
        # Endpointing options belong to the host's state machine, the rest to the plugin.
        endpointing = {k: v for k, v in options.items() if k in ENDPOINTING_KEYS}
        options = {k: v for k, v in options.items() if k not in ENDPOINTING_KEYS}
        errs += problems(ENDPOINTING_SCHEMA, endpointing, f"{where}.options")
        endpointing = with_defaults(ENDPOINTING_SCHEMA, endpointing)
    errs += problems(component.options_schema, options, f"{where}.options")
    return with_defaults(component.options_schema, options), endpointing, [
        EngineError(path, e.path, e.message) for e in errs]


def _check_config_schema(schema: dict, caps: dict, path: Path) -> list[EngineError]:
    """Cross-check the session schema with the capabilities it must agree with."""
    errors = []
    props = schema.get("properties") or {}
    model = props.get("model") if isinstance(props, dict) else None
    if isinstance(model, dict):
        for value in model.get("enum", []):
            if value not in caps["models"]:
                errors.append(EngineError(path, "config_schema.properties.model.enum",
                                          f"{value!r} is not in capabilities.models {caps['models']}"))
        default = model.get("default")
        if default is not None and default not in caps["models"]:
            errors.append(EngineError(path, "config_schema.properties.model.default",
                                      f"{default!r} is not in capabilities.models {caps['models']}"))
    return errors
