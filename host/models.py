"""Model manager: builds every engine's components once at start-up and reports memory.

Factories run in a worker thread (they load weights), never on the event loop.
Components are shared by all sessions; identical models named by several
variants or engines are loaded once through :meth:`ModelManager.shared`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from host import asr, languages
from host.contracts import AsrEngine, Assembler, LoadContext, TurnDetector, VadModel
from host.endpointing import EndpointingOptions
from host.engines import COMPONENT_KIND, EngineSpec
from host.plugins import Component, PluginSet

log = logging.getLogger(__name__)


class ComponentError(Exception):
    """A factory failed; the message names the engine, stage and plugin."""


@dataclass
class LoadedEngine:
    spec: EngineSpec
    vad: VadModel
    endpointing: EndpointingOptions
    asr: AsrEngine
    assembler: Assembler
    turn: TurnDetector | None = None
    """The engine's turn detector (``pipeline.turn``), if it names one."""
    load_seconds: float = 0.0
    shared_keys: frozenset = frozenset()
    """Keys of :meth:`ModelManager.shared` objects this engine uses (kept alive while it is loaded)."""
    components: dict[str, Component] = field(default_factory=dict)
    """The registered component that serves each stage (``vad``, ``asr``, ``assembler``)."""

    @property
    def id(self) -> str:
        return self.spec.id

    def component(self, stage: str) -> str:
        """Who serves ``stage``, for errors and logs: ``asr 'faster-whisper' (plugin asr_faster_whisper)``."""
        c = self.components.get(stage)
        return c.label if c is not None else f"{stage} {self.spec.pipeline[stage].plugin!r}"

    def describe(self) -> dict[str, Any]:
        """The ``/engines`` entry: the engine.yaml description, with what its ASR reports it uses."""
        out = self.spec.describe()
        for name, entry in out["capabilities"]["variants"].items():
            entry.update({k: v for k, v in self._variant_description(name).items() if k not in entry})
        memory = self.memory()
        if memory is not None:
            out["memory"] = memory
        return out

    def _variant_description(self, name: str) -> dict[str, Any]:
        """What variant ``name``'s model says of itself (its optional ``describe()``), or nothing."""
        describe = getattr(self.asr.variants.get(name), "describe", None)
        if not callable(describe):
            return {}
        try:
            value = describe()
        except Exception as exc:  # noqa: BLE001 - a broken description must not break /engines
            log.warning("%s: describe() of variant %r raised %s", self.component("asr"), name, exc)
            return {}
        return value if isinstance(value, dict) else {}

    def memory(self) -> dict[str, Any] | None:
        """What the ASR engine reports it uses (its optional ``memory()``), or None."""
        report = getattr(self.asr, "memory", None)
        if not callable(report):
            return None
        try:
            value = report()
        except Exception as exc:  # noqa: BLE001 - a broken report must not break /health
            return {"error": f"{self.component('asr')}: memory() raised {type(exc).__name__}: {exc}"}
        return value if isinstance(value, dict) else {"error": f"memory() returned {type(value).__name__}, not a dict"}


@dataclass(frozen=True)
class FailedEngine:
    """An engine whose components failed to load: it is not served, and is reported."""

    id: str
    file: str
    reason: str

    def describe(self) -> dict[str, Any]:
        """Its ``/engines`` entry (and ``/health`` ``failed_engines`` item)."""
        return {"id": self.id, "file": self.file, "status": "failed", "reason": self.reason}


@dataclass
class ModelManager:
    plugins: PluginSet
    engines: dict[str, LoadedEngine] = field(default_factory=dict)
    failed: dict[str, FailedEngine] = field(default_factory=dict)
    """Engines whose models or components did not load (the others serve)."""
    _shared: dict[tuple, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def shared(self, key: tuple, loader: Callable[[], Any]) -> Any:
        """One object per ``key`` across all engines (e.g. one set of model weights)."""
        with self._lock:
            if key not in self._shared:
                self._shared[key] = loader()
            return self._shared[key]

    async def load(self, specs: list[EngineSpec]) -> None:
        """Load all engines, one after another, off the event loop.

        An engine that fails (a bad model path in a third party's engine.yaml) is logged and kept
        in :attr:`failed`; the others serve. Raises :class:`ComponentError` when none loads."""
        for spec in specs:
            try:
                self.engines[spec.id] = await asyncio.to_thread(self._build, spec)
            except ComponentError as exc:
                log.error("engine %s is not served: %s", spec.id, exc)
                self.failed[spec.id] = FailedEngine(spec.id, str(spec.file), str(exc))
        if not self.engines:
            raise ComponentError("no engine could be loaded: " + "; ".join(f.reason for f in self.failed.values()))

    async def reload(self, specs: list[EngineSpec], failed_files: set[Path]) -> dict[str, list[str]]:
        """Make ``specs`` the loaded engines, building only new or changed ones (off the loop).

        An engine whose file is now invalid (in ``failed_files``) or whose models fail
        to load keeps its previous version. Removed engines stop being offered; open
        sessions hold their own reference and finish on it. Returns what changed.
        """
        old = dict(self.engines)
        new: dict[str, LoadedEngine] = {}
        report: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "kept": [], "failed": []}
        for spec in specs:
            prev = old.get(spec.id)
            if prev is not None and prev.spec.raw == spec.raw:
                new[spec.id] = prev
                continue
            try:
                new[spec.id] = await asyncio.to_thread(self._build, spec)
                report["changed" if prev is not None else "added"].append(spec.id)
                self.failed.pop(spec.id, None)
            except ComponentError as exc:
                log.error("%s", exc)
                report["failed"].append(spec.id)
                if prev is not None:
                    new[spec.id] = prev
                else:
                    self.failed[spec.id] = FailedEngine(spec.id, str(spec.file), str(exc))
        for engine_id, prev in old.items():
            if engine_id in new:
                continue
            if Path(prev.spec.file).resolve() in failed_files:
                new[engine_id] = prev  # its file is broken now: keep serving the last good version
                report["kept"].append(engine_id)
            else:
                report["removed"].append(engine_id)
        listed = {spec.id for spec in specs}
        self.failed = {k: v for k, v in self.failed.items() if k in listed and k not in new}
        # File order, as at start-up: the first engine is the default one and must not move.
        self.engines = dict(sorted(new.items(), key=lambda item: Path(item[1].spec.file).name))
        self._prune_shared()
        return report

    def _prune_shared(self) -> None:
        """Forget shared objects no loaded engine uses (sessions still using them keep them alive)."""
        used = set().union(*(e.shared_keys for e in self.engines.values())) if self.engines else set()
        with self._lock:
            for key in [k for k in self._shared if k not in used]:
                del self._shared[key]

    def _build(self, spec: EngineSpec) -> LoadedEngine:
        t0 = time.perf_counter()
        used: set = set()
        built: dict[str, Any] = {}
        components: dict[str, Component] = {}
        for stage in spec.pipeline:
            component = self.plugins.component(COMPONENT_KIND[stage], spec.pipeline[stage].plugin)
            assert component is not None, "engine validation checked that the plugin exists"
            components[stage] = component
            built[stage] = self._make(spec, stage, component, used)
        for stage, problem in check_contracts(spec, built):
            raise ComponentError(f"engine {spec.id!r} ({spec.file}): {components[stage].label}: {problem}")
        seconds = time.perf_counter() - t0
        log.info("engine %s loaded in %.2f s (variants: %s; %s)", spec.id, seconds, ", ".join(spec.models),
                 ", ".join(c.label for c in components.values()))
        return LoadedEngine(
            spec=spec,
            vad=built["vad"],
            endpointing=EndpointingOptions.from_options(spec.pipeline["vad"].endpointing or {}),
            asr=built["asr"],
            assembler=built["assembler"],
            turn=built.get("turn"),
            load_seconds=seconds,
            shared_keys=frozenset(used),
            components=components,
        )

    def _make(self, spec: EngineSpec, stage: str, component: Component, used: set) -> Any:
        """Call one stage's factory; its ``shared`` keys are kept apart from other plugins' ones."""

        def shared(key: tuple, loader: Callable[[], Any]) -> Any:
            namespaced = (component.plugin, *key) if isinstance(key, tuple) else (component.plugin, key)
            used.add(namespaced)
            return self.shared(namespaced, loader)

        context = LoadContext(shared=shared, engine_id=spec.id, plugin=component.plugin)
        try:
            return component.factory(dict(spec.pipeline[stage].options), context)
        except Exception as exc:
            raise ComponentError(
                f"engine {spec.id!r} ({spec.file}): {stage} plugin {component.name!r} "
                f"from {component.plugin!r} failed to load: {type(exc).__name__}: {exc}"
            ) from exc

    def memory(self) -> dict[str, Any]:
        """Process RSS always; GPU memory per device through NVML when a GPU is present."""
        report: dict[str, Any] = {"rss_bytes": psutil.Process(os.getpid()).memory_info().rss}
        gpus = gpu_memory()
        if gpus:
            report["gpus"] = gpus
        return report


def check_contracts(spec: EngineSpec, built: dict[str, Any]) -> list[tuple[str, str]]:
    """What the built components lack of their contracts, as (stage, problem); empty when all keep them.

    Checked once at load, so that a component missing a method fails its engine with a clear
    reason instead of failing the first session that needs it."""
    problems: list[tuple[str, str]] = []
    vad = built["vad"]
    window = getattr(vad, "window_samples", None)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        problems.append(("vad", f"window_samples must be a positive int, got {window!r}"))
    if not callable(getattr(vad, "open_stream", None)):
        problems.append(("vad", "has no open_stream()"))
    if not callable(getattr(built["assembler"], "open_session", None)):
        problems.append(("assembler", "has no open_session()"))
    if "turn" in built and not callable(getattr(built["turn"], "probability", None)):
        problems.append(("turn", "has no probability(audio)"))
    variants = getattr(built["asr"], "variants", None)
    if not isinstance(variants, dict):
        return [*problems, ("asr", f"variants must be a dict of model variants, got {type(variants).__name__}")]
    missing = [v for v in spec.models if v not in variants]
    if missing:
        problems.append(("asr", f"did not provide variants {missing}"))
    unserved: dict[str, list[str]] = {}  # per variant, the engine's languages its model lacks
    for name in spec.models:
        if name in variants:
            found, unserved[name] = _asr_model_problems(variants[name], spec)
            problems += [("asr", f"variant {name!r}: {p}") for p in found]
    # A variant may serve fewer languages than the engine (fast: English only), but each language
    # the engine names must be served by some variant.
    nowhere = set.intersection(*(set(v) for v in unserved.values())) if unserved else set()
    for name, missing in unserved.items():
        if nowhere & set(missing):
            declared = languages.shown(sorted(asr.model_languages(variants[name]) or []))
            problems.append(("asr", f"variant {name!r}: capabilities.languages names {sorted(nowhere)}, which the "
                                    f"model does not transcribe (it declares: {declared}), nor does any other variant's"))
            break
    if not problems:
        spec.served = {name: served_languages(spec, variants[name]) for name in spec.models}
    return problems


def served_languages(spec: EngineSpec, model: Any) -> list[str]:
    """The languages variant ``model`` serves: the engine's that the model declares, or every one the
    model declares where the engine names ``*``."""
    declared = asr.model_languages(model)
    engine = spec.capabilities["languages"]
    if set(engine) & asr.ANY:
        return sorted(declared) if declared is not None else list(engine)
    return [code for code in engine if declared is None or declared & asr.ANY or code in declared]


def _asr_model_problems(model: Any, spec: EngineSpec) -> tuple[list[str], list[str]]:
    """What the variant lacks of the contract, and the engine's languages its model does not declare."""
    problems = []
    if not callable(getattr(model, "transcribe", None)):
        problems.append("has no transcribe()")
    try:
        hash(model.key)
    except (AttributeError, TypeError):
        problems.append("key must be a hashable value (a tuple naming the loaded weights)")
    parallelism = getattr(model, "parallelism", None)
    if not isinstance(parallelism, int) or isinstance(parallelism, bool) or parallelism < 1:
        problems.append(f"parallelism must be a positive int, got {parallelism!r}")
    try:
        return problems, asr.unsupported_languages(spec.capabilities["languages"], model)
    except ValueError as exc:
        return [*problems, str(exc)], []


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> bool:
    """Give memory that the C allocator holds but no longer uses back to the OS (glibc only).

    Utterance buffers of every size from several threads fragment glibc's arenas, so RSS
    creeps up over hours although nothing is leaked; trimming the free parts bounds it.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


async def trim_memory_loop(interval_s: float, stop: asyncio.Event) -> None:
    """Call :func:`release_free_memory` every ``interval_s`` seconds, off the event loop."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            await asyncio.to_thread(release_free_memory)


def gpu_memory() -> list[dict[str, Any]]:
    """Used/total memory of each NVIDIA GPU (empty without NVML or a GPU).

    NVML sees all allocations on the device, CTranslate2's included, which
    torch.cuda.memory_allocated() does not.
    """
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: no GPU to report
        return []
    try:
        out = []
        pid = os.getpid()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            mine: int | None = 0
            try:
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid and proc.usedGpuMemory:
                        mine += proc.usedGpuMemory
            except Exception:  # noqa: BLE001 - per-process figures are not available everywhere
                mine = None
            out.append({"index": i, "used_bytes": info.used, "total_bytes": info.total, "process_bytes": mine})
        return out
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
