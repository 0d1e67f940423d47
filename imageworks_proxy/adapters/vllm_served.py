"""Which model name a vLLM started elsewhere serves, for registry entries that do not say.

vLLM serves a model under its ``--served-model-name``, by default the ``--model`` value it was started
with. An entry without ``served_model_id`` (ImageWorks writes ``"None"`` for most vLLM entries) would have
the proxy guess that value from ``model_path``; when the server was started with another spelling (the
download folder, a hub id) every request would get 404. So the server is asked once (``GET /v1/models``)
and a name it serves is used; the answers are cached per server and forgotten when the registry changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp

from imageworks_proxy.catalogue.registry import Entry

log = logging.getLogger("imageworks_proxy.passthrough")

MODELS_TIMEOUT_S = 5.0


def _tail(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def pick_served_name(entry: Entry, served: list[str]) -> str | None:
    """The name among ``served`` that is ``entry``'s model: the one it names exactly (``model_path``,
    ``download_path``, logical name), else the only one served, else the one whose last path segment is
    the same; ``None`` when none fits."""
    wanted = [w for w in (entry.backend_config.model_path, entry.download_path, entry.name) if w]
    for name in wanted:
        if name in served:
            return name
    if len(served) == 1:
        return served[0]
    tails = {_tail(w) for w in wanted}
    matching = [name for name in served if _tail(name) in tails]
    return matching[0] if len(matching) == 1 else None


class ServedNames:
    """``GET /v1/models`` answers per base URL. ``http`` returns the app's client session."""

    def __init__(self, http: Callable[[], aiohttp.ClientSession]) -> None:
        self._http = http
        self._served: dict[str, list[str]] = {}

    def forget(self, *_: object) -> None:
        """Drop every cached answer (the registry changed)."""
        self._served.clear()

    async def _ask(self, base: str, headers: dict[str, str]) -> list[str] | None:
        try:
            timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
            async with self._http().get(base + "/models", headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.debug("asking %s/models which models it serves failed: %r", base, exc)
            return None
        items = data.get("data") if isinstance(data, dict) else None
        return [str(m["id"]) for m in items or () if isinstance(m, dict) and m.get("id")]

    async def name_for(self, entry: Entry, base: str, headers: dict[str, str]) -> str:
        """The model name to send to the server at ``base`` for ``entry`` (which has no
        ``served_model_id``); ``entry.upstream_model`` when the server cannot tell."""
        served = self._served.get(base)
        if served is None:
            served = await self._ask(base, headers)
            if served is None:
                return entry.upstream_model  # not answering: the request itself reports that
            self._served[base] = served
        name = pick_served_name(entry, served)
        if name is None:
            log.warning(
                "model %s: the vLLM at %s serves %s, none of which matches the entry; sending %r "
                "(set served_model_id in the registry)", entry.name, base, ", ".join(served) or "nothing",
                entry.upstream_model,
            )
            return entry.upstream_model
        return name
