"""Shared fixtures: real worker processes on 127.0.0.1 and the real speech set in ../shared/speech."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
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


class WorkerProcess:
    """``engine-host serve`` in a child process."""

    def __init__(self, tmp: Path, engines_dir: Path = ENGINES, env: dict | None = None, **settings):
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"worker-{self.port}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if "REDIS_URL" not in (env or {}):
            full_env.pop("REDIS_URL", None)  # the embedded default: in-memory registry
        args = [sys.executable, "-m", "host.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--engines-dir", str(engines_dir), "--worker-id", f"test-{self.port}"]
        for name, value in settings.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT))

    def wait_healthy(self, timeout: float = 120.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.http + "/health", timeout=1)
                if status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"worker not healthy after {timeout} s:\n{self.log()}")

    def health(self) -> dict:
        return http_get(self.http + "/health")[1]

    def wait_idle(self, timeout: float = 30.0) -> None:
        t0 = time.monotonic()
        while self.health()["active_sessions"] and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        assert self.health()["active_sessions"] == 0, "sessions still active"

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
