"""Prometheus metrics, on a registry owned by one app (several apps in one process never clash)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "steer_requests", "HTTP requests to the API, by route and status code.", ["route", "status"],
            registry=self.registry,
        )
        self.tokens = Counter("steer_generated_tokens", "Completion tokens generated.", registry=self.registry)
        self.ttft = Histogram(
            "steer_time_to_first_token_seconds", "Time from accepting a request to its first content.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.latency = Histogram(
            "steer_request_latency_seconds", "Time from accepting a chat completion to its last byte.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge("steer_queue_depth", "Rows waiting for a batch slot.", registry=self.registry)
        self.active = Gauge("steer_active_rows", "Rows decoding in the running batch.", registry=self.registry)
        self.cancelled = Gauge(
            "steer_cancelled_rows", "Rows cancelled because their client went away (since start).",
            registry=self.registry,
        )

    def bind_engine(self, stats: Callable) -> None:
        """Read queue depth, batch size, cancellations and decode steps from the engine at scrape time."""
        self.queue_depth.set_function(lambda: stats().waiting)
        self.active.set_function(lambda: stats().active)
        self.cancelled.set_function(lambda: stats().cancelled_total)
        self.registry.register(_EngineSteps(stats))
        # How much prompt work the cache saves: copied / (fed + copied) is its hit rate.
        self.registry.register(_Value("steer_prompt_tokens_fed", "Prompt tokens fed to the model (prefilled).",
                                      lambda: stats().prompt_tokens_fed))
        self.registry.register(_Value("steer_prompt_tokens_copied",
                                      "Prompt tokens copied from cached keys and values instead of being fed "
                                      "(a shared start with a running request, or an ended one's left in its slot).",
                                      lambda: stats().prompt_tokens_copied))

    def bind_restarts(self, restarts: Callable[[], int]) -> None:
        """``steer_engine_restarts_total``: times the engine was restarted after a crash."""
        self.registry.register(_Value("steer_engine_restarts", "Engine restarts after a crash (since start).",
                                      restarts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineSteps:
    """``steer_decode_steps_total``: forward passes of the running batch. Generated tokens over
    steps is the mean number of rows each step served, i.e. how well batching is working."""

    def __init__(self, stats: Callable) -> None:
        self._stats = stats

    def collect(self):
        yield CounterMetricFamily("steer_decode_steps", "Batched decode steps run by the engine.",
                                  value=self._stats().steps_total)


class _Value:
    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())
