"""Prometheus metrics of one worker, served as ``GET /metrics``.

Each worker owns its :class:`Metrics` (its own CollectorRegistry, no process
globals), so several workers in one process (tests, embedding) do not mix.
Gauges that describe current state (active sessions, queue depth, memory) are
read at scrape time from callables the worker provides.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets in seconds: finals are usually tens of milliseconds on an idle worker and
# approach a second near capacity; partials include the decode of a growing utterance.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """Counters and histograms sessions update, plus state gauges collected on scrape."""

    def __init__(self, state: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions = Counter("engine_host_sessions", "Sessions ended, by status", ["status"], registry=r)
        self.refused = Counter("engine_host_sessions_refused", "Sessions refused before they began, by reason",
                               ["reason"], registry=r)
        self.audio_seconds = Counter("engine_host_audio_seconds", "Seconds of audio received", registry=r)
        self.speech_seconds = Counter("engine_host_speech_seconds", "Seconds of speech endpointed", registry=r)
        self.errors = Counter("engine_host_errors", "Error messages sent to clients, by code", ["code"], registry=r)
        self.speculative = Counter(
            "engine_host_speculative_decodes", "Speculative finals (decoded during the endpoint silence), by "
            "outcome: used as the final, wasted (speech resumed after it started) or withdrawn before it started",
            ["outcome"], registry=r)
        self.final_latency = Histogram(
            "engine_host_final_latency_seconds", "From the endpoint of an utterance to its transcript.final",
            buckets=LATENCY_BUCKETS, registry=r)
        self.partial_latency = Histogram(
            "engine_host_partial_latency_seconds", "From a partial request to its transcript.partial",
            buckets=LATENCY_BUCKETS, registry=r)
        if state is not None:
            r.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Reads the worker's current state at scrape time."""

    def __init__(self, state: Callable[[], dict]):
        self.state = state

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        s = self.state()
        yield _gauge("engine_host_active_sessions", "Sessions open now", s["active_sessions"])
        yield _gauge("engine_host_capacity", "Sessions this worker accepts at once", s["capacity"])
        yield _gauge("engine_host_ready", "1 when the worker takes new sessions", 1 if s["status"] == "ready" else 0)
        depth = GaugeMetricFamily("engine_host_queue_depth", "Inference jobs waiting, by model and priority",
                                  labels=["model", "priority"])
        for (model, priority), n in sorted(s["queue_depth"].items()):
            depth.add_metric([model, priority], n)
        yield depth
        memory = GaugeMetricFamily("engine_host_memory_bytes", "Process RSS and GPU memory in use",
                                   labels=["kind", "device"])
        memory.add_metric(["rss", "cpu"], s["memory"].get("rss_bytes", 0))
        for i, gpu in enumerate(s["memory"].get("gpus", [])):
            memory.add_metric(["gpu", str(gpu.get("index", i))], gpu.get("used_bytes", 0))
        yield memory
        vad = s.get("vad", {})
        yield _counter("engine_host_vad_cpu_seconds", "CPU time the VAD threads spent on speech probabilities",
                       vad.get("cpu_seconds", 0.0))
        yield _counter("engine_host_vad_windows", "VAD windows computed", vad.get("windows", 0))
        turn = s.get("turn", {})
        yield _counter("engine_host_turn_cpu_seconds", "CPU time the turn detector spent on end-of-turn checks",
                       turn.get("cpu_seconds", 0.0))
        yield _counter("engine_host_turn_checks", "End-of-turn checks the turn detector answered",
                       turn.get("checks", 0))
        yield _counter("engine_host_turn_shed", "End-of-turn checks not asked because too many were waiting "
                       "(the pause then ends by the silence timer)", turn.get("shed", 0))
        seconds = CounterMetricFamily("engine_host_inference_seconds",
                                      "Time inference threads spent running jobs, by model and kind",
                                      labels=["model", "kind"])
        jobs = CounterMetricFamily("engine_host_inference_jobs", "Inference jobs by model, kind and outcome: "
                                   "completed, skipped (stale when their turn came), withdrawn (cancelled "
                                   "before a thread took them)", labels=["model", "kind", "outcome"])
        batched = CounterMetricFamily("engine_host_inference_batched_jobs", "Completed jobs that ran together with "
                                      "others in one transcribe_many call, by model and kind", labels=["model", "kind"])
        for (model, kind), usage in sorted(s.get("inference", {}).items()):
            seconds.add_metric([model, kind], usage.seconds)
            for outcome in ("completed", "skipped", "withdrawn"):
                jobs.add_metric([model, kind, outcome], getattr(usage, outcome))
            batched.add_metric([model, kind], usage.batched)
        yield seconds
        yield jobs
        yield batched


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c
