"""Model switches as the metrics see them, fed by the GPU scheduler's listener hook.

The scheduler (:mod:`imageworks_proxy.gpu.scheduler`) calls its listeners with one event per finished
switch attempt (``{"event": "swap", "ok": bool, "total_s": float, ...}``). :class:`SwapMetrics` is such a
listener: it counts switches and failed ones and keeps recent durations for ``/v1/metrics``, and hands
each duration to its ``observers`` (the Prometheus histogram). It never asks a plugin for figures.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

#: Switch durations kept for the percentiles of ``/v1/metrics``.
RECENT = 200
PERCENTILES = (50, 95, 99)


class SwapMetrics:
    """Counters of model switches; :meth:`on_event` is registered as a scheduler listener."""

    def __init__(self) -> None:
        self.swaps = 0
        self.failures = 0
        self.durations_s: collections.deque[float] = collections.deque(maxlen=RECENT)
        #: Called with the duration of every successful switch, in seconds.
        self.observers: list[Callable[[float], None]] = []

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "swap":
            return
        if not event.get("ok"):
            self.failures += 1
            return
        self.swaps += 1
        total = event.get("total_s")
        if isinstance(total, (int, float)):
            self.durations_s.append(float(total))
            for observe in self.observers:
                observe(float(total))

    def summary(self) -> dict[str, Any]:
        """``{"count", "failures", "duration_s": {p50, p95, p99, last, samples} | None}``."""
        out: dict[str, Any] = {"count": self.swaps, "failures": self.failures, "duration_s": None}
        if self.durations_s:
            ordered = sorted(self.durations_s)
            n = len(ordered)
            out["duration_s"] = {
                **{f"p{q}": round(ordered[max(math.ceil(q / 100 * n), 1) - 1], 3) for q in PERCENTILES},
                "last": round(self.durations_s[-1], 3),
                "samples": n,
            }
        return out
