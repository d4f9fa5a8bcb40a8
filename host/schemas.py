"""JSON Schema helpers shared by engine loading and session configuration."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema

Validator = jsonschema.Draft202012Validator


@dataclass
class SchemaProblem:
    """One validation failure: where (a dotted JSON path) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def json_path(parts, prefix: str = "") -> str:
    """Render a jsonschema path deque as ``a.b[0].c`` under ``prefix``."""
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def problems(schema: dict, instance: Any, prefix: str = "") -> list[SchemaProblem]:
    """All validation errors of ``instance`` against ``schema``, sorted by path."""
    errors = sorted(Validator(schema).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [SchemaProblem(json_path(e.absolute_path, prefix), e.message) for e in errors]


def with_defaults(schema: dict, instance: Any) -> Any:
    """A copy of ``instance`` with ``default`` values of (nested) object properties filled in."""
    instance = copy.deepcopy(instance)
    _fill(schema, instance)
    return instance


def _fill(schema: Any, instance: Any) -> None:
    if not isinstance(schema, dict) or not isinstance(instance, dict):
        return
    for name, sub in (schema.get("properties") or {}).items():
        if not isinstance(sub, dict):
            continue
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            _fill(sub, instance[name])
    declared = schema.get("properties") or {}
    patterns = [(re.compile(p), sub) for p, sub in (schema.get("patternProperties") or {}).items()]
    extra = schema.get("additionalProperties")
    for name, value in instance.items():
        matched = [sub for pattern, sub in patterns if pattern.search(name)]
        for sub in matched:
            _fill(sub, value)
        # JSON Schema applies additionalProperties only to names no properties or pattern covers.
        if isinstance(extra, dict) and name not in declared and not matched:
            _fill(extra, value)


def declared_types(schema: dict, name: str) -> Iterator[str]:
    """The JSON types a top-level property ``name`` may take in ``schema``."""
    sub = (schema.get("properties") or {}).get(name)
    if not isinstance(sub, dict):
        return
    kind = sub.get("type")
    if isinstance(kind, str):
        yield kind
    elif isinstance(kind, list):
        yield from kind
    elif "enum" in sub:
        for value in sub["enum"]:
            yield {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), "string")
