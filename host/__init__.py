"""realtime-engine-host: a plugin-based real-time speech-to-text server."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("realtime-engine-host")
except Exception:  # running from a source tree without installing
    __version__ = "0.0.0+local"
