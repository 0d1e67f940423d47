"""Counters, recent swaps and listeners of the GPU scheduler (what metrics and the request log read)."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("imageworks_proxy.orchestrator")


class SwapLog:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {
            "swaps": 0,
            "swap_failures": 0,
            "starts": 0,
            "stops": 0,
            "admitted": 0,
            "queued": 0,
            "rejected_queue_full": 0,
            "cancelled_waits": 0,
            "lost": 0,
        }
        #: The last 50 switches: from, to, ok, drain_s, stop_s, start_s, total_s (and error when not ok).
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        #: Called with a dict for every switch, start failure and stop (observability hooks in here).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def emit(self, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("scheduler listener failed")

    def swap(self, record: dict[str, Any]) -> None:
        """A finished switch attempt (``record["ok"]`` says whether it succeeded)."""
        self.recent.append(record)
        self.emit({"event": "swap", **record})

    def snapshot(self) -> dict[str, Any]:
        durations = [s["total_s"] for s in self.recent if s.get("ok")]
        return {
            **self.counters,
            "swap_seconds_total": round(sum(durations), 3),
            "recent_swaps": list(self.recent),
        }
