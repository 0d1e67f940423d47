"""Model switches as the metrics see them, fed by the GPU scheduler's listener hook.

The scheduler (:mod:`imageworks_proxy.gpu.scheduler`) calls its listeners with one event per finished
switch attempt (``{"event": "swap", "ok": bool, "kind": "cold"|"wake"|"switch", "total_s": float,
"proxy_s": float, ...}``; the fields: :mod:`imageworks_proxy.gpu.swaplog`). :class:`SwapMetrics` is such a
listener: it counts switches and failed ones, split by kind (a cold start, a wake-up of a sleeping vLLM,
or a switch to a tenant that needs no start), keeps recent durations and the proxy's own share of each for
``/v1/metrics``, and hands every successful switch to its ``observers`` (the Prometheus histograms). It
never asks a plugin for figures.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

#: Switch durations kept for the percentiles of ``/v1/metrics``.
RECENT = 200
PERCENTILES = (50, 95, 99)


def _summary(values: collections.deque[float]) -> dict[str, Any] | None:
    """``{p50, p95, p99, last, samples}`` of ``values``, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    return {
        **{f"p{q}": round(ordered[max(math.ceil(q / 100 * n), 1) - 1], 3) for q in PERCENTILES},
        "last": round(values[-1], 3),
        "samples": n,
    }


class _Kind:
    """The switches of one kind: how many, and recent durations and proxy shares."""

    def __init__(self) -> None:
        self.count = 0
        self.durations_s: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.proxy_s: collections.deque[float] = collections.deque(maxlen=RECENT)


class SwapMetrics:
    """Counters of model switches; :meth:`on_event` is registered as a scheduler listener."""

    def __init__(self) -> None:
        self.swaps = 0
        self.failures = 0
        self.durations_s: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.kinds: dict[str, _Kind] = {}
        #: Called with the event of every successful switch (``total_s``, ``kind``, ``proxy_s``).
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "swap":
            return
        if not event.get("ok"):
            self.failures += 1
            return
        self.swaps += 1
        kind = self.kinds.setdefault(str(event.get("kind") or "cold"), _Kind())
        kind.count += 1
        total = event.get("total_s")
        if isinstance(total, (int, float)):
            self.durations_s.append(float(total))
            kind.durations_s.append(float(total))
        proxy = event.get("proxy_s")
        if isinstance(proxy, (int, float)):
            kind.proxy_s.append(float(proxy))
        for observe in self.observers:
            observe(event)

    def summary(self) -> dict[str, Any]:
        """``{"count", "failures", "duration_s": {p50, p95, p99, last, samples} | None, "by_kind": {kind:
        {"count", "duration_s", "proxy_s"}}}``; ``proxy_s`` is the proxy's own share of each switch."""
        return {
            "count": self.swaps,
            "failures": self.failures,
            "duration_s": _summary(self.durations_s),
            "by_kind": {
                name: {
                    "count": k.count, "duration_s": _summary(k.durations_s), "proxy_s": _summary(k.proxy_s)
                }
                for name, k in sorted(self.kinds.items())
            },
        }
