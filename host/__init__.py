"""realtime-engine-host: a plugin-based real-time speech-to-text server."""

import os

# numpy's OpenBLAS runs its matrix products (here: faster-whisper's mel filterbank) on a pool of
# one thread per core, and those threads spin for a while after every call. In a worker whose
# parallelism comes from sessions and decoder threads they only take cores from the decoders:
# 27 % of a loaded worker's CPU samples were OpenBLAS threads spinning. Must be set before numpy
# loads OpenBLAS, hence here; an operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

try:
    from importlib.metadata import version as _version

    __version__ = _version("realtime-engine-host")
except Exception:  # noqa: BLE001 - running from a source tree without installing
    __version__ = "0.0.0+local"
