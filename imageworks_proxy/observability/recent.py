"""The last few requests and model switches, for the status page (``GET /v1/status``).

The observability stage adds one summary per finished request, whatever ``CHAT_PROXY_ENABLE_METRICS``
and the request log say. A summary holds figures and names only (time, model, status, latency, tokens):
no prompt or reply text ever enters it, whatever ``CHAT_PROXY_LOG_PROMPTS`` says. Switches and stops
arrive through the GPU scheduler's listener hook (:mod:`imageworks_proxy.gpu.swaplog` describes the
events), stamped with the time they ended. Both rings are bounded, so memory stays constant.
"""

from __future__ import annotations

import collections
import time
from typing import Any, NamedTuple

#: Request summaries kept: enough for a screenful of recent traffic.
RECENT_REQUESTS = 50
#: Switches and stops kept.
RECENT_SWITCHES = 20
#: A model name the client sent that matched no entry is client text: keep only this much of it.
MAX_NAME_CHARS = 120
#: Scheduler events that are switches (``swap``, failed ones included) or stops (``vacate``).
SWITCH_EVENTS = frozenset({"swap", "vacate"})


class RequestSummary(NamedTuple):
    """One finished request as the status page shows it (a named tuple: one is made per request)."""

    ts: float  # arrival, POSIX seconds
    request_id: str
    model: str | None  # the registry entry's logical name, else the name the client sent (shortened)
    adapter: str | None
    stream: bool
    status: int
    error_code: str | None
    duration_ms: float
    ttft_ms: float | None
    queue_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_estimated: bool


class RecentActivity:
    """Bounded rings of recent :class:`RequestSummary` and switch events.

    ``add_request`` is called once per finished request; ``on_event`` is registered as a scheduler
    listener.
    """

    def __init__(self, requests: int = RECENT_REQUESTS, switches: int = RECENT_SWITCHES) -> None:
        self._requests: collections.deque[RequestSummary] = collections.deque(maxlen=requests)
        self._switches: collections.deque[dict[str, Any]] = collections.deque(maxlen=switches)

    def add_request(self, summary: RequestSummary) -> None:
        self._requests.append(summary)

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") in SWITCH_EVENTS:
            self._switches.append({**event, "at": time.time()})

    def requests(self) -> list[dict[str, Any]]:
        """The request summaries as JSON-ready dicts, the most recent first."""
        return [s._asdict() for s in reversed(self._requests)]

    def switches(self) -> list[dict[str, Any]]:
        """The scheduler's switch and stop events plus ``at`` (POSIX seconds), the most recent first."""
        return list(reversed(self._switches))


def shorten(name: str | None) -> str | None:
    """A client-supplied model name, bounded for display."""
    if name is None or len(name) <= MAX_NAME_CHARS:
        return name
    return name[: MAX_NAME_CHARS - 1] + "…"
