"""Prometheus metrics for ``GET /metrics`` on a per-app ``CollectorRegistry`` (the metrics:
docs/observability.md).

A finished request only bumps plain counters and hand-kept histogram buckets (no locks, no label
lookups: a few microseconds); ``prometheus_client`` collectors turn them into counters and histograms,
and read the gauges that describe the present (in flight, switch queue, active model, GPU memory,
request-log counters, model swaps), when the endpoint is scraped. Labels are bounded: ``model`` is a
registry logical name (empty when the request named no known model), ``backend`` the adapter name,
``status_class`` ``2xx``/``4xx``/``5xx``, ``code`` one of the proxy's error codes (else ``other``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from imageworks_proxy.observability.metrics import RollingMetrics, Sample
    from imageworks_proxy.observability.requestlog import RequestLog
    from imageworks_proxy.observability.swaps import SwapMetrics

NS = "imageworks_proxy"

#: Error codes kept as label values (the proxy's own and those mapped from upstreams); others count as
#: ``other``, so a misbehaving upstream cannot grow the label set.
KNOWN_CODES = frozenset({
    "invalid_request", "invalid_image", "invalid_api_key", "model_not_found", "capability_mismatch",
    "template_required", "payload_too_large", "queue_full", "backend_rejected", "backend_error",
    "backend_unavailable", "model_start_failed", "model_start_timeout", "backend_timeout",
    "stream_idle_timeout", "client_disconnected", "internal_error", "not_implemented", "rate_limit_exceeded",
    "context_length_exceeded",
})

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SWAP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
#: The proxy's own share of a switch (what it adds to the servers' start, wake-up, sleep or exit).
SWAP_PROXY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)


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
        state = prom.scrape_state if prom.scrape_state is not None else prom.read_state()
        yield GaugeMetricFamily(f"{NS}_in_flight_requests", "Chat requests being served now",
                                value=prom.rolling.in_flight)
        yield GaugeMetricFamily(f"{NS}_switch_queue_depth", "Requests waiting for a model switch",
                                value=state.get("queue_depth") or 0)
        swaps = prom.swaps
        by_kind = CounterMetricFamily(
            f"{NS}_model_swaps", "Model switches on the GPU by kind: cold (started), wake (a sleeping vLLM "
            "woken), switch (no start needed)", labels=["kind"])
        for kind, stats in sorted(swaps.kinds.items()):
            by_kind.add_metric([kind], stats.count)
        yield by_kind
        yield CounterMetricFamily(f"{NS}_model_swap_failures", "Model switches that failed",
                                  value=swaps.failures)
        active = GaugeMetricFamily(f"{NS}_active_model", "1 for the model that holds the GPU now",
                                   labels=["model"])
        if state.get("active_model"):
            active.add_metric([str(state["active_model"])], 1)
        yield active
        gpu_labels = ["gpu", "name"]
        used = GaugeMetricFamily(f"{NS}_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=gpu_labels)
        total = GaugeMetricFamily(f"{NS}_gpu_memory_total_bytes", "GPU memory (NVML)", labels=gpu_labels)
        for dev in state.get("gpu") or ():
            labels = [str(dev.get("index")), str(dev.get("name"))]
            used.add_metric(labels, dev.get("memory_used_bytes", 0))
            total.add_metric(labels, dev.get("memory_total_bytes", 0))
        yield used
        yield total
        rlog = prom.request_log
        for name, doc, value in (
            ("records", "Request log records written", rlog.written),
            ("dropped", "Request log records dropped (writer queue full)", rlog.dropped),
            ("write_errors", "Request log records lost to write errors", rlog.write_errors),
        ):
            yield CounterMetricFamily(f"{NS}_request_log_{name}", doc, value=value)
        yield GaugeMetricFamily(f"{NS}_uptime_seconds", "Seconds since the app started",
                                value=prom.rolling.clock() - prom.rolling.started)


class _Histogram:
    """Cumulative bucket counts, kept by hand: an update is a bisect and two additions, no lock."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            out.append((floatToGoString(bound), acc))
        out.append(("+Inf", self.count))
        return out


class _Series:
    """Everything counted for one (model, backend) label pair since the app started."""

    __slots__ = (
        "by_class",
        "by_code",
        "completion_tokens",
        "duration",
        "prompt_tokens",
        "queue_wait",
        "ttft",
    )

    def __init__(self) -> None:
        self.by_class: dict[str, int] = {}
        self.by_code: dict[str, int] = {}
        self.duration = _Histogram(LATENCY_BUCKETS)
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.queue_wait = _Histogram(LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0


class _Requests:
    """A collector for the per-request counters and histograms, built from :class:`_Series` at scrape time."""

    def __init__(self, prom: PromMetrics) -> None:
        self.prom = prom

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "backend"]
        requests = CounterMetricFamily(f"{NS}_requests", "Chat requests by outcome",
                                       labels=[*labels, "status_class"])
        errors = CounterMetricFamily(f"{NS}_request_errors", "Failed chat requests by error code",
                                     labels=[*labels, "code"])
        duration = HistogramMetricFamily(f"{NS}_request_duration_seconds",
                                         "Chat request duration (successful requests)", labels=labels)
        ttft = HistogramMetricFamily(f"{NS}_time_to_first_token_seconds",
                                     "Time until the first content byte was sent", labels=labels)
        queue_wait = HistogramMetricFamily(f"{NS}_queue_wait_seconds",
                                           "Time spent waiting for a model switch or start", labels=labels)
        tokens = CounterMetricFamily(f"{NS}_tokens", "Tokens processed (prompt) and generated (completion)",
                                     labels=[*labels, "kind"])
        for (model, backend), series in sorted(self.prom.series.items()):
            for cls, n in sorted(series.by_class.items()):
                requests.add_metric([model, backend, cls], n)
            for code, n in sorted(series.by_code.items()):
                errors.add_metric([model, backend, code], n)
            hists = ((duration, series.duration), (ttft, series.ttft), (queue_wait, series.queue_wait))
            for family, hist in hists:
                family.add_metric([model, backend], hist.buckets(), hist.sum)
            tokens.add_metric([model, backend, "prompt"], series.prompt_tokens)
            tokens.add_metric([model, backend, "completion"], series.completion_tokens)
        yield from (requests, errors, duration, ttft, queue_wait, tokens)
        swap = HistogramMetricFamily(f"{NS}_model_swap_duration_seconds", "Model switch duration",
                                     labels=["kind"])
        share = HistogramMetricFamily(f"{NS}_model_swap_proxy_seconds",
                                      "The proxy's own share of a model switch (beyond the servers' own "
                                      "start, wake-up, sleep or exit)", labels=["kind"])
        for kind, (total, proxy) in sorted(self.prom.swap_hists.items()):
            swap.add_metric([kind], total.buckets(), total.sum)
            share.add_metric([kind], proxy.buckets(), proxy.sum)
        yield swap
        yield share


class PromMetrics:
    """The app's Prometheus registry, and the cumulative figures it exposes.

    ``record`` runs once per finished chat request and only updates plain counters; the exposition is
    built by ``prometheus_client`` collectors when ``/metrics`` is scraped. ``swaps`` is the app's
    :class:`~imageworks_proxy.observability.swaps.SwapMetrics`; every switch it sees lands in the duration
    and proxy-share histograms of its kind. ``read_state`` is a no-argument callable
    returning ``{"queue_depth": int, "active_model": str | None, "gpu": [device dicts]}``, called once
    per scrape.
    """

    def __init__(
        self,
        rolling: RollingMetrics,
        request_log: RequestLog,
        swaps: SwapMetrics,
        read_state: Callable[[], dict[str, Any]],
    ) -> None:
        self.rolling = rolling
        self.request_log = request_log
        self.swaps = swaps
        self.read_state = read_state
        self.series: dict[tuple[str, str], _Series] = {}
        #: kind -> (switch duration, the proxy's share) histograms
        self.swap_hists: dict[str, tuple[_Histogram, _Histogram]] = {}
        swaps.observers.append(self._swapped)
        #: The state read at the start of the current scrape.
        self.scrape_state: dict[str, Any] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Requests(self))
        self.registry.register(_Present(self))

    def _swapped(self, event: dict[str, Any]) -> None:
        kind = str(event.get("kind") or "cold")
        hists = self.swap_hists.get(kind)
        if hists is None:
            hists = self.swap_hists[kind] = (_Histogram(SWAP_BUCKETS), _Histogram(SWAP_PROXY_BUCKETS))
        total, proxy = event.get("total_s"), event.get("proxy_s")
        if isinstance(total, (int, float)):
            hists[0].observe(float(total))
        if isinstance(proxy, (int, float)):
            hists[1].observe(float(proxy))

    def record(self, sample: Sample) -> None:
        key = (sample.model or "", sample.backend or "")
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series()
        cls = status_class(sample.status)
        series.by_class[cls] = series.by_class.get(cls, 0) + 1
        if sample.failed:
            code = sample.error_code if sample.error_code in KNOWN_CODES else "other"
            series.by_code[code] = series.by_code.get(code, 0) + 1  # type: ignore[index]
        else:
            series.duration.observe(sample.duration_ms / 1000)
        if sample.ttft_ms is not None:
            series.ttft.observe(sample.ttft_ms / 1000)
        if sample.queue_ms:
            series.queue_wait.observe(sample.queue_ms / 1000)
        if sample.prompt_tokens:
            series.prompt_tokens += sample.prompt_tokens
        if sample.completion_tokens:
            series.completion_tokens += sample.completion_tokens

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type): the registry in the format the scraper asked for (Prometheus text by
        default, OpenMetrics when its ``Accept`` header names it)."""
        encoder, content_type = choose_encoder(accept or "")
        self.scrape_state = self.read_state()
        try:
            return encoder(self.registry), content_type
        finally:
            self.scrape_state = None
