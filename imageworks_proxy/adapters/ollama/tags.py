"""What each Ollama server has pulled (``/api/tags``) and what each tag can do, cached: for the model list
and for the capabilities known before a chat is sent (docs/ollama.md).

``/api/tags`` is asked at most every few seconds per base URL, in the background (the answer in hand is
used meanwhile; only a base never asked is waited for, briefly). Recent Ollama lists each tag's
capabilities there; for a tag listed without them, ``/api/show`` is asked once and kept until the tag's
digest changes (a new pull) or the registry changes (:meth:`TagCache.forget_shown`). Never one call per
request.

An Ollama that does not answer is logged at WARNING when it goes away (and at INFO when it is back); its
entries stay listed with ``extensions.status: "unavailable"``, since whether a tag is pulled cannot be
known while it is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Any

import aiohttp
import attrs

from imageworks_proxy.catalogue.capabilities import Capabilities, ollama_capabilities

log = logging.getLogger("imageworks_proxy.ollama")

TAGS_TTL_S = 5.0
TAGS_TIMEOUT_S = 1.5
#: How long the first ``/v1/models`` (or chat) waits for a base's first ``/api/tags`` answer before going on
#: without it; later ones never wait.
FIRST_TAGS_WAIT_S = 0.3
#: How long a chat or listing waits for a tag's ``/api/show`` (it goes on in the background and is kept).
SHOW_WAIT_S = 0.3


def tag_key(tag: str) -> str:
    return tag if ":" in tag else f"{tag}:latest"  # Ollama's "llama3" is "llama3:latest"


@attrs.frozen
class TagInfo:
    """One pulled tag: its digest, and its capabilities when ``/api/tags`` lists them."""

    digest: str | None
    capabilities: Capabilities | None


def _parse_tags(data: Any) -> dict[str, TagInfo]:
    out: dict[str, TagInfo] = {}
    for m in data.get("models", []):
        name = (m.get("name") or m.get("model")) if isinstance(m, dict) else None
        if not name:
            continue
        tag = tag_key(str(name))
        caps = ollama_capabilities(m.get("capabilities"), f"Ollama /api/tags for {tag}")
        out[tag] = TagInfo(m.get("digest") if isinstance(m.get("digest"), str) else None, caps)
    return out


class TagCache:
    """``/api/tags`` answers per Ollama base URL, and ``/api/show`` answers per tag. ``http`` returns the
    app's client session; background fetches are owned here and :meth:`close` ends them."""

    def __init__(self, http: Callable[[], aiohttp.ClientSession]) -> None:
        self._http = http
        # base url -> (fetched_at, tag -> info, or None when unreachable)
        self._tags: dict[str, tuple[float, dict[str, TagInfo] | None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._waited: set[str] = set()
        # (base url, tag) -> (digest it was asked for, what /api/show said or None)
        self._shown: dict[tuple[str, str], tuple[str | None, Capabilities | None]] = {}
        self._showing: dict[tuple[str, str], asyncio.Task[Capabilities | None]] = {}

    async def close(self) -> None:
        tasks = [*self._refreshing.values(), *self._showing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._refreshing.clear()
        self._showing.clear()

    def forget_shown(self) -> None:
        """The registry changed: ask ``/api/show`` again when next needed."""
        self._shown.clear()

    # -- /api/tags ------------------------------------------------------------------------------
    async def fetch(self, base: str) -> None:
        """Ask ``base`` for its tags now (at most ``TAGS_TIMEOUT_S``) and remember the answer."""
        tags: dict[str, TagInfo] | None
        try:
            timeout = aiohttp.ClientTimeout(total=TAGS_TIMEOUT_S)
            async with self._http().get(f"{base}/api/tags", timeout=timeout) as resp:
                resp.raise_for_status()
                tags = _parse_tags(await resp.json(content_type=None))
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
        """Refresh stale answers in the background; only the first asker of a base never answered waits,
        briefly (so a hung Ollama costs one listing or chat ``FIRST_TAGS_WAIT_S``, not every one)."""
        now = time.monotonic()
        first: list[asyncio.Task[None]] = []
        for base in set(bases):
            cached = self._tags.get(base)
            if cached is None or now - cached[0] > TAGS_TTL_S:
                task = self._refresh(base)
                if cached is None and base not in self._waited:
                    self._waited.add(base)
                    first.append(task)
        if first:
            await asyncio.wait(first, timeout=FIRST_TAGS_WAIT_S)

    def _infos(self, base: str) -> dict[str, TagInfo] | None:
        cached = self._tags.get(base)
        return cached[1] if cached else None

    def known(self, base: str) -> AbstractSet[str] | None:
        """The tags ``base`` reported last (a view, not a copy: asked once per entry of a listing);
        ``None`` when it has not answered (yet)."""
        infos = self._infos(base)
        return infos.keys() if infos is not None else None

    def down(self, base: str) -> bool:
        """Whether ``base`` was asked and did not answer."""
        cached = self._tags.get(base)
        return cached is not None and cached[1] is None

    # -- capabilities ---------------------------------------------------------------------------
    async def capabilities(self, base: str, tag: str) -> Capabilities | None:
        """What Ollama at ``base`` says ``tag`` can do: from ``/api/tags``, else ``/api/show`` (asked once
        per digest). ``None`` when Ollama is unreachable, does not have the tag or does not say."""
        await self.prepare([base])
        answer = self._lookup(base, tag_key(tag))
        if not isinstance(answer, asyncio.Task):
            return answer
        done, _ = await asyncio.wait({answer}, timeout=SHOW_WAIT_S)
        return answer.result() if done else None

    def start_show(self, base: str, tag: str) -> None:
        """Start the ``/api/show`` call ``tag`` still needs, if any, without waiting for it: a listing starts
        them all first and then waits for them together rather than one after another."""
        self._lookup(base, tag_key(tag))

    def _lookup(self, base: str, tag: str) -> Capabilities | asyncio.Task[Capabilities | None] | None:
        """The known answer for ``tag``, or the ``/api/show`` call under way for it (started here)."""
        info = (self._infos(base) or {}).get(tag)
        if info is None:
            return None
        if info.capabilities is not None:
            return info.capabilities
        key = (base, tag)
        shown = self._shown.get(key)
        if shown is not None and shown[0] == info.digest:
            return shown[1]
        task = self._showing.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._show(base, tag, info.digest))
            self._showing[key] = task
            task.add_done_callback(lambda _: self._showing.pop(key, None))
        return task

    async def _show(self, base: str, tag: str, digest: str | None) -> Capabilities | None:
        caps: Capabilities | None = None
        try:
            timeout = aiohttp.ClientTimeout(total=TAGS_TIMEOUT_S)
            async with self._http().post(f"{base}/api/show", json={"model": tag}, timeout=timeout) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            caps = ollama_capabilities(data.get("capabilities"), f"Ollama /api/show for {tag}")
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as exc:
            # remembered like an answer: a failing /api/show must not cost every request a wait
            log.debug("ollama /api/show %s at %s unavailable: %s", tag, base, exc)
        self._shown[(base, tag)] = (digest, caps)
        return caps
