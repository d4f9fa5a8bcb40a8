"""The plugin API of realtime-engine-host: pluggy hook specifications.

A plugin is a module (or object) with functions marked ``@hookimpl``, published
through a package entry point in the group ``engine_host``::

    [project.entry-points.engine_host]
    my_vad = "my_package"

Registration hooks receive a ``register`` callable and call it once per
component they provide::

    register(name, factory, options_schema)

``name`` is what an ``engine.yaml`` stage names as its ``plugin``; ``factory``
is called as ``factory(options, context)`` with the stage's options (already
validated against ``options_schema``, a JSON Schema, with defaults applied) and
a :class:`host.contracts.LoadContext`; it returns the component described in
:mod:`host.contracts`. Factories run at start-up in a worker thread, so they
may load models and read files.

Lifecycle hooks are called on the event loop and must return quickly.
"""

from __future__ import annotations

import pluggy

PROJECT = "engine_host"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_vad(register):
    """Register voice-activity detectors: ``register(name, factory, options_schema)``.

    The factory returns a :class:`host.contracts.VadModel`.
    """


@hookspec
def register_asr(register):
    """Register speech recognizers: ``register(name, factory, options_schema)``.

    The factory returns a :class:`host.contracts.AsrEngine`. Its options must
    contain ``models``, a mapping of variant name to model options.
    """


@hookspec
def register_assembler(register):
    """Register transcript assemblers: ``register(name, factory, options_schema)``.

    The factory returns a :class:`host.contracts.Assembler`.
    """


@hookspec
def register_registry(register):
    """Register worker registries: ``register(name, factory, options_schema)``.

    The factory returns a :class:`host.contracts.Registry`.
    """


@hookspec
def startup(worker):
    """The worker has loaded its engines and is about to accept sessions."""


@hookspec
def shutdown(worker):
    """The worker stopped accepting sessions and is shutting down."""


@hookspec
def session_started(session):
    """A session began; ``session`` is a :class:`host.contracts.SessionInfo`."""


@hookspec
def session_ended(session, record):
    """A session ended; ``record`` is a :class:`host.contracts.SessionRecord`."""
