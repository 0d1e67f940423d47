"""Rolling request metrics for ``GET /v1/metrics`` (SPEC §10).

The window (``CHAT_PROXY_METRICS_WINDOW_S``) is cut into :data:`SLOTS` time slots. Each slot keeps,
overall and per model (logical name) and per backend (the adapter that served the request): request and
error counts, errors by code, token sums and the latency and TTFT samples. A snapshot merges the slots
still inside the window, so old traffic ages out slot by slot and memory stays bounded. Percentiles are
nearest-rank over the samples; each slot keeps at most ``max_samples`` per series (a uniform reservoir
sample beyond that, weighted back when slots are merged), so they are exact up to that rate.
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

#: Time slots per window.
SLOTS = 60
PERCENTILES = (50, 95, 99)


class _Series:
    """Samples of one measurement in one slot: a reservoir of at most ``cap`` values and the count seen."""

    __slots__ = ("values", "seen")

    def __init__(self) -> None:
        self.values = array("d")
        self.seen = 0

    def add(self, value: float, cap: int, rng: random.Random) -> None:
        self.seen += 1
        if len(self.values) < cap:
            self.values.append(value)
        else:
            j = rng.randrange(self.seen)
            if j < cap:
                self.values[j] = value


class _Stats:
    __slots__ = ("requests", "errors", "by_code", "latency", "ttft", "prompt_tokens", "completion_tokens",
                 "gen_tokens", "gen_s")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.by_code: dict[str, int] = {}
        self.latency = _Series()
        self.ttft = _Series()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.gen_tokens = 0
        self.gen_s = 0.0


class _Slot:
    __slots__ = ("index", "overall", "by_model", "by_backend")

    def __init__(self, index: int) -> None:
        self.index = index
        self.overall = _Stats()
        self.by_model: dict[str, _Stats] = {}
        self.by_backend: dict[str, _Stats] = {}


@attrs.frozen
class Sample:
    """One finished chat request, as the metrics see it."""

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


def percentiles(series: Iterable[_Series], qs: tuple[int, ...] = PERCENTILES) -> dict[str, float] | None:
    """Nearest-rank percentiles (``p50`` = the smallest value with at least 50 % of samples at or below it).

    Slots whose reservoir overflowed carry a weight (samples seen / samples kept).
    """
    weighted: list[tuple[float, float]] = []
    plain: list[float] = []
    for s in series:
        if not s.values:
            continue
        if s.seen == len(s.values):
            plain.extend(s.values)
        else:
            w = s.seen / len(s.values)
            weighted.extend((v, w) for v in s.values)
    if not plain and not weighted:
        return None
    if not weighted:
        plain.sort()
        n = len(plain)
        return {f"p{q}": round(plain[max(math.ceil(q / 100 * n), 1) - 1], 1) for q in qs}
    weighted.extend((v, 1.0) for v in plain)
    weighted.sort()
    total = sum(w for _, w in weighted)
    out: dict[str, float] = {}
    for q in qs:
        target, acc = q / 100 * total, 0.0
        for value, w in weighted:
            acc += w
            if acc >= target - 1e-9:
                break
        out[f"p{q}"] = round(value, 1)
    return out


class RollingMetrics:
    """Per-app rolling window of request metrics, plus the live in-flight count.

    ``record`` is called once per finished chat request (from the observability stage); ``snapshot``
    builds the JSON for ``/v1/metrics``. ``clock`` is injectable for tests.
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
        self._rng = random.Random(seed)

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
        groups = [slot.overall]
        if sample.model is not None:
            stats = slot.by_model.get(sample.model)
            if stats is None:
                stats = slot.by_model[sample.model] = _Stats()
            groups.append(stats)
        if sample.backend is not None:
            stats = slot.by_backend.get(sample.backend)
            if stats is None:
                stats = slot.by_backend[sample.backend] = _Stats()
            groups.append(stats)
        failed = sample.failed
        code = (sample.error_code or f"http_{sample.status}")[:64] if failed else None
        # Backend time spent producing the reply: everything but the wait for a model switch.
        gen_s = max(sample.duration_ms - sample.queue_ms, 0.0) / 1000
        cap, rng = self.max_samples, self._rng
        for stats in groups:
            stats.requests += 1
            if failed:
                stats.errors += 1
                stats.by_code[code] = stats.by_code.get(code, 0) + 1  # type: ignore[index]
            else:
                stats.latency.add(sample.duration_ms, cap, rng)
            if sample.ttft_ms is not None:
                stats.ttft.add(sample.ttft_ms, cap, rng)
            if sample.prompt_tokens:
                stats.prompt_tokens += sample.prompt_tokens
            if sample.completion_tokens:
                stats.completion_tokens += sample.completion_tokens
                if not failed and gen_s > 0:
                    stats.gen_tokens += sample.completion_tokens
                    stats.gen_s += gen_s

    def _live_slots(self) -> list[_Slot]:
        now_index = int(self.clock() // self.slot_s)
        self._prune(now_index)
        return list(self._slots)

    def _summary(self, stats: list[_Stats], seconds: float) -> dict[str, Any]:
        requests = sum(s.requests for s in stats)
        errors = sum(s.errors for s in stats)
        by_code: dict[str, int] = {}
        for s in stats:
            for code, n in s.by_code.items():
                by_code[code] = by_code.get(code, 0) + n
        gen_s = sum(s.gen_s for s in stats)
        gen_tokens = sum(s.gen_tokens for s in stats)
        return {
            "requests": requests,
            "requests_per_s": round(requests / seconds, 3) if seconds > 0 else None,
            "errors": errors,
            "errors_by_code": dict(sorted(by_code.items())),
            "latency_ms": percentiles(s.latency for s in stats),
            "ttft_ms": percentiles(s.ttft for s in stats),
            "prompt_tokens": sum(s.prompt_tokens for s in stats),
            "completion_tokens": sum(s.completion_tokens for s in stats),
            "tokens_per_s": round(gen_tokens / gen_s, 2) if gen_s > 0 else None,
        }

    def _grouped(self, slots: list[_Slot], attr: str, seconds: float) -> dict[str, Any]:
        groups: dict[str, list[_Stats]] = {}
        for slot in slots:
            for name, stats in getattr(slot, attr).items():
                groups.setdefault(name, []).append(stats)
        return {name: self._summary(groups[name], seconds) for name in sorted(groups)}

    def snapshot(self) -> dict[str, Any]:
        """The window's figures: overall, ``by_model`` and ``by_backend``, and the in-flight count."""
        slots = self._live_slots()
        seconds = min(self.window_s, self.clock() - self.started)
        return {
            "window_s": self.window_s,
            "in_flight": self.in_flight,
            "total_requests": self.total_requests,
            "overall": self._summary([s.overall for s in slots], seconds),
            "by_model": self._grouped(slots, "by_model", seconds),
            "by_backend": self._grouped(slots, "by_backend", seconds),
        }


# --- vLLM orchestrator figures (read defensively: the orchestrator may or may not expose them) -----


def _first(raw: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in raw and raw[name] is not None:
            return raw[name]
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    return None


def _as_mapping(raw: Any) -> Mapping[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        return raw
    if attrs.has(type(raw)):
        return attrs.asdict(raw, recurse=False)
    if hasattr(raw, "_asdict"):
        return raw._asdict()
    if hasattr(raw, "__dict__"):
        return vars(raw)
    return None


def _durations_s(raw: Mapping[str, Any]) -> list[float]:
    secs = _first(raw, "swap_durations_s", "durations_s")
    if isinstance(secs, (list, tuple, deque)):
        return [float(v) for v in secs if isinstance(v, (int, float))]
    ms = _first(raw, "swap_durations_ms", "durations_ms")
    if isinstance(ms, (list, tuple, deque)):
        return [float(v) / 1000 for v in ms if isinstance(v, (int, float))]
    recent = _first(raw, "recent_swaps", "swap_history", "history", "recent")
    out: list[float] = []
    if isinstance(recent, (list, tuple, deque)):
        for item in recent:
            item = _as_mapping(item) or {}
            if isinstance(item.get("duration_s"), (int, float)):
                out.append(float(item["duration_s"]))
            elif isinstance(item.get("duration_ms"), (int, float)):
                out.append(float(item["duration_ms"]) / 1000)
    return out


@attrs.frozen
class SwapStats:
    """Normalised orchestrator figures; ``None`` where the orchestrator does not say."""

    swaps: int | None = None
    failures: int | None = None
    durations_s: tuple[float, ...] = ()
    queue_depth: int | None = None


def orchestrator_stats(adapter: Any) -> SwapStats:
    """Read ``adapter.stats`` (an attribute or a no-argument method; a mapping, attrs object or plain object).

    Understood names: ``swaps``/``swap_count``/``switches`` (a number, or a mapping with ``count``,
    ``failures`` and durations), ``swap_failures``/``failed_swaps``, ``swap_durations_s``/
    ``swap_durations_ms`` or ``recent_swaps`` (items with ``duration_s``/``duration_ms``), and
    ``queue_depth``/``queued``/``waiting``. Anything missing or malformed reads as unknown.
    """
    try:
        raw = getattr(adapter, "stats", None)
        if callable(raw):
            raw = raw()
        raw = _as_mapping(raw)
        if raw is None:
            return SwapStats()
        swaps_value = _first(raw, "swaps", "swap_count", "switches")
        nested = _as_mapping(swaps_value) if not isinstance(swaps_value, (int, float)) else None
        if nested is not None:
            swaps = _as_int(_first(nested, "count", "total", "swaps"))
            failures = _as_int(_first(nested, "failures", "failed"))
            durations = _durations_s(nested) or _durations_s(raw)
        else:
            swaps = _as_int(swaps_value)
            failures = None
            durations = _durations_s(raw)
        if failures is None:
            failures = _as_int(_first(raw, "swap_failures", "failed_swaps", "start_failures", "failures"))
        queue_depth = _first(raw, "queue_depth", "queued", "waiting")
        if isinstance(queue_depth, (list, tuple, dict)):
            queue_depth = len(queue_depth)
        return SwapStats(swaps, failures, tuple(durations), _as_int(queue_depth))
    except Exception:  # a plugin's stats must never break the metrics endpoint
        return SwapStats()


def swap_summary(stats: SwapStats) -> dict[str, Any]:
    durations = sorted(stats.durations_s)
    summary: dict[str, Any] = {"count": stats.swaps, "failures": stats.failures, "duration_s": None}
    if durations:
        n = len(durations)
        summary["duration_s"] = {
            **{f"p{q}": round(durations[max(math.ceil(q / 100 * n), 1) - 1], 3) for q in PERCENTILES},
            "last": round(stats.durations_s[-1], 3),
            "samples": n,
        }
    return summary
