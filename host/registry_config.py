"""Which registry component a worker or router uses, and the options it is built with.

The host names no registry plugin. Without ``ENGINE_HOST_REGISTRY`` the choice follows the registry
URL: no URL, the built-in ``memory`` registry; otherwise the registry component named like the URL's
scheme (``redis://...`` picks ``redis``), or, when no component has that name, the only loaded
registry whose options schema declares a ``url`` (so ``rediss://`` and ``unix://`` URLs keep
reaching the Redis plugin).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from host.contracts import LoadContext
from host.plugins import PluginSet
from host.registry import RegistryConfigError, build_registry
from host.settings import ServerSettings

BUILTIN_REGISTRY = "memory"
"""The host's own registry (host/registry.py): one worker on its own, nothing shared."""


def registry_name(plugins: PluginSet, settings: ServerSettings) -> str:
    """The registry component ``settings`` ask for: ``registry`` when set, else derived from the URL."""
    if settings.registry:
        return settings.registry
    url = settings.registry_url
    if not url:
        return BUILTIN_REGISTRY
    names = plugins.names("registry")
    scheme = urlsplit(url).scheme
    if scheme in names:
        return scheme
    takes_url = [n for n in names if "url" in (_declared(plugins, n))]
    if len(takes_url) == 1:
        return takes_url[0]
    raise RegistryConfigError(f"no registry plugin for {scheme or url!r} URLs (loaded: {', '.join(names)}); "
                              "set ENGINE_HOST_REGISTRY (--registry) to one of them")


async def open_registry(plugins: PluginSet, settings: ServerSettings, context: LoadContext,
                        **derived: Any) -> tuple[str, object]:
    """Build the registry ``settings`` ask for: (its name, the component).

    The component is offered ``url`` (the registry URL) and what the host derives (``derived``, e.g.
    ``ttl_s``), each only if its schema declares it; ``registry_options`` come on top and must all
    be declared options, so that a misspelt one is refused instead of dropped.
    """
    name = registry_name(plugins, settings)
    explicit = settings.registry_options
    if plugins.component("registry", name) is not None:
        unknown = sorted(set(explicit) - set(_declared(plugins, name)))
        if unknown:
            raise RegistryConfigError(f"registry {name!r} has no option {unknown[0]!r} "
                                      f"(its options: {', '.join(sorted(_declared(plugins, name))) or 'none'})")
    offered = {"url": settings.registry_url or None, **derived, **explicit}
    return name, await build_registry(plugins, name, offered, context)


def _declared(plugins: PluginSet, name: str) -> dict:
    component = plugins.component("registry", name)
    return (component.options_schema.get("properties") or {}) if component is not None else {}
