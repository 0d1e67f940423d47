"""Built-in adapter plugin: Ollama through its native ``/api/chat`` (SPEC §8)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import aiohttp

from imageworks_proxy.adapters.base import Adapter, default_installed
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.registry import Entry
from imageworks_proxy.upstream import apply_loopback_alias, entry_base_url

log = logging.getLogger("imageworks_proxy.ollama")

TAGS_TTL_S = 5.0
TAGS_TIMEOUT_S = 1.5
#: How long ``/v1/models`` waits for a first ``/api/tags`` answer before listing without it.
FIRST_TAGS_WAIT_S = 0.3


def _tag_key(tag: str) -> str:
    return tag if ":" in tag else f"{tag}:latest"


class OllamaAdapter(Adapter):
    name = "ollama"
    backends = ("ollama",)
    description = "Ollama via its native /api/chat, translated to and from the OpenAI API"

    def __init__(self, app, config) -> None:
        super().__init__(app, config)
        # base url -> (fetched_at, tags or None when unreachable)
        self._tags: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    def base_url(self, entry: Entry) -> str:
        url = entry_base_url(entry, default_port=11434, default_url=self.config.ollama_base_url)
        return apply_loopback_alias(url or self.config.ollama_base_url, self.config.loopback_alias)

    async def close(self) -> None:
        for task in self._refreshing.values():
            task.cancel()
        await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
        self._refreshing.clear()

    # -- catalogue -----------------------------------------------------------------------------
    async def _fetch_tags(self, base: str) -> None:
        tags: frozenset[str] | None
        try:
            timeout = aiohttp.ClientTimeout(total=TAGS_TIMEOUT_S)
            async with self.http.get(f"{base}/api/tags", timeout=timeout) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            tags = frozenset(
                _tag_key(str(m.get("name") or m.get("model")))
                for m in data.get("models", [])
                if isinstance(m, dict) and (m.get("name") or m.get("model"))
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError) as exc:
            log.debug("ollama /api/tags at %s unavailable: %s", base, exc)
            tags = None
        self._tags[base] = (time.monotonic(), tags)

    def _refresh(self, base: str) -> asyncio.Task[None]:
        task = self._refreshing.get(base)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch_tags(base))
            self._refreshing[base] = task
        return task

    async def prepare_listing(self, entries: Sequence[Entry]) -> None:
        now = time.monotonic()
        first: list[asyncio.Task[None]] = []
        for base in {self.base_url(e) for e in entries}:
            cached = self._tags.get(base)
            if cached is None or now - cached[0] > TAGS_TTL_S:
                task = self._refresh(base)
                if cached is None:
                    first.append(task)
        if first:
            # Only the very first listing waits, briefly; later ones use the last answer while refreshing.
            await asyncio.wait(first, timeout=FIRST_TAGS_WAIT_S)

    def installed(self, entry: Entry) -> bool | None:
        cached = self._tags.get(self.base_url(entry))
        tags = cached[1] if cached else None
        if tags is None:
            # Ollama unreachable (or not asked yet): list entries whose files we can see.
            return default_installed(entry) if entry.download_path else False
        tag = entry.ollama_tag
        return bool(tag) and _tag_key(tag) in tags


@hookimpl
def register_backends(register):
    register(OllamaAdapter)
