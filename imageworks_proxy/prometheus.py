"""Prometheus metrics for ``GET /metrics`` (SPEC §10), on a per-app ``CollectorRegistry``.

Request counters and histograms are updated as requests finish; gauges that describe the present (in
flight, switch queue, active model, GPU memory, request-log counters, model swaps) are read when the
endpoint is scraped. Labels are bounded: ``model`` is a registry logical name (empty when the request
named no known model), ``backend`` the adapter name, ``status_class`` ``2xx``/``4xx``/``5xx``, ``code``
one of the proxy's error codes (anything else is ``other``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from imageworks_proxy.metrics import SwapStats

if TYPE_CHECKING:
    from imageworks_proxy.metrics import RollingMetrics, Sample
    from imageworks_proxy.requestlog import RequestLog

NS = "imageworks_proxy"

#: Error codes kept as label values (SPEC §9 plus the proxy's own); others count as ``other``.
KNOWN_CODES = frozenset({
    "invalid_request", "invalid_image", "invalid_api_key", "model_not_found", "capability_mismatch",
    "template_required", "payload_too_large", "queue_full", "backend_rejected", "backend_error",
    "backend_unavailable", "model_start_failed", "model_start_timeout", "backend_timeout",
    "stream_idle_timeout", "client_disconnected", "internal_error", "not_implemented", "rate_limit_exceeded",
    "context_length_exceeded",
})

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SWAP_BUCKETS = (1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class _Present:
    """A collector for the gauges that describe the moment of the scrape."""

    def __init__(self, prom: PromMetrics) -> None:
        self.prom = prom

    def describe(self) -> list[Metric]:
        return []  # dynamic: nothing to check for clashes at registration

    def collect(self) -> Iterator[Metric]:
        prom = self.prom
        state = prom.read_state()
        yield GaugeMetricFamily(f"{NS}_in_flight_requests", "Chat requests being served now",
                                value=prom.rolling.in_flight)
        stats: SwapStats = state.get("swaps") or SwapStats()
        if stats.queue_depth is not None:
            yield GaugeMetricFamily(f"{NS}_switch_queue_depth", "Requests waiting for a model switch",
                                    value=stats.queue_depth)
        if stats.swaps is not None:
            yield CounterMetricFamily(f"{NS}_model_swaps", "vLLM model starts and switches", value=stats.swaps)
        if stats.failures is not None:
            yield CounterMetricFamily(f"{NS}_model_swap_failures", "vLLM model starts that failed",
                                      value=stats.failures)
        active = GaugeMetricFamily(f"{NS}_active_model", "1 for the vLLM model the orchestrator serves now",
                                   labels=["model"])
        if state.get("active_model"):
            active.add_metric([str(state["active_model"])], 1)
        yield active
        used = GaugeMetricFamily(f"{NS}_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu", "name"])
        total = GaugeMetricFamily(f"{NS}_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["gpu", "name"])
        for dev in state.get("gpu") or ():
            labels = [str(dev.get("index")), str(dev.get("name"))]
            used.add_metric(labels, dev.get("memory_used_bytes", 0))
            total.add_metric(labels, dev.get("memory_total_bytes", 0))
        yield used
        yield total
        rlog = prom.request_log
        yield CounterMetricFamily(f"{NS}_request_log_records", "Request log records written", value=rlog.written)
        yield CounterMetricFamily(f"{NS}_request_log_dropped", "Request log records dropped (writer queue full)",
                                  value=rlog.dropped)
        yield CounterMetricFamily(f"{NS}_request_log_write_errors", "Request log records lost to write errors",
                                  value=rlog.write_errors)
        yield GaugeMetricFamily(f"{NS}_uptime_seconds", "Seconds since the app started",
                                value=prom.rolling.clock() - prom.rolling.started)


class PromMetrics:
    """The app's Prometheus registry and instruments.

    ``read_state`` is a no-argument callable returning ``{"swaps": SwapStats, "active_model": str | None,
    "gpu": [device dicts]}``; it is called once per scrape.
    """

    def __init__(self, rolling: RollingMetrics, request_log: RequestLog, read_state: Callable[[], dict[str, Any]]) -> None:
        self.rolling = rolling
        self.request_log = request_log
        self.read_state = self._tracking_swaps(read_state)
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(f"{NS}_requests", "Chat requests by outcome",
                                ["model", "backend", "status_class"], registry=r)
        self.errors = Counter(f"{NS}_request_errors", "Failed chat requests by error code",
                              ["model", "backend", "code"], registry=r)
        self.duration = Histogram(f"{NS}_request_duration_seconds", "Chat request duration (successful requests)",
                                  ["model", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{NS}_time_to_first_token_seconds", "Time until the first content byte was sent",
                              ["model", "backend"], buckets=TTFT_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{NS}_queue_wait_seconds", "Time spent waiting for a model switch or start",
                                    ["model", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(f"{NS}_tokens", "Tokens processed (prompt) and generated (completion)",
                              ["model", "backend", "kind"], registry=r)
        self.swap_duration = Histogram(f"{NS}_model_swap_duration_seconds", "vLLM model start/switch duration",
                                       buckets=SWAP_BUCKETS, registry=r)
        r.register(_Present(self))
        # label children per (model, backend): the label lookup is the costly part of an update
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._swaps_seen: int | None = None

    def _tracking_swaps(self, read_state: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        def read() -> dict[str, Any]:
            state = read_state()
            stats = state.get("swaps")
            if isinstance(stats, SwapStats):
                self.observe_new_swaps(stats)
            return state
        return read

    def observe_new_swaps(self, stats: SwapStats) -> None:
        """Feed the swap histogram with the durations of swaps not seen at the previous read."""
        if stats.swaps is None:
            return
        seen = self._swaps_seen
        self._swaps_seen = stats.swaps
        if seen is None:
            new = stats.swaps  # first read: whatever history the orchestrator still has
        else:
            new = stats.swaps - seen
        if new <= 0 or not stats.durations_s:
            return
        for d in stats.durations_s[-min(new, len(stats.durations_s)):]:
            self.swap_duration.observe(d)

    def _labelled(self, model: str, backend: str) -> tuple[Any, ...]:
        key = (model, backend)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                {},  # status class -> requests counter child
                self.duration.labels(model, backend),
                self.ttft.labels(model, backend),
                self.queue_wait.labels(model, backend),
                self.tokens.labels(model, backend, "prompt"),
                self.tokens.labels(model, backend, "completion"),
            )
        return children

    def record(self, sample: Sample) -> None:
        model, backend = sample.model or "", sample.backend or ""
        by_class, duration, ttft, queue_wait, prompt, completion = self._labelled(model, backend)
        cls = status_class(sample.status)
        counter = by_class.get(cls)
        if counter is None:
            counter = by_class[cls] = self.requests.labels(model, backend, cls)
        counter.inc()
        if sample.failed:
            code = sample.error_code if sample.error_code in KNOWN_CODES else "other"
            self.errors.labels(model, backend, code).inc()
        else:
            duration.observe(sample.duration_ms / 1000)
        if sample.ttft_ms is not None:
            ttft.observe(sample.ttft_ms / 1000)
        if sample.queue_ms:
            queue_wait.observe(sample.queue_ms / 1000)
        if sample.prompt_tokens:
            prompt.inc(sample.prompt_tokens)
        if sample.completion_tokens:
            completion.inc(sample.completion_tokens)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for (Prometheus text by default); (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
