"""Counters, recent swaps and listeners of the GPU scheduler (what metrics and the request log read).

A swap record says how a switch went: ``from``, ``to``, ``ok``, ``kind`` (``cold``: the tenant was
started; ``wake``: a sleeping vLLM was woken; ``switch``: the tenant needed no start, e.g. Ollama loads its
model with the first request), ``slept`` (the tenants put to sleep rather than stopped), the phases
``drain_s``, ``stop_s``, ``start_s`` and ``total_s``, ``engine_s`` (the time spent waiting for the servers
themselves: their exit, sleep, wake-up or start-up, as their tenants report it; a step that reports nothing
counts whole) and ``proxy_s`` (``total_s - drain_s - engine_s``: the proxy's own share of the switch).
"""

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
        #: The last 50 switches: from, to, ok, kind, drain_s, stop_s, start_s, total_s, engine_s, proxy_s
        #: (and error when not ok).
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        #: Called with a dict for every switch, start failure and stop (observability hooks in here).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def emit(self, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("scheduler listener failed")

    @staticmethod
    def step(record: dict[str, Any], key: str, seconds: float, info: object, *, start: bool = False) -> None:
        """Note one stop (or, with ``start``, the start) of a switch in ``record``: ``info`` is what the
        tenant's ``stop``/``start`` returned (``{"engine_s", "kind", "evicted"}``, or None)."""
        facts = info if isinstance(info, dict) else {}
        engine = facts.get("engine_s")
        engine = seconds if not isinstance(engine, (int, float)) else min(float(engine), seconds)
        record["engine_s"] = record.get("engine_s", 0.0) + engine
        if start:
            record["kind"] = facts.get("kind") or "cold"
        elif facts.get("evicted") == "sleep":
            record.setdefault("slept", []).append(key)

    def swap(self, record: dict[str, Any]) -> None:
        """A finished switch attempt (``record["ok"]`` says whether it succeeded)."""
        engine = record.get("engine_s", 0.0)
        record["engine_s"] = round(engine, 3)
        if record.get("ok"):
            record["proxy_s"] = round(max(0.0, record["total_s"] - record.get("drain_s", 0.0) - engine), 3)
        self.recent.append(record)
        self.emit({"event": "swap", **record})

    def snapshot(self) -> dict[str, Any]:
        durations = [s["total_s"] for s in self.recent if s.get("ok")]
        return {
            **self.counters,
            "swap_seconds_total": round(sum(durations), 3),
            "recent_swaps": list(self.recent),
        }
