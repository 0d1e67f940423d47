"""Rolling-window metrics: percentiles, grouping, expiry, tokens/s, model switches."""

from __future__ import annotations

import random

import pytest

from imageworks_proxy.observability.metrics import RollingMetrics, Sample
from imageworks_proxy.observability.swaps import SwapMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(ms: float = 100.0, *, model: str | None = "m", backend: str | None = "b", status: int = 200,
           code: str | None = None, ttft: float | None = None, queue: float = 0.0,
           prompt: int | None = None, completion: int | None = None) -> Sample:
    return Sample(model, backend, status, code, ms, ttft, queue, prompt, completion)


def test_percentiles_are_nearest_rank_over_the_window():
    clock = Clock()
    m = RollingMetrics(300, clock=clock)
    values = list(range(1, 101))
    random.Random(7).shuffle(values)
    for v in values:
        m.record(sample(float(v), ttft=float(v) / 10))
        clock.now += 0.5  # spread over 50 s: many slots
    snap = m.snapshot()
    assert snap["overall"]["latency_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert snap["overall"]["ttft_ms"] == {"p50": 5.0, "p95": 9.5, "p99": 9.9}
    assert snap["overall"]["requests"] == 100


def test_percentiles_of_small_and_empty_sets():
    clock = Clock()
    m = RollingMetrics(60, clock=clock)
    assert m.snapshot()["overall"]["latency_ms"] is None
    m.record(sample(42.0))
    assert m.snapshot()["overall"]["latency_ms"] == {"p50": 42.0, "p95": 42.0, "p99": 42.0}
    m.record(sample(10.0))
    assert m.snapshot()["overall"]["latency_ms"] == {"p50": 10.0, "p95": 42.0, "p99": 42.0}


def test_groups_by_model_and_backend_and_counts_errors_by_code():
    m = RollingMetrics(300, clock=Clock())
    m.record(sample(10, model="llama", backend="ollama"))
    m.record(sample(20, model="llama", backend="ollama"))
    m.record(sample(30, model="qwen", backend="vllm-orchestrated"))
    m.record(sample(5, model="qwen", backend="vllm-orchestrated", status=504, code="backend_timeout"))
    m.record(sample(1, model=None, backend=None, status=404, code="model_not_found"))
    m.record(sample(7, model="llama", backend="ollama", status=200, code="stream_idle_timeout"))  # in-band
    snap = m.snapshot()
    overall = snap["overall"]
    assert overall["requests"] == 6 and overall["errors"] == 3
    assert overall["errors_by_code"] == {"backend_timeout": 1, "model_not_found": 1, "stream_idle_timeout": 1}
    # latency percentiles cover successful requests only
    assert overall["latency_ms"] == {"p50": 20.0, "p95": 30.0, "p99": 30.0}
    assert set(snap["by_model"]) == {"llama", "qwen"}  # the unresolved request is only counted overall
    assert snap["by_model"]["llama"]["requests"] == 3 and snap["by_model"]["llama"]["errors"] == 1
    assert snap["by_model"]["qwen"]["errors_by_code"] == {"backend_timeout": 1}
    assert snap["by_backend"]["ollama"]["latency_ms"] == {"p50": 10.0, "p95": 20.0, "p99": 20.0}
    assert snap["by_backend"]["vllm-orchestrated"]["requests"] == 2


def test_old_requests_leave_the_window():
    clock = Clock()
    m = RollingMetrics(60, clock=clock)
    m.record(sample(1000))
    clock.now += 30
    m.record(sample(10))
    assert m.snapshot()["overall"]["requests"] == 2
    clock.now += 31  # the first request is now 61 s old
    snap = m.snapshot()
    assert snap["overall"]["requests"] == 1
    assert snap["overall"]["latency_ms"] == {"p50": 10.0, "p95": 10.0, "p99": 10.0}
    clock.now += 60
    snap = m.snapshot()
    assert snap["overall"]["requests"] == 0 and snap["by_model"] == {}
    assert snap["total_requests"] == 2


def test_tokens_per_second_uses_backend_time_without_the_switch_wait():
    m = RollingMetrics(300, clock=Clock())
    m.record(sample(2000, queue=1000, prompt=50, completion=100))  # 100 tokens in 1 s of backend time
    m.record(sample(1000, prompt=10, completion=100))  # 100 tokens in 1 s
    m.record(sample(500, status=502, code="backend_error", completion=999))  # failed: not a speed sample
    overall = m.snapshot()["overall"]
    assert overall["tokens_per_s"] == 100.0
    assert overall["prompt_tokens"] == 60
    assert overall["completion_tokens"] == 1199


def test_a_busy_window_keeps_bounded_samples_and_approximate_percentiles():
    clock = Clock()
    m = RollingMetrics(60, max_samples=50, clock=clock, seed=1)
    for i in range(20_000):
        m.record(sample(float(i % 1000)))
        if i % 1000 == 999:
            clock.now += 1
    assert all(len(slot.latency) <= 50 for slot in m._slots)
    lat = m.snapshot()["overall"]["latency_ms"]
    assert lat["p50"] == pytest.approx(500, abs=100)
    assert lat["p95"] == pytest.approx(950, abs=60)


def test_in_flight_is_reported():
    m = RollingMetrics(60, clock=Clock())
    m.in_flight = 3
    assert m.snapshot()["in_flight"] == 3


def test_swap_metrics_count_switches_and_failures_from_scheduler_events():
    swaps = SwapMetrics()
    seen: list[dict] = []
    swaps.observers.append(seen.append)
    assert swaps.summary() == {"count": 0, "failures": 0, "duration_s": None, "by_kind": {}}
    for total in (1.0, 3.0, 2.0):
        swaps.on_event({"event": "swap", "from": None, "to": "vllm:a", "ok": True, "total_s": total})
    swaps.on_event(
        {"event": "swap", "to": "vllm:b", "ok": False, "error": "model_start_failed", "total_s": 4.0}
    )
    swaps.on_event({"event": "vacate", "from": "vllm:a", "to": None, "stop_s": 0.5})
    assert swaps.summary() == {
        "count": 3,
        "failures": 1,
        "duration_s": {"p50": 2.0, "p95": 3.0, "p99": 3.0, "last": 2.0, "samples": 3},
        "by_kind": {
            "cold": {
                "count": 3,
                "duration_s": {"p50": 2.0, "p95": 3.0, "p99": 3.0, "last": 2.0, "samples": 3},
                "proxy_s": None,
            }
        },
    }
    assert [e["total_s"] for e in seen] == [1.0, 3.0, 2.0]  # failed switches are counted, not timed


def test_swap_metrics_split_cold_starts_from_wake_ups_with_the_proxys_share():
    swaps = SwapMetrics()
    for kind, total, proxy in (("cold", 31.0, 0.04), ("wake", 0.6, 0.03), ("wake", 0.8, 0.05)):
        swaps.on_event({"event": "swap", "ok": True, "kind": kind, "total_s": total, "proxy_s": proxy})
    by_kind = swaps.summary()["by_kind"]
    assert by_kind["cold"]["count"] == 1 and by_kind["wake"]["count"] == 2
    assert by_kind["wake"]["duration_s"]["p50"] == 0.6 and by_kind["wake"]["duration_s"]["last"] == 0.8
    assert by_kind["wake"]["proxy_s"] == {"p50": 0.03, "p95": 0.05, "p99": 0.05, "last": 0.05, "samples": 2}
    assert by_kind["cold"]["proxy_s"]["last"] == 0.04
