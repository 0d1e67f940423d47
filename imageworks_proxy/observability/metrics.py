"""Rolling request metrics for ``GET /v1/metrics``.

The window (``CHAT_PROXY_METRICS_WINDOW_S``) is cut into :data:`SLOTS` time slots. Each slot keeps,
overall and per model (logical name) and per backend (the adapter that served the request): request and
error counts, errors by code, token sums and the latency and TTFT samples. A snapshot merges the slots
still inside the window, so old traffic ages out slot by slot and memory stays bounded. Percentiles are
nearest-rank over the samples; each slot keeps at most ``max_samples`` requests (a uniform reservoir
sample beyond that, weighted back when slots are merged), so they are exact up to that rate
(1024 per slot: about 200 requests/s with the default 300 s window).
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

#: Time slots per window.
SLOTS = 60
PERCENTILES = (50, 95, 99)


NAN = float("nan")


class _Counts:
    """Counters of one group (overall, one model or one backend) in one slot."""

    __slots__ = ("by_code", "completion_tokens", "errors", "gen_s", "gen_tokens", "prompt_tokens", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.by_code: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.gen_tokens = 0
        self.gen_s = 0.0


class _Slot:
    """One time slot: counters per group, and a reservoir of at most ``cap`` request samples
    (latency, TTFT, model id, backend id in parallel arrays; NaN/-1 where a value is absent)."""

    __slots__ = ("backend", "by_backend", "by_model", "index", "latency", "model", "overall", "seen", "ttft")

    def __init__(self, index: int) -> None:
        self.index = index
        self.overall = _Counts()
        self.by_model: dict[str, _Counts] = {}
        self.by_backend: dict[str, _Counts] = {}
        self.latency = array("d")
        self.ttft = array("d")
        self.model = array("i")
        self.backend = array("i")
        self.seen = 0


class Sample(NamedTuple):
    """One finished chat request, as the metrics see it (a named tuple: one is made per request)."""

    model: str | None  # logical name; None when the request never resolved a model
    backend: str | None  # adapter name
    status: int
    error_code: str | None
    duration_ms: float
    ttft_ms: float | None
    queue_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None

    @property
    def failed(self) -> bool:
        return self.status >= 400 or self.error_code is not None


class _Values:
    """Sample values of one series of one group, gathered from the slots for a percentile."""

    __slots__ = ("plain", "weighted")

    def __init__(self) -> None:
        self.plain: list[float] = []
        self.weighted: list[tuple[float, float]] = []

    def add(self, value: float, weight: float) -> None:
        if weight == 1.0:
            self.plain.append(value)
        else:
            self.weighted.append((value, weight))


def percentiles(values: _Values | None, qs: tuple[int, ...] = PERCENTILES) -> dict[str, float] | None:
    """Nearest-rank percentiles (``p50`` = the smallest value with at least 50 % of samples at or below it).

    Samples from slots whose reservoir overflowed carry a weight (requests seen / samples kept).
    """
    if values is None or not (values.plain or values.weighted):
        return None
    if not values.weighted:
        plain = sorted(values.plain)
        n = len(plain)
        return {f"p{q}": round(plain[max(math.ceil(q / 100 * n), 1) - 1], 1) for q in qs}
    weighted = sorted(values.weighted + [(v, 1.0) for v in values.plain])
    total = sum(w for _, w in weighted)
    out: dict[str, float] = {}
    for q in qs:
        target, acc, chosen = q / 100 * total, 0.0, weighted[-1][0]
        for value, w in weighted:
            acc += w
            if acc >= target - 1e-9:
                chosen = value
                break
        out[f"p{q}"] = round(chosen, 1)
    return out


class RollingMetrics:
    """Per-app rolling window of request metrics, plus the live in-flight count.

    ``record`` is called once per finished chat request (from the observability stage) and costs a few
    microseconds; ``snapshot`` builds the JSON for ``/v1/metrics``. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        window_s: float,
        *,
        max_samples: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self.window_s = float(window_s)
        self.slot_s = self.window_s / SLOTS
        self.max_samples = max_samples
        self.clock = clock
        self.started = clock()
        self.in_flight = 0
        self.total_requests = 0
        self._slots: deque[_Slot] = deque()
        self._random = random.Random(seed).random
        # model and backend names -> small ints for the sample arrays (bounded by the registry)
        self._ids: dict[str, int] = {}
        self._names: list[str] = []

    def _id(self, name: str | None) -> int:
        if name is None:
            return -1
        i = self._ids.get(name)
        if i is None:
            i = self._ids[name] = len(self._names)
            self._names.append(name)
        return i

    def _slot(self, now: float) -> _Slot:
        index = int(now // self.slot_s)
        slots = self._slots
        if not slots or slots[-1].index != index:
            slots.append(_Slot(index))
            self._prune(index)
        return slots[-1]

    def _prune(self, index: int) -> None:
        oldest = index - SLOTS + 1
        slots = self._slots
        while slots and slots[0].index < oldest:
            slots.popleft()

    def record(self, sample: Sample) -> None:
        slot = self._slot(self.clock())
        self.total_requests += 1
        failed = sample.failed
        groups = [slot.overall]
        if sample.model is not None:
            counts = slot.by_model.get(sample.model)
            if counts is None:
                counts = slot.by_model[sample.model] = _Counts()
            groups.append(counts)
        if sample.backend is not None:
            counts = slot.by_backend.get(sample.backend)
            if counts is None:
                counts = slot.by_backend[sample.backend] = _Counts()
            groups.append(counts)
        code = (sample.error_code or f"http_{sample.status}")[:64] if failed else None
        prompt, completion = sample.prompt_tokens or 0, sample.completion_tokens or 0
        # Backend time spent producing the reply: everything but the wait for a model switch.
        gen_s = max(sample.duration_ms - sample.queue_ms, 0.0) / 1000 if completion and not failed else 0.0
        for counts in groups:
            counts.requests += 1
            if code is not None:
                counts.errors += 1
                counts.by_code[code] = counts.by_code.get(code, 0) + 1
            counts.prompt_tokens += prompt
            counts.completion_tokens += completion
            if gen_s > 0:
                counts.gen_tokens += completion
                counts.gen_s += gen_s
        latency = NAN if failed else sample.duration_ms
        ttft = NAN if sample.ttft_ms is None else sample.ttft_ms
        slot.seen += 1
        if len(slot.latency) < self.max_samples:
            slot.latency.append(latency)
            slot.ttft.append(ttft)
            slot.model.append(self._id(sample.model))
            slot.backend.append(self._id(sample.backend))
        else:  # uniform reservoir: each request of the slot is kept with the same probability
            j = int(self._random() * slot.seen)
            if j < self.max_samples:
                slot.latency[j] = latency
                slot.ttft[j] = ttft
                slot.model[j] = self._id(sample.model)
                slot.backend[j] = self._id(sample.backend)

    def _live_slots(self) -> list[_Slot]:
        now_index = int(self.clock() // self.slot_s)
        self._prune(now_index)
        return list(self._slots)

    @staticmethod
    def _summary(
        counts: list[_Counts], latency: _Values | None, ttft: _Values | None, seconds: float
    ) -> dict[str, Any]:
        requests = sum(c.requests for c in counts)
        by_code: dict[str, int] = {}
        for c in counts:
            for code, n in c.by_code.items():
                by_code[code] = by_code.get(code, 0) + n
        gen_s = sum(c.gen_s for c in counts)
        gen_tokens = sum(c.gen_tokens for c in counts)
        return {
            "requests": requests,
            "requests_per_s": round(requests / seconds, 3) if seconds > 0 else None,
            "errors": sum(c.errors for c in counts),
            "errors_by_code": dict(sorted(by_code.items())),
            "latency_ms": percentiles(latency),
            "ttft_ms": percentiles(ttft),
            "prompt_tokens": sum(c.prompt_tokens for c in counts),
            "completion_tokens": sum(c.completion_tokens for c in counts),
            "tokens_per_s": round(gen_tokens / gen_s, 2) if gen_s > 0 else None,
        }

    def snapshot(self) -> dict[str, Any]:
        """The window's figures: overall, ``by_model`` and ``by_backend``, and the in-flight count."""
        slots = self._live_slots()
        seconds = min(self.window_s, self.clock() - self.started)
        names = self._names
        # Distribute each slot's samples to overall / its model / its backend, once.
        lat: dict[tuple[str, str], _Values] = {}
        ttft: dict[tuple[str, str], _Values] = {}
        for slot in slots:
            if not slot.latency:
                continue
            weight = slot.seen / len(slot.latency)
            for value, first, m, b in zip(slot.latency, slot.ttft, slot.model, slot.backend, strict=True):
                keys = [("", "")]
                if m >= 0:
                    keys.append(("m", names[m]))
                if b >= 0:
                    keys.append(("b", names[b]))
                for key in keys:
                    if value == value:  # not NaN
                        (lat.get(key) or lat.setdefault(key, _Values())).add(value, weight)
                    if first == first:
                        (ttft.get(key) or ttft.setdefault(key, _Values())).add(first, weight)

        def grouped(kind: str, attr: str) -> dict[str, Any]:
            counts: dict[str, list[_Counts]] = {}
            for slot in slots:
                for name, c in getattr(slot, attr).items():
                    counts.setdefault(name, []).append(c)
            return {name: self._summary(counts[name], lat.get((kind, name)), ttft.get((kind, name)), seconds)
                    for name in sorted(counts)}

        return {
            "window_s": self.window_s,
            "in_flight": self.in_flight,
            "total_requests": self.total_requests,
            "overall": self._summary([s.overall for s in slots], lat.get(("", "")), ttft.get(("", "")),
                                     seconds),
            "by_model": grouped("m", "by_model"),
            "by_backend": grouped("b", "by_backend"),
        }

    def series(self) -> dict[str, Any]:
        """The window slot by slot, oldest first, for charts: ``{"slot_s", "points": [...]}``, one point per
        slot (empty slots included) with ``age_s`` (seconds from the slot's end to now), ``requests_per_s``
        (``None`` for a slot that ended before the proxy started), ``errors``, ``latency_ms`` (percentiles
        of the slot's successful requests, ``None`` without any) and ``tokens_per_s`` (as in
        :meth:`snapshot`; ``None`` without a completed generation)."""
        now = self.clock()
        now_index = int(now // self.slot_s)
        by_index = {slot.index: slot for slot in self._live_slots()}
        points = []
        for index in range(now_index - SLOTS + 1, now_index + 1):
            slot = by_index.get(index)
            end = min((index + 1) * self.slot_s, now)
            # the current slot has only been filling for part of its length
            seconds = max(end - index * self.slot_s, min(1.0, self.slot_s))
            point: dict[str, Any] = {
                "age_s": round(now - end, 3),
                # before the proxy started there is nothing to count, not zero requests
                "requests_per_s": 0.0 if end > self.started else None,
                "errors": 0,
                "latency_ms": None,
                "tokens_per_s": None,
            }
            if slot is not None:
                counts = slot.overall
                latency = _Values()
                for value in slot.latency:
                    if value == value:  # not NaN
                        latency.add(value, 1.0)
                point.update(
                    requests_per_s=round(counts.requests / seconds, 3),
                    errors=counts.errors,
                    latency_ms=percentiles(latency),
                    tokens_per_s=round(counts.gen_tokens / counts.gen_s, 2) if counts.gen_s > 0 else None,
                )
            points.append(point)
        return {"slot_s": self.slot_s, "points": points}
