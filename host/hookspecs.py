"""The plugin API of realtime-engine-host: pluggy hook specifications.

A plugin is a module (or object) with functions marked ``@hookimpl``, published
through a package entry point in the group ``engine_host``::

    [project.entry-points.engine_host]
    my_vad = "my_package"

The hooks come in two phases:

* **Registration** (when plugins load): each ``register_<kind>`` hook receives a ``register``
  callable and calls it once per component it provides::

      register(name, factory, options_schema)

  ``name`` is what an ``engine.yaml`` stage names as its ``plugin``; ``factory`` is called as
  ``factory(options, context)`` with the stage's options (validated against ``options_schema``, a
  JSON Schema, with defaults applied) and a :class:`host.contracts.LoadContext`, and returns the
  component described in :mod:`host.contracts`. Factories run at start-up in a worker thread, so
  they may load models and read files. Dialects differ: see :func:`register_dialect`.
* **Lifecycle** (while the worker runs): called on the event loop; they must return quickly.

The built-in components (the ``default`` assembler, the ``memory`` registry and the OpenAI,
ElevenLabs and Deepgram dialects) are registered through these same hooks.
``ENGINE_HOST_TRACE_PLUGINS=1`` logs every hook call with its arguments and results.
"""

from __future__ import annotations

import pluggy

PROJECT = "engine_host"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration -----------------------------------------------------------------


@hookspec
def register_vad(register):
    """Register voice-activity detectors.

    :param register: ``register(name, factory, options_schema=None)``; the factory returns a
        :class:`host.contracts.VadModel`.
    """


@hookspec
def register_asr(register):
    """Register speech recognizers.

    :param register: ``register(name, factory, options_schema=None)``; the factory returns a
        :class:`host.contracts.AsrEngine`, whose options must contain ``models``, a mapping of
        variant name to model options.
    """


@hookspec
def register_assembler(register):
    """Register transcript assemblers.

    :param register: ``register(name, factory, options_schema=None)``; the factory returns a
        :class:`host.contracts.Assembler`.
    """


@hookspec
def register_turn_detector(register):
    """Register turn detectors: audio of the open turn → probability that the speaker has finished.

    An engine uses one with an optional ``pipeline.turn`` stage.

    :param register: ``register(name, factory, options_schema=None)``; the factory returns a
        :class:`host.contracts.TurnDetector`.
    """


@hookspec
def register_registry(register):
    """Register worker registries.

    :param register: ``register(name, factory, options_schema=None)``; the factory returns a
        :class:`host.contracts.Registry` (and, for ``engine-host route``, a ``WorkerDirectory``).
    """


@hookspec
def register_dialect(register):
    """Register compatibility dialects: another vendor's realtime protocol on the same pipeline.

    :param register: ``register(name, factory, path=...)``. ``path`` is the URL path the dialect
        serves (e.g. ``/v1/realtime``); ``factory()`` is called with no arguments once per
        connection and returns a :class:`host.compat.Dialect`.
    """


# --- lifecycle ----------------------------------------------------------------------


@hookspec
def startup(worker):
    """The worker has loaded its engines and is about to accept sessions.

    :param worker: the :class:`host.server.Worker`.
    """


@hookspec
def shutdown(worker):
    """The worker stopped accepting sessions, ended the open ones and is shutting down.

    :param worker: the :class:`host.server.Worker`.
    """


@hookspec
def session_started(session):
    """A session was accepted, before ``session.begin`` is sent.

    :param session: a :class:`host.contracts.SessionInfo`.
    """


@hookspec
def session_ended(session, record):
    """A session ended and was finalized.

    :param session: a :class:`host.contracts.SessionInfo`.
    :param record: its :class:`host.contracts.SessionRecord`.
    """
