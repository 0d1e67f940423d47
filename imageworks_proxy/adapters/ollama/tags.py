"""What each Ollama server has pulled (``/api/tags``), for the model list: refreshed in the background at
most every few seconds, never waited on for long.

An Ollama that does not answer is logged at WARNING when it goes away (and at INFO when it is back); its
entries stay listed with ``extensions.status: "unavailable"`` (docs/ollama.md), since whether a tag is
pulled cannot be known while it is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import aiohttp

log = logging.getLogger("imageworks_proxy.ollama")

TAGS_TTL_S = 5.0
TAGS_TIMEOUT_S = 1.5
#: How long ``/v1/models`` waits for a first ``/api/tags`` answer before listing without it.
FIRST_TAGS_WAIT_S = 0.3


def tag_key(tag: str) -> str:
    return tag if ":" in tag else f"{tag}:latest"  # Ollama's "llama3" is "llama3:latest"


class TagCache:
    """``/api/tags`` answers per Ollama base URL. ``http`` returns the app's client session."""

    def __init__(self, http: Callable[[], aiohttp.ClientSession]) -> None:
        self._http = http
        # base url -> (fetched_at, tags or None when unreachable)
        self._tags: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    async def fetch(self, base: str) -> None:
        """Ask ``base`` for its tags now (at most ``TAGS_TIMEOUT_S``) and remember the answer."""
        tags: frozenset[str] | None
        try:
            timeout = aiohttp.ClientTimeout(total=TAGS_TIMEOUT_S)
            async with self._http().get(f"{base}/api/tags", timeout=timeout) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            tags = frozenset(
                tag_key(str(m.get("name") or m.get("model")))
                for m in data.get("models", [])
                if isinstance(m, dict) and (m.get("name") or m.get("model"))
            )
            error = None
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as exc:
            tags, error = None, exc
        before = self._tags.get(base)
        self._tags[base] = (time.monotonic(), tags)
        if tags is None and (before is None or before[1] is not None):
            log.warning(
                "Ollama at %s does not answer (%s: %s); its models are listed as unavailable until it does "
                "(is `ollama serve` running?)", base, type(error).__name__, error or "no answer",
            )
        elif tags is not None and before is not None and before[1] is None:
            log.info("Ollama at %s answers again", base)

    def _refresh(self, base: str) -> asyncio.Task[None]:
        task = self._refreshing.get(base)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self.fetch(base), name=f"ollama-tags {base}")
            self._refreshing[base] = task
        return task

    async def prepare(self, bases: Iterable[str]) -> None:
        """Refresh stale answers in the background; only a base never asked is waited for, briefly."""
        now = time.monotonic()
        first: list[asyncio.Task[None]] = []
        for base in set(bases):
            cached = self._tags.get(base)
            if cached is None or now - cached[0] > TAGS_TTL_S:
                task = self._refresh(base)
                if cached is None:
                    first.append(task)
        if first:
            await asyncio.wait(first, timeout=FIRST_TAGS_WAIT_S)

    def known(self, base: str) -> frozenset[str] | None:
        """The tags ``base`` reported last; ``None`` when it has not answered (yet)."""
        cached = self._tags.get(base)
        return cached[1] if cached else None

    def down(self, base: str) -> bool:
        """Whether ``base`` was asked and did not answer."""
        cached = self._tags.get(base)
        return cached is not None and cached[1] is None

    async def close(self) -> None:
        for task in self._refreshing.values():
            task.cancel()
        await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
        self._refreshing.clear()
