"""Shared fixtures: real worker processes on 127.0.0.1 and the real speech set in ../shared/speech."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEECH = Path(os.environ.get("SPEECH_DIR", ROOT.parent / "shared" / "speech"))
ENGINES = ROOT / "engines.d"


@dataclass
class Utt:
    id: str
    path: Path
    duration: float
    reference: str


def manifest() -> list[Utt]:
    path = SPEECH / "manifest.tsv"
    if not path.is_file():
        pytest.skip(f"real speech set not found at {SPEECH} (expected ../shared/speech beside the checkout)")
    with open(path, newline="", encoding="utf-8") as f:
        return [Utt(r["id"], SPEECH / r["path"], float(r["duration_s"]), r["reference"])
                for r in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="session")
def speech() -> list[Utt]:
    return manifest()


@pytest.fixture(scope="session")
def speech_by_id(speech) -> dict[str, Utt]:
    return {u.id: u for u in speech}


@pytest.fixture(scope="session")
def default_engine():
    """The default engine (engines.d/whisper-streaming.yaml) loaded in this process, as the offline
    tools load it: its plugins' real models, called directly."""
    from host.offline import load_engine

    loaded = load_engine("whisper-streaming", ENGINES)
    if isinstance(loaded, str):
        pytest.fail(loaded)
    return loaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def metrics(worker) -> dict[str, float]:
    """A worker's /metrics as {"name{labels}": value}."""
    with urllib.request.urlopen(worker.http + "/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class ServedProcess:
    """An ``engine-host`` server command in a child process, logging to a file under ``tmp``."""

    def __init__(self, tmp: Path, command: list[str], port: int, env: dict | None = None):
        self.port = port
        self.url = f"ws://127.0.0.1:{port}"
        self.http = f"http://127.0.0.1:{port}"
        self.log_path = tmp / f"{command[0]}-{port}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if "REDIS_URL" not in (env or {}):
            full_env.pop("REDIS_URL", None)  # the embedded default: in-memory registry
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "host.cli", *command], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT))

    def wait_healthy(self, timeout: float = 120.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log_path.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.http + "/health", timeout=1)
                if status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.log_path.name} not healthy after {timeout} s:\n{self.log()}")

    def health(self) -> dict:
        return http_get(self.http + "/health")[1]

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class WorkerProcess(ServedProcess):
    """``engine-host serve`` in a child process; keyword settings become command-line flags."""

    def __init__(self, tmp: Path, engines_dir: Path = ENGINES, env: dict | None = None, **settings):
        port = free_port()
        settings.setdefault("worker_id", f"test-{port}")
        settings.setdefault("endpoint", f"ws://127.0.0.1:{port}")
        args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--engines-dir", str(engines_dir)]
        for name, value in settings.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        super().__init__(tmp, args, port, env)
        self.worker_id = settings["worker_id"]

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no session holds a slot or is still finalizing (a slot is given back first)."""
        t0 = time.monotonic()
        while self.busy() and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        assert not self.busy(), "sessions still active"

    def busy(self) -> int:
        health = self.health()
        return health["active_sessions"] + health.get("finalizing", 0)


class RouterProcess(ServedProcess):
    """``engine-host route`` in a child process."""

    def __init__(self, tmp: Path, redis_url: str, **settings):
        port = free_port()
        args = ["route", "--host", "127.0.0.1", "--port", str(port), "--redis-url", redis_url]
        for name, value in settings.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        super().__init__(tmp, args, port)

    def workers(self) -> list[dict]:
        return http_get(self.http + "/workers")[1]


class RedisServer:
    """A throwaway ``redis-server`` on a free port (no persistence), restartable on the same port."""

    def __init__(self, tmp: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        self.binary, self.dir, self.port = binary, tmp, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)], stdout=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self):
        import redis

        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
    """One worker for the protocol and transcription tests (capacity 3)."""
    w = WorkerProcess(tmp_path_factory.mktemp("worker"), max_sessions=3)
    w.wait_healthy()
    yield w
    w.stop()
    # Nothing a client did may have crashed a handler.
    assert "Traceback" not in w.log(), w.log()


@pytest.fixture
def idle_worker(worker):
    worker.wait_idle()
    return worker


# --- audio in other vendors' formats (compatibility endpoint tests) -------------------------


def pcm_at(audio, rate: int) -> bytes:
    """16-bit mono audio resampled to ``rate`` Hz pcm_s16le."""
    import numpy as np
    import soxr

    samples = np.frombuffer(audio.pcm, dtype="<i2")
    if audio.sample_rate == rate:
        return samples.tobytes()
    return soxr.resample(samples, audio.sample_rate, rate).astype("<i2").tobytes()


def pcm24(audio) -> bytes:
    """24 kHz pcm16, OpenAI's default input format."""
    return pcm_at(audio, 24000)


def mulaw8k(audio) -> bytes:
    """G.711 μ-law at 8 kHz."""
    import numpy as np

    x = np.frombuffer(pcm_at(audio, 8000), dtype="<i2").astype(np.int32)
    sign = (x < 0).astype(np.int32)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~((sign << 7) | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def chunks(data: bytes, size: int = 4800):
    """``data`` in pieces of ``size`` bytes."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def doc_snippet(doc: Path, name: str = "transcribe"):
    """The function ``name`` defined by the first ```python block of ``doc``, executed as written."""
    import re

    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(doc), "exec"), namespace)
    return namespace[name]


async def run_compat_snippet(vendor: str, utt: Utt, server: ServedProcess) -> str:
    """The client function of docs/compat-<vendor>.md, as written, transcribing ``utt`` through
    ``server`` (a worker or the router); its transcript."""
    import asyncio

    from host.client import read_wav

    transcribe = doc_snippet(ROOT / "docs" / f"compat-{vendor}.md")
    audio = read_wav(utt.path)
    args = {"openai": (pcm24(audio), f"{server.url}/v1"), "elevenlabs": (pcm_at(audio, 16000), server.http),
            "deepgram": (str(utt.path), server.url)}[vendor]
    return await asyncio.wait_for(transcribe(*args), 30)


# --- a raw WebSocket client: for hostile peers the websockets client is too polite to play ------------


def handshake(path: str, extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (mask key zero, so the payload goes as it is)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


async def raw_exchange(port: int, data: bytes, read_s: float = 10.0, until: bytes | None = None) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (or ``until`` arrived)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()

    async def read() -> bytes:
        got = b""
        while chunk := await reader.read(65536):
            got += chunk
            if until is not None and until in got:
                break
        return got

    try:
        return await asyncio.wait_for(read(), read_s)
    finally:
        writer.close()


async def read_frames_until_close(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """Server frames (opcode, payload) up to and including the close frame; never answers."""
    frames = []
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await reader.readexactly(8))[0]
        frames.append((b0 & 0x0F, await reader.readexactly(n)))
        if frames[-1][0] == 0x8:
            return frames


def router_cluster(tmp: Path, prefix: str, heartbeat_s: float):
    """Redis, two workers of capacity 2 (ids ``<prefix>1``, ``<prefix>2``) and a router, all real
    processes, once both workers are ready in the router's view; yields (redis, workers, router)."""
    redis_server = RedisServer(tmp)
    env = {"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL_S": str(heartbeat_s)}
    workers = [WorkerProcess(tmp, env=env, max_sessions=2, worker_id=f"{prefix}{i}") for i in (1, 2)]
    router = RouterProcess(tmp, redis_server.url)
    try:
        for w in workers:
            w.wait_healthy()
        router.wait_healthy()
        deadline = time.monotonic() + 10
        while len([w for w in router.workers() if w["status"] == "ready"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield redis_server, workers, router
    finally:
        router.stop()
        for w in workers:
            w.stop()
        redis_server.stop()
    assert "Traceback" not in router.log(), router.log()


async def collect(ws) -> list[dict]:
    """Every JSON message until the server closes, whatever the close code."""
    import json

    from websockets.exceptions import ConnectionClosed

    messages = []
    try:
        async for raw in ws:
            messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    return messages
