"""Readiness (``GET /ready``) and the HAProxy front door (deploy/haproxy/haproxy.cfg), with real processes.

The readiness tests need only workers (and redis-server for the router). The HAProxy test starts the
Debian ``haproxy`` binary with the shipped config, only its addresses and paths substituted, in front
of two real workers; it is skipped when haproxy is not installed (``.ci/run`` installs it).
Nothing here measures wall-clock time: every step waits for a state (a worker's /ready or /health,
haproxy's view of its servers on the stats socket) and then checks what followed from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from host.client import read_wav, session_url

from .support import (
    ENGINES,
    ROOT,
    RedisServer,
    RouterProcess,
    ServedProcess,
    WorkerProcess,
    collect,
    free_port,
    http_get,
)

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
KEY = "ready-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# --- helpers ------------------------------------------------------------------------------------


def wait_for(what: str, probe, timeout: float = 60.0, every: float = 0.05):
    """Poll ``probe()`` until it returns something truthy; that value. A generous bound only turns a
    hang into a failure: nothing is asserted about how long the state took."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def await_for(what: str, probe, timeout: float = 60.0, every: float = 0.05):
    """:func:`wait_for` for coroutines: the probe runs in a thread, the event loop goes on."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(probe)
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def ready(server: ServedProcess) -> tuple[int, str]:
    status, body = http_get(server.http + "/ready")
    return status, body.get("status", "")


async def open_session(url: str, headers: dict | None = None) -> tuple[ClientConnection, dict]:
    ws = await connect(url, additional_headers=headers, open_timeout=30, max_size=None, ping_interval=None)
    begin = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert begin["type"] == "session.begin", begin
    return ws, begin


async def finish(ws: ClientConnection, audio: bytes = b"") -> list[dict]:
    """Send ``audio`` and ``end``; every message up to the close."""
    for i in range(0, len(audio), 3200):
        await ws.send(audio[i:i + 3200])
    await ws.send(json.dumps({"type": "end"}))
    return await collect(ws)


async def refused(url: str, headers: dict | None = None) -> tuple[int | None, str]:
    """Close code and reason of a session the server turns away right after the handshake."""
    async with connect(url, additional_headers=headers, open_timeout=30) as ws:
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 30)
    return ws.close_code, ws.close_reason


# --- GET /ready on a worker ---------------------------------------------------------------------


async def test_worker_ready_answers_starting_ready_full_and_draining(tmp_path):
    """/ready follows admission: 503 starting, 200, 503 full at MAX_SESSIONS (while /health stays 200),
    200 again, 503 draining after SIGTERM; never behind the API key."""
    worker = WorkerProcess(tmp_path, max_sessions=1, drain_timeout_s=120, api_keys=KEY)
    try:
        seen = []

        def answered():
            try:
                seen.append(ready(worker))
            except OSError:  # the port is not open yet
                return None
            return seen[-1][0] == 200

        wait_for("the worker to become ready", answered, timeout=180, every=0.01)
        assert (503, "starting") in seen and seen[-1] == (200, "ready"), seen
        status, body = http_get(worker.http + "/ready")
        assert body == {"status": "ready", "worker_id": worker.worker_id, "active_sessions": 0,
                        "finalizing": 0, "capacity": 1}

        ws, _ = await open_session(session_url(worker.url), AUTH)
        status, body = http_get(worker.http + "/ready")
        assert (status, body["status"], body["active_sessions"]) == (503, "full", 1)
        assert http_get(worker.http + "/health")[0] == 200, "a full worker is alive: liveness stays 200"
        assert await refused(session_url(worker.url), AUTH) == (1013, "Server at capacity")  # what /ready foretold
        assert (await finish(ws))[-1]["type"] == "session.end"
        await await_for("the slot to come back", lambda: ready(worker) == (200, "ready"))

        ws, _ = await open_session(session_url(worker.url), AUTH)
        worker.proc.send_signal(signal.SIGTERM)
        await await_for("/ready to say draining", lambda: ready(worker) == (503, "draining"))
        assert http_get(worker.http + "/health")[1]["status"] == "draining"
        messages = await finish(ws)  # the open session still ends normally on the draining worker
        assert messages[-1]["type"] == "session.end" and ws.close_code == 1000
        assert await asyncio.to_thread(worker.proc.wait, 60) == 0
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()


# --- GET /ready on the router -------------------------------------------------------------------


async def test_router_ready_needs_a_ready_worker_with_a_free_slot(tmp_path):
    """The router's /ready: 503 no_workers, 200 once a worker registers ready, 503 full while that
    worker's only slot is taken (by a client connected to it directly), 503 registry_unavailable
    without Redis. Its /health stays 200 throughout the first three."""
    redis_server = RedisServer(tmp_path)
    router = RouterProcess(tmp_path, redis_server.url, api_keys=KEY)
    worker = None
    try:
        router.wait_healthy()
        assert ready(router) == (503, "no_workers")
        assert http_get(router.http + "/health")[0] == 200
        worker = WorkerProcess(tmp_path, max_sessions=1, env={"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL_S": "0.5"})
        worker.wait_healthy()
        await await_for("the router to see a ready worker", lambda: ready(router) == (200, "ready"))
        assert http_get(router.http + "/ready")[1] == {"status": "ready", "role": "router", "workers": 1,
                                                       "ready_workers": 1, "free": 1}
        ws, _ = await open_session(session_url(worker.url))
        await await_for("the router to see the worker full", lambda: ready(router) == (503, "full"))
        assert http_get(router.http + "/health")[0] == 200
        assert (await finish(ws))[-1]["type"] == "session.end"
        await await_for("the slot to come back", lambda: ready(router) == (200, "ready"))
        redis_server.stop()
        await await_for("the router to miss its registry", lambda: ready(router) == (503, "registry_unavailable"))
    finally:
        router.stop()
        if worker is not None:
            worker.stop()
        redis_server.stop()
    assert "Traceback" not in router.log(), router.log()


# --- HAProxy in front of two workers ------------------------------------------------------------


def render_haproxy_cfg(front_port: int, stats_port: int, sock: Path, workers: list[int]) -> str:
    """The shipped deploy/haproxy/haproxy.cfg with its listening addresses, its workers and its stats
    socket moved to this test's; every other line as shipped. Each replaced line must be there once,
    so a change to the shipped file that the test no longer covers fails here. The privilege drop
    (`user`/`group`) needs root and the haproxy user: dropped only where the test has neither."""
    text = HAPROXY_CFG.read_text()
    subs = [(r"^(\s*)bind :8000$", rf"\g<1>bind 127.0.0.1:{front_port}"),
            (r"^(\s*)bind 127\.0\.0\.1:8404$", rf"\g<1>bind 127.0.0.1:{stats_port}"),
            (r"^(\s*)stats socket /run/haproxy/engine-host\.sock ", rf"\g<1>stats socket {sock} ")]
    subs += [(rf"^(\s*)server worker-{i} \S+$", rf"\g<1>server worker-{i} 127.0.0.1:{port}") for i, port in enumerate(workers, 1)]
    for pattern, replacement in subs:
        text, n = re.subn(pattern, replacement, text, flags=re.M)
        assert n == 1, f"{HAPROXY_CFG.name}: expected one line matching {pattern!r}, found {n}"
    assert len(re.findall(r"^\s*server ", text, flags=re.M)) == len(workers)
    return runnable_here(text)


def haproxy_binary() -> str:
    """The haproxy binary (Debian's is in /usr/sbin, off a plain user's PATH); skips the test without one."""
    binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if binary is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run does)")
    return binary


def runnable_here(text: str) -> str:
    """``text`` without its `user`/`group` lines where this process cannot drop privileges to the
    haproxy user (not root, or no such user); as it is otherwise."""
    if os.geteuid() == 0 and _user_exists("haproxy"):
        return text
    return re.sub(r"^\s*(user|group) haproxy\n", "", text, flags=re.M)


def haproxy_sections() -> dict[str, list[str]]:
    """Section header ("global", "backend workers", ...) → its directive lines, comments dropped."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = " ".join(line.split())
            sections[current] = []
        else:
            assert current is not None, raw
            sections[current].append(" ".join(line.split()))
    return sections


def test_shipped_haproxy_config_balances_on_readiness_and_keeps_tunnels():
    """What the docs promise of deploy/haproxy/haproxy.cfg, read from the file (no haproxy needed)."""
    sections = haproxy_sections()
    defaults, backend = sections["defaults"], sections["backend workers"]
    assert "mode http" in defaults, "HTTP mode: WebSocket upgrades, and checks by status code"
    timeouts = dict(line.split()[1:3] for line in defaults if line.startswith("timeout "))
    assert "tunnel" in timeouts and _seconds(timeouts["tunnel"]) >= 60, "sessions are long tunnels"
    assert "balance leastconn" in backend
    assert "option httpchk GET /ready HTTP/1.1" in backend, "checks readiness, not liveness"
    assert any(line.startswith("http-check send hdr Host ") for line in backend), "the worker reads HTTP/1.1, Host included"
    assert "http-check expect status 200" in backend
    (default_server,) = [line.split() for line in backend if line.startswith("default-server ")]
    assert "check" in default_server
    assert _seconds(default_server[default_server.index("inter") + 1]) <= 2, "short check intervals"
    assert not any("shutdown-sessions" in line for lines in sections.values() for line in lines), \
        "a worker marked down (full, draining) must keep its open sessions"
    servers = [line for line in backend if line.startswith("server ")]
    assert len(servers) >= 2 and all(line.split()[2].endswith(":9000") for line in servers), servers
    assert "bind :8000" in sections["frontend engine_host"]


def test_shipped_haproxy_config_is_valid():
    binary = haproxy_binary()
    text = runnable_here(HAPROXY_CFG.read_text())
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as cfg:
        cfg.write(text)
        cfg.flush()
        done = subprocess.run([binary, "-c", "-f", cfg.name], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", value).groups()
    return float(number) * {"ms": 0.001, "s": 1, None: 0.001, "m": 60, "h": 3600, "d": 86400}[unit]


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class HAProxy:
    """The real haproxy binary in the foreground, with the rendered shipped config."""

    def __init__(self, tmp: Path, workers: list[int]):
        binary = haproxy_binary()
        self.port, self.stats_port = free_port(), free_port()
        # A short path: a Unix socket's name may not be longer than 107 bytes, and pytest's tmp_path can be.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="haproxy-"))
        self.sock = self._sock_dir / "stats.sock"
        self.url = f"ws://127.0.0.1:{self.port}"
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text(render_haproxy_cfg(self.port, self.stats_port, self.sock, workers))
        check = subprocess.run([binary, "-c", "-f", str(self.cfg)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = tmp / "haproxy.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.cfg)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for("haproxy's stats socket", lambda: self.proc.poll() is not None or self.sock.exists())
        assert self.proc.poll() is None, self.log()

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """Server name → its `show stat` row (status, check_status, check_code, scur, stot, ...)."""
        lines = [line for line in self.command("show stat").splitlines() if line]
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
        return {r["svname"]: r for r in rows if r["pxname"] == "workers" and r["svname"] not in ("FRONTEND", "BACKEND")}

    def state(self, server: str) -> str:
        return self.servers()[server]["status"]

    def sent(self, server: str) -> int:
        """Sessions (connections) HAProxy has sent to ``server`` so far; health checks are not counted."""
        return int(self.servers()[server]["stot"])

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)


def worker_on_port(tmp: Path, port: int, **settings) -> ServedProcess:
    """``engine-host serve`` on a given port (a worker restarted where HAProxy expects it)."""
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--engines-dir", str(ENGINES)]
    for name, value in {"worker_id": f"test-{port}", "endpoint": f"ws://127.0.0.1:{port}", **settings}.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return ServedProcess(tmp, args, port)


def actives(workers: list[ServedProcess]) -> list[int]:
    """Each worker's sessions holding a slot (-1 for a worker that is gone)."""
    return [w.health()["active_sessions"] if w.proc.poll() is None else -1 for w in workers]


WORKER_SETTINGS = {"max_sessions": 2, "drain_timeout_s": 600, "idle_timeout_s": 0}
"""Two slots each; a drain that waits for the open session however slow the machine; no idle cut."""


async def test_haproxy_spreads_sessions_and_skips_full_draining_and_dead_workers(tmp_path, speech_by_id):
    haproxy_binary()  # skips before any worker starts
    w1 = WorkerProcess(tmp_path, worker_id="w1", **WORKER_SETTINGS)
    w2 = WorkerProcess(tmp_path, worker_id="w2", **WORKER_SETTINGS)
    workers: list[ServedProcess] = [w1, w2]
    proxy = None
    try:
        for w in workers:
            w.wait_healthy(timeout=180)
        proxy = HAProxy(tmp_path, [w1.port, w2.port])
        names = {w1.port: "worker-1", w2.port: "worker-2"}

        def both_up():
            return all(proxy.state(n) == "UP" for n in names.values())

        await await_for("haproxy to see both workers ready", both_up)
        via = session_url(proxy.url)

        # 1. leastconn: two sessions through HAProxy land on the two workers, one each.
        opened = [await open_session(via), await open_session(via)]
        assert actives(workers) == [1, 1]
        assert (proxy.sent("worker-1"), proxy.sent("worker-2")) == (1, 1)
        for ws, _ in opened:
            assert (await finish(ws))[-1]["type"] == "session.end"
        await await_for("both workers idle", lambda: actives(workers) == [0, 0])

        # 2. A full worker gets no new session. w1 is filled by clients that bypass HAProxy, so
        #    HAProxy's own connection count (0) would pick it; its /ready (503 full) takes it out.
        direct = [await open_session(session_url(w1.url)), await open_session(session_url(w1.url))]
        assert ready(w1) == (503, "full")
        await await_for("haproxy to take the full worker out", lambda: proxy.state("worker-1") == "DOWN")
        row = proxy.servers()["worker-1"]
        assert (row["check_status"], row["check_code"]) == ("L7STS", "503"), row
        sent_to_w1 = proxy.sent("worker-1")
        routed = [await open_session(via), await open_session(via)]  # neither is refused
        assert actives(workers) == [2, 2] and proxy.sent("worker-1") == sent_to_w1
        # Both full: HAProxy answers a new session's handshake itself, 503, and no worker sees it.
        await await_for("haproxy to take the second full worker out", lambda: proxy.state("worker-2") == "DOWN")
        with pytest.raises(InvalidStatus) as no_room:
            await open_session(via)
        assert no_room.value.response.status_code == 503
        assert actives(workers) == [2, 2]
        # Sessions on a server marked down were not cut: each still ends with its session.end.
        for ws, _ in direct + routed:
            assert (await finish(ws))[-1]["type"] == "session.end"
        await await_for("both workers ready again", both_up)

        # 3. A SIGTERMed (draining) worker gets no new session while its open session finishes.
        kept, _ = await open_session(via)
        draining = w1 if actives(workers) == [1, 0] else w2
        other = w2 if draining is w1 else w1
        assert actives([draining, other]) == [1, 0]
        draining.proc.send_signal(signal.SIGTERM)
        await await_for("haproxy to take the draining worker out", lambda: proxy.state(names[draining.port]) == "DOWN")
        assert ready(draining) == (503, "draining")
        sent_to_draining = proxy.sent(names[draining.port])
        newer, _ = await open_session(via)
        assert actives([draining, other]) == [1, 1] and proxy.sent(names[draining.port]) == sent_to_draining
        # The draining worker's session is alive after it was taken out: speech in, its finals out.
        audio = read_wav(speech_by_id["jfk"].path)
        messages = await finish(kept, audio.pcm)
        kinds = [m["type"] for m in messages]
        assert "transcript.final" in kinds and kinds[-1] == "session.end" and kept.close_code == 1000, kinds
        assert messages[-1]["transcript"].lower().startswith("and so my fellow americans")
        assert await asyncio.to_thread(draining.proc.wait, 120) == 0  # its last session done, it exits
        assert (await finish(newer))[-1]["type"] == "session.end"

        # 4. A killed worker is taken out. The drained worker comes back on its port first (HAProxy
        #    takes it in again), then the other one is killed with a session open.
        restarted_dir = tmp_path / "restarted"
        restarted_dir.mkdir()
        back = worker_on_port(restarted_dir, draining.port, **WORKER_SETTINGS)
        workers.append(back)
        back.wait_healthy(timeout=180)
        await await_for("haproxy to take the restarted worker in", lambda: proxy.state(names[back.port]) == "UP")
        await await_for("the other worker idle", lambda: actives([other]) == [0])
        cut, _ = await open_session(via)
        victim = other if actives([other, back]) == [1, 0] else back
        survivor = back if victim is other else other
        victim.proc.kill()
        victim.proc.wait(30)
        with pytest.raises(ConnectionClosed):  # the tunnel to a killed worker just drops
            await asyncio.wait_for(cut.recv(), 60)
        await await_for("haproxy to take the killed worker out", lambda: proxy.state(names[victim.port]) == "DOWN")
        assert proxy.servers()[names[victim.port]]["check_status"].startswith("L4"), proxy.servers()[names[victim.port]]
        sent_to_victim = proxy.sent(names[victim.port])
        after = [await open_session(via), await open_session(via)]
        assert actives([survivor]) == [2] and proxy.sent(names[victim.port]) == sent_to_victim
        for ws, _ in after:
            assert (await finish(ws))[-1]["type"] == "session.end"
    finally:
        if proxy is not None:
            proxy.stop()
        for w in workers:
            w.stop()
    for w in workers:
        assert "Traceback" not in w.log(), w.log()
