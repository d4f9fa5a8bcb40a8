"""Settings of the worker (``serve``) and the router (``route``): command-line flags, each with an
environment variable and a default. Both extend :class:`ServerSettings`, what every front door has."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class ServerSettings:
    """What the worker and the router are both configured with: where to listen, the registry,
    the largest frame, API keys and logging."""

    host: str = "0.0.0.0"
    port: int = 0
    registry_url: str = ""
    """Where the registry lives (e.g. ``redis://host:6379/0``); offered to the registry as ``url``."""
    registry: str = ""
    """Registry component name; default: see :func:`host.registry_config.registry_name`."""
    registry_options: dict[str, Any] = field(default_factory=dict)
    """Options for the registry component, validated against its schema (they win over what the
    host derives, such as ``url`` and ``ttl_s``)."""
    max_frame_bytes: int = 1 << 20
    api_keys: str = ""
    """Comma-separated API keys; set: sessions need one."""
    api_keys_file: str = ""
    log_level: str = "INFO"


@dataclass
class Settings(ServerSettings):
    """Settings of ``engine-host serve``, one worker."""

    port: int = 9000
    worker_id: str = ""
    endpoint: str = ""
    """The URL routers use to reach this worker (default ws://<hostname>:<port>)."""
    max_sessions: int = 16
    engines_dir: Path = Path("engines.d")
    heartbeat_s: float = 10.0
    partial_interval_s: float = 0.5
    lag_warning_s: float = 3.0
    lag_limit_s: float = 15.0
    max_pending_finals: int = 4
    """Final decodes one session may have queued or running; past this its messages wait (backpressure)."""
    memory_trim_s: float = 30.0
    """Seconds between returns of freed C-heap memory to the OS (0: never)."""
    vad_threads: int = 0
    """Threads for per-frame VAD work (0: one per CPU core)."""
    vad_batch_interval_ms: float = 20.0
    """Under load, the least time between two VAD batches of one model (0: never wait)."""
    idle_timeout_s: float = 30.0
    """A session with no client message for this long ends with error idle_timeout (0: never)."""
    max_session_s: float = 14400.0
    """A session open this long ends with error max_duration (0: no limit)."""
    max_control_per_s: float = 50.0
    """Sustained JSON control messages per second a session may send (bursts of twice that)."""
    ping_interval_s: float = 20.0
    """WebSocket keepalive pings; a client that does not answer within the same time is dropped."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, open sessions may run this long before they are finalized and closed 1001."""
    metrics_auth: bool = False
    """Whether GET /metrics needs an API key too."""
    engines_watch_s: float = 0.0
    """Poll the engines directory this often and reload on change (0: reload on SIGHUP only)."""
    sessions_dir: str = ""
    """Where to record each session's audio (WAV) and transcript (JSON); empty: recording off."""
    sessions_retention_s: float = 0.0
    """Recordings older than this are deleted (0: kept forever)."""
    resume_window_s: float = 30.0
    """A resumable session whose connection is lost waits this long for its client to re-attach (0: never)."""

    def __post_init__(self) -> None:
        if not self.worker_id:
            self.worker_id = f"{socket.gethostname()}-{self.port}"
        if not self.endpoint:
            self.endpoint = f"ws://{socket.gethostname()}:{self.port}"
        self.engines_dir = Path(self.engines_dir)


@dataclass
class RouterSettings(ServerSettings):
    """Settings of ``engine-host route``, the session router in front of many workers. Its registry
    must be a shared one (a WorkerDirectory)."""

    port: int = 8000
    lease_ttl_s: float = 30.0
    """A reservation lives this long unless renewed; the router renews it while the session runs."""
    connect_timeout_s: float = 5.0
    max_attempts: int = 3
    """Workers tried for one session before it is refused with 1013."""
    suspect_s: float = 30.0
    """A worker that could not be reached is skipped this long unless it heartbeats again."""
    ping_interval_s: float = 5.0
    """WebSocket pings to workers; a worker that stops answering for two intervals is lost."""


ALIASES = {"redis_url": "registry_url"}
"""Former setting names that are still read: alias -> setting. The setting's own variable or flag wins."""

# Setting name -> (environment variable, help text); the CLI builds its flags from these tables.
# The entries both the worker and the router read:
SERVER_ENV = {
    "registry_url": ("REGISTRY_URL", "URL of the worker registry (empty: the in-memory registry)"),
    "redis_url": ("REDIS_URL", "former name of REGISTRY_URL, still read (REGISTRY_URL wins)"),
    "registry": ("ENGINE_HOST_REGISTRY", "registry component (default: memory without a registry URL, "
                                         "else the one named like the URL's scheme)"),
    "registry_options": ("ENGINE_HOST_REGISTRY_OPTIONS", "JSON object of options for the registry component"),
    "api_keys_file": ("ENGINE_HOST_API_KEYS_FILE", "file of API keys, one per line"),
    "log_level": ("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
}

ENV = {
    "host": ("WORKER_HOST", "address to listen on"),
    "port": ("WORKER_PORT", "port for WebSocket sessions and HTTP (/health, /engines)"),
    "worker_id": ("WORKER_ID", "this worker's id in the registry (default <hostname>-<port>)"),
    "endpoint": ("WORKER_ENDPOINT", "URL routers use to reach this worker (default ws://<hostname>:<port>)"),
    "max_sessions": ("MAX_SESSIONS", "concurrent sessions; one more is closed with 1013"),
    "engines_dir": ("ENGINES_DIR", "directory of engine.yaml files"),
    "heartbeat_s": ("HEARTBEAT_INTERVAL_S", "seconds between registry heartbeats"),
    "max_frame_bytes": ("MAX_FRAME_BYTES", "largest audio frame accepted; larger ones get error frame_too_large"),
    "partial_interval_s": ("PARTIAL_INTERVAL_S", "seconds of new speech between two transcript.partial decodes"),
    "lag_warning_s": ("LAG_WARNING_S", "a final this late after its endpoint sends warning processing_lag"),
    "lag_limit_s": ("LAG_LIMIT_S", "a final this late ends the session with error processing_lag"),
    "max_pending_finals": ("MAX_PENDING_FINALS",
                           "final decodes one session may have queued or running; more wait (backpressure)"),
    "memory_trim_s": ("MEMORY_TRIM_S", "seconds between returning freed heap memory to the OS (0: never)"),
    "vad_threads": ("VAD_THREADS", "threads for VAD work (0: one per CPU core)"),
    "vad_batch_interval_ms": ("VAD_BATCH_INTERVAL_MS",
                              "under load, least milliseconds between two VAD batches of a model (0: never wait)"),
    "idle_timeout_s": ("IDLE_TIMEOUT_S", "a session with no client message this long ends with idle_timeout (0: never)"),
    "max_session_s": ("MAX_SESSION_S", "a session open this long ends with max_duration (0: no limit)"),
    "max_control_per_s": ("MAX_CONTROL_PER_S", "JSON control messages per second a session may send (bursts of 2x)"),
    "ping_interval_s": ("PING_INTERVAL_S", "seconds between WebSocket keepalive pings (0: none)"),
    "drain_timeout_s": ("DRAIN_TIMEOUT_S", "on SIGTERM, seconds open sessions may go on before they are closed 1001"),
    "api_keys": ("ENGINE_HOST_API_KEYS", "comma-separated API keys; when set, /session needs one"),
    "metrics_auth": ("METRICS_AUTH", "require an API key for GET /metrics too"),
    "engines_watch_s": ("ENGINES_WATCH_S", "poll engines_dir this often and reload on change (0: on SIGHUP only)"),
    "sessions_dir": ("SESSIONS_DIR", "record each session's audio (WAV) and transcript (JSON) here; empty: off"),
    "sessions_retention_s": ("SESSIONS_RETENTION_S", "delete recordings older than this many seconds (0: keep)"),
    "resume_window_s": ("RESUME_WINDOW_S", "seconds a resumable session whose connection was lost waits for "
                                           "its client to resume (0: no resume)"),
    **SERVER_ENV,
}

ROUTER_ENV = {
    "host": ("ROUTER_HOST", "address to listen on"),
    "port": ("ROUTER_PORT", "port for client sessions and HTTP (/health, /workers)"),
    "lease_ttl_s": ("ROUTER_LEASE_TTL_S", "seconds a reservation lives unless renewed (renewed while a session runs)"),
    "connect_timeout_s": ("ROUTER_CONNECT_TIMEOUT_S", "seconds to reach a worker before trying the next"),
    "max_attempts": ("ROUTER_MAX_ATTEMPTS", "workers tried per session before closing 1013"),
    "suspect_s": ("ROUTER_SUSPECT_S", "seconds an unreachable worker is skipped unless it heartbeats again"),
    "ping_interval_s": ("ROUTER_PING_INTERVAL_S", "seconds between pings to workers; two unanswered = worker lost"),
    "max_frame_bytes": ("MAX_FRAME_BYTES", "frame size the workers accept (the router passes up to 4x through)"),
    "api_keys": ("ENGINE_HOST_API_KEYS", "comma-separated API keys, checked at the router's handshake"),
    **SERVER_ENV,
}


def default_of(settings: ServerSettings, name: str) -> Any:
    """The value of setting ``name`` (an alias reads the setting it stands for)."""
    return getattr(settings, ALIASES.get(name, name))


def settings_from(env: Mapping[str, str] | None = None, *, kind: type = Settings, table: dict | None = None,
                  **overrides: Any):
    """Settings of ``kind`` from environment variables, then explicit overrides (CLI flags) on top.
    Each source sets an alias first, so the setting's own variable or flag wins over it."""
    env = os.environ if env is None else env
    table = ENV if table is None else table
    types = {f.name: f.type for f in fields(kind)}
    ordered = sorted(table, key=lambda name: name not in ALIASES)
    values: dict[str, Any] = {}
    for name in ordered:
        var = table[name][0]
        if var in env and env[var] != "":
            target = ALIASES.get(name, name)
            values[target] = _convert(types[target], env[var], var)
    for name in sorted(overrides, key=lambda name: name not in ALIASES):
        if overrides[name] is not None:
            values[ALIASES.get(name, name)] = overrides[name]
    return kind(**values)


def json_object(raw: str) -> dict[str, Any]:
    """A JSON object (``ENGINE_HOST_REGISTRY_OPTIONS``, ``--registry-options``); ValueError otherwise."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {raw!r}")
    return value


def _convert(kind: Any, raw: str, var: str) -> Any:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return _bool(raw)
        if kind == "Path":
            return Path(raw)
        if kind.startswith("dict"):
            return json_object(raw)
    except ValueError:
        raise SystemExit(f"environment variable {var}={raw!r} is not a valid {kind}") from None
    return raw
