"""Plugin loading: built-ins plus entry points in the group ``engine_host``.

``load_plugins()`` returns a :class:`PluginSet` holding the pluggy manager, every
registered component and the errors of plugins that failed to load. A broken
third-party plugin never stops the host: it is reported by name and skipped.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pluggy

from host import hookspecs

log = logging.getLogger(__name__)

KINDS = ("vad", "asr", "assembler", "turn_detector", "registry", "dialect")
ENTRY_POINT_GROUP = hookspecs.PROJECT
BUILTIN_PLUGINS = ("host.assembler", "host.registry", "host.compat.openai_realtime", "host.compat.elevenlabs",
                   "host.compat.deepgram")
"""Registered like third-party plugins, through the same hooks; they always load."""
TRACE_ENV = "ENGINE_HOST_TRACE_PLUGINS"


@dataclass
class Component:
    """A factory registered by a plugin for one pipeline stage."""

    kind: str
    name: str
    factory: Callable[..., Any]
    options_schema: dict
    plugin: str
    path: str | None = None
    """For a dialect: the URL path it serves."""

    @property
    def label(self) -> str:
        """How errors and logs name it: ``asr 'faster-whisper' (plugin asr_faster_whisper)``."""
        return f"{self.kind} {self.name!r} (plugin {self.plugin})"


@dataclass
class PluginInfo:
    """A loaded plugin, for ``engine-host plugins``."""

    name: str
    distribution: str | None
    version: str | None
    hooks: list[str]
    components: list[Component] = field(default_factory=list)


@dataclass
class PluginError:
    """A plugin that could not be loaded or registered something invalid."""

    plugin: str
    message: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r}: {self.message}"


@dataclass
class PluginSet:
    manager: pluggy.PluginManager
    plugins: list[PluginInfo]
    components: dict[tuple[str, str], Component]
    errors: list[PluginError]

    def component(self, kind: str, name: str) -> Component | None:
        return self.components.get((kind, name))

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.components if k == kind)

    def of_kind(self, kind: str) -> list[Component]:
        """Every component of one kind, in registration order."""
        return [c for (k, _), c in self.components.items() if k == kind]

    def dialects(self) -> dict[str, Component]:
        """URL path → the dialect component that serves it."""
        return {c.path: c for c in self.of_kind("dialect") if c.path is not None}

    @property
    def hook(self):
        return self.manager.hook


def allowed_entry_points(env: Mapping[str, str] | None = None) -> set[str] | None:
    """Entry point names ``ENGINE_HOST_PLUGINS`` allows (None: all). An empty value loads none."""
    value = (os.environ if env is None else env).get("ENGINE_HOST_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def load_plugins(env: Mapping[str, str] | None = None, extra: Sequence[Any] = ()) -> PluginSet:
    """Load built-ins, allowed entry points and ``extra`` plugin objects; collect components."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    tracing = (os.environ if env is None else env).get(TRACE_ENV, "") not in ("", "0")
    if tracing:
        _trace(pm)
    errors: list[PluginError] = []

    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)

    allowed = allowed_entry_points(env)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            # pluggy's own loader, one entry point at a time, so one broken plugin
            # is reported by name instead of aborting the whole load.
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any import-time failure of a third party
            errors.append(PluginError(ep.name, f"failed to load entry point {ep.value!r}: {_brief(exc)}"))
            log.error("plugin %r failed to load: %s", ep.name, _brief(exc))
    for obj in extra:
        pm.register(obj)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or "?"
        errors.append(PluginError(name, str(exc)))
        pm.unregister(exc.plugin)

    infos = _plugin_infos(pm)
    components: dict[tuple[str, str], Component] = {}
    for kind in KINDS:
        hook = getattr(pm.hook, f"register_{kind}")
        impls = list(reversed(hook.get_hookimpls()))
        # Built-ins first: a third party cannot take the name or path of a bundled component.
        for impl in sorted(impls, key=lambda i: i.plugin_name not in BUILTIN_PLUGINS):
            _collect(kind, impl, components, infos, errors)
            if tracing:
                names = [c.name for c in infos[impl.plugin_name].components if c.kind == kind] if impl.plugin_name in infos else []
                _TRACE.info("call register_%s of %s -> registered %s", kind, impl.plugin_name, names)
    return PluginSet(pm, list(infos.values()), components, errors)


_TRACE = logging.getLogger("host.plugins.trace")


def _trace(pm: pluggy.PluginManager) -> None:
    """Log every hook call, its implementations' results and errors (datasette's tracing switch)."""

    def before(hook_name, hook_impls, kwargs) -> None:
        _TRACE.info("call %s(%s) -> %s", hook_name, ", ".join(kwargs), [i.plugin_name for i in hook_impls])

    def after(outcome, hook_name, hook_impls, kwargs) -> None:
        error = outcome.exception
        _TRACE.info("done %s: %s", hook_name, f"raised {error!r}" if error is not None else repr(outcome.get_result())[:200])

    pm.add_hookcall_monitoring(before, after)


def _collect(kind, impl, components, infos, errors) -> None:
    plugin_name = impl.plugin_name

    def register(name: str, factory: Callable[..., Any], options_schema: dict | None = None, *,
                 path: str | None = None) -> None:
        schema = {"type": "object"} if options_schema is None else options_schema
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise _RegisterError(f"{kind} {name!r} has an invalid options schema: {exc.message}") from None
        if not callable(factory):
            raise _RegisterError(f"{kind} {name!r}: factory is not callable")
        _check_path(kind, name, path, components)
        existing = components.get((kind, name))
        if existing is not None:
            raise _RegisterError(f"{kind} {name!r} is already registered by plugin {existing.plugin!r}")
        comp = Component(kind, name, factory, schema, plugin_name, path)
        components[(kind, name)] = comp
        if plugin_name in infos:
            infos[plugin_name].components.append(comp)

    try:
        impl.function(register=register)
    except _RegisterError as exc:
        errors.append(PluginError(plugin_name, str(exc)))
    except Exception as exc:  # noqa: BLE001 - any failure of a third party's hook is reported by name
        errors.append(PluginError(plugin_name, f"register_{kind} failed: {_brief(exc)}"))


RESERVED_PATHS = frozenset({"/", "/session", "/health", "/metrics", "/engines", "/workers", "/demo"})


def _check_path(kind: str, name: str, path: str | None, components: dict) -> None:
    """A dialect needs a path of its own; no other kind takes one."""
    if kind != "dialect":
        if path is not None:
            raise _RegisterError(f"{kind} {name!r}: only a dialect takes a path")
        return
    if not isinstance(path, str) or not path.startswith("/") or path in RESERVED_PATHS:
        raise _RegisterError(f"dialect {name!r} needs path='/...' not served by the host itself, got {path!r}")
    for other in components.values():
        if other.kind == "dialect" and other.path == path:
            raise _RegisterError(f"dialect {name!r}: path {path} is already served by dialect {other.name!r} "
                                 f"of plugin {other.plugin!r}")


class _RegisterError(Exception):
    pass


def _plugin_infos(pm: pluggy.PluginManager) -> dict[str, PluginInfo]:
    dists = {pm.get_name(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = {}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(name)
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        if dist is not None:
            dist_name, version = dist.metadata["name"], dist.version
        elif name in BUILTIN_PLUGINS:
            dist_name, version = "realtime-engine-host (built-in)", _host_version()
        else:
            dist_name, version = None, None
        infos[name] = PluginInfo(name, dist_name, version, hooks)
    return infos


def _host_version() -> str:
    from host import __version__

    return __version__


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
