"""The last few requests, summarised for the status page (``GET /v1/status``).

The observability stage adds one summary per finished request, whatever ``CHAT_PROXY_ENABLE_METRICS``
and the request log say. A summary holds figures and names only (time, model, status, latency, tokens):
no prompt or reply text ever enters it, whatever ``CHAT_PROXY_LOG_PROMPTS`` says. The ring is bounded, so
memory stays constant however many requests pass.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs

#: Summaries kept: enough for a screenful of recent traffic.
RECENT_REQUESTS = 50
#: A model name the client sent that matched no entry is client text: keep only this much of it.
MAX_NAME_CHARS = 120


@attrs.frozen
class RequestSummary:
    """One finished request as the status page shows it."""

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


class RecentRequests:
    """A bounded ring of :class:`RequestSummary`; ``add`` is called once per finished request."""

    def __init__(self, size: int = RECENT_REQUESTS) -> None:
        self._ring: collections.deque[RequestSummary] = collections.deque(maxlen=size)

    def add(self, summary: RequestSummary) -> None:
        self._ring.append(summary)

    def newest_first(self) -> list[dict[str, Any]]:
        """The summaries as JSON-ready dicts, the most recent first."""
        return [attrs.asdict(s) for s in reversed(self._ring)]


def shorten(name: str | None) -> str | None:
    """A client-supplied model name, bounded for display."""
    if name is None or len(name) <= MAX_NAME_CHARS:
        return name
    return name[: MAX_NAME_CHARS - 1] + "…"
