"""The live model catalogue: registry snapshot, public ids, adapter routing and ``/v1/models``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import attrs

from imageworks_proxy.adapters.base import (
    ANY_BACKEND,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Adapter,
    default_installed,
)
from imageworks_proxy.catalogue.capabilities import CapabilityStore, Effective
from imageworks_proxy.catalogue.idstore import IdStore
from imageworks_proxy.catalogue.naming import Catalogue, build_catalogue
from imageworks_proxy.catalogue.registry import Entry, Registry, RegistryStore
from imageworks_proxy.catalogue.templates import has_chat_template
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError

log = logging.getLogger("imageworks_proxy.catalogue")

_INSTALLED_TTL_S = 2.0
#: Capabilities of a model that writes text: an entry with any of them is a chat model.
_GENERATES = frozenset({"text", "completion", "tools", "vision", "reasoning"})


def model_kind(entry: Entry) -> str:
    """``"embedding"`` for an embedding-only model (its capabilities name ``embedding`` and nothing that
    writes text: no ``text``/``chat``, ``completion``, ``tools``, ``vision`` or ``reasoning``), else
    ``"chat"``."""
    caps = entry.capabilities
    return "embedding" if "embedding" in caps and not caps & _GENERATES else "chat"


def endpoints_of(entry: Entry) -> list[str]:
    """The routes below ``/v1`` the registry says ``entry`` serves (``/v1/models`` shows them)."""
    if model_kind(entry) == "embedding":
        return [EMBEDDINGS]
    return [CHAT, COMPLETIONS] + ([EMBEDDINGS] if "embedding" in entry.capabilities else [])


@attrs.frozen
class Row:
    """One catalogue entry as ``/v1/models`` sees it: its id, adapter, ``extensions.status``, and why the
    list leaves it out (``hidden``; ``None``: listed)."""

    id: str
    entry: Entry
    adapter: Adapter | None
    installed: bool
    status: str | None
    hidden: str | None
    has_template: bool | None


class ModelService:
    """Everything about models that the routes need; rebuilt (cheaply) on each registry reload.

    ``ids`` remembers the public ids handed out (``CHAT_PROXY_NAMES_PATH``); ``None``: nothing is
    remembered (every rebuild computes them afresh)."""

    def __init__(self, config: Config, store: RegistryStore, ids: IdStore | None = None) -> None:
        self.config = config
        self.store = store
        self.ids = ids
        self.adapters: dict[str, Adapter] = {}
        self.catalogue: Catalogue = build_catalogue(())
        #: logical name -> why the entry cannot be served as the registry describes it (load-time check)
        self.problems: dict[str, str] = {}
        self._routes: dict[str, Adapter | None] = {}
        self._by_adapter: dict[Adapter, list[Entry]] = {}
        # name -> (default installed rule, has chat template), refreshed in one batch off the event loop
        self._fs_cache: dict[str, tuple[bool, bool | None]] = {}
        self._fs_checked_at = float("-inf")
        #: Refusals learned from upstreams and adaptations logged; starts over on each registry change.
        self.capabilities = CapabilityStore()
        store.on_change.append(self._rebuild)

    # -- routing -------------------------------------------------------------------------------
    def set_adapters(self, adapters: dict[str, Adapter]) -> None:
        self.adapters = adapters
        self._rebuild(self.store.registry)

    def _rebuild(self, registry: Registry) -> None:
        self.catalogue = build_catalogue(registry.entries, self.ids.ids if self.ids is not None else None)
        if self.ids is not None and registry.loaded_at:  # not the empty stand-in before the first load
            # An entry that leaves the registry (or is deprecated) gives its id up.
            self.ids.update({i.id: i.entry.name for i in self.catalogue.listed if not i.entry.deprecated})
        self._routes = {e.name: self._route(e) for e in registry.entries}
        self._by_adapter = {}
        for e in registry.entries:
            routed = self._routes[e.name]
            if routed is not None:
                self._by_adapter.setdefault(routed, []).append(e)
        self._fs_cache = {}
        self._fs_checked_at = float("-inf")
        self.capabilities.clear()
        problems = {e.name: p for e in registry.entries if (p := self._problem(e)) is not None}
        for name, problem in problems.items():
            if self.problems.get(name) != problem:
                log.warning("registry %s: entry %r cannot be served: %s", registry.source, name, problem)
        self.problems = problems

    def _problem(self, entry: Entry) -> str | None:
        adapter = self._routes.get(entry.name)
        if adapter is None:
            if not self.adapters:
                return None  # the adapters are not set yet
            wanted = entry.backend_config.adapter
            if wanted:
                return f"backend_config.adapter names {wanted!r}, which is not installed (GET /v1/plugins)"
            return f"no installed adapter serves backend {entry.backend!r} (GET /v1/plugins)"
        try:
            return adapter.entry_problem(entry)
        except Exception as exc:  # a third-party adapter's check must not break a registry load
            return f"{adapter.name} could not check it: {type(exc).__name__}: {exc}"

    def _route(self, entry: Entry) -> Adapter | None:
        """The routing rule: ``backend_config.adapter`` names the adapter; else an adapter that claims the
        entry's ``backend`` and accepts the entry; else one that claims :data:`ANY_BACKEND` (the
        fallback). Among several, a third-party adapter wins over a built-in one."""
        wanted = entry.backend_config.adapter
        if wanted:
            return self.adapters.get(wanted)
        for backend in (entry.backend, ANY_BACKEND):
            claimed = [a for a in self.adapters.values() if backend in a.backends and a.accepts(entry)]
            if claimed:
                claimed.sort(key=lambda a: type(a).__module__.startswith("imageworks_proxy."))
                return claimed[0]
        return None

    def adapter_for(self, entry: Entry) -> Adapter:
        adapter = self._routes.get(entry.name, None) if entry.name in self._routes else self._route(entry)
        if adapter is None:
            wanted = entry.backend_config.adapter or entry.backend
            raise ProxyError(
                503,
                "backend_unavailable",
                f"No installed adapter serves model {entry.name!r} (adapter/backend {wanted!r}). "
                "GET /v1/plugins lists the installed adapters.",
                headers={"Retry-After": "30"},
            )
        return adapter

    def resolve(self, requested: str) -> Entry:
        return self.catalogue.resolve(requested)

    def entries_for(self, adapter: Adapter) -> list[Entry]:
        return list(self._by_adapter.get(adapter, ()))

    async def effective_capabilities(self, entry: Entry) -> Effective:
        """``entry``'s capabilities as the proxy acts on them (catalogue/capabilities.py)."""
        return await self.capabilities.effective(entry, self._routes.get(entry.name))

    def adapter_states(self) -> dict[str, dict[str, Any]]:
        """Each adapter's :meth:`~Adapter.public_state`, under its ``state_key`` (for health and metrics)."""
        out: dict[str, dict[str, Any]] = {}
        for adapter in self.adapters.values():
            if adapter.state_key:
                state = adapter.public_state()
                if state is not None:
                    out[adapter.state_key] = state
        return out

    # -- listing -------------------------------------------------------------------------------
    @staticmethod
    def _fs_scan(entries: list[Entry]) -> dict[str, tuple[bool, bool | None]]:
        return {
            e.name: (default_installed(e), has_chat_template(e) if e.backend == "vllm" else None)
            for e in entries
        }

    def _fs_facts(self, entry: Entry) -> tuple[bool, bool | None]:
        """(default installed rule, has chat template) from the filesystem, as of the last scan."""
        facts = self._fs_cache.get(entry.name)
        if facts is None:
            facts = self._fs_cache[entry.name] = self._fs_scan([entry])[entry.name]
        return facts

    async def _refresh_fs_facts(self) -> None:
        """Re-check download paths and chat templates every couple of seconds, in a worker thread: with
        hundreds of entries that is hundreds of stats and file reads the event loop should not wait on."""
        if time.monotonic() - self._fs_checked_at < _INSTALLED_TTL_S:
            return
        catalogue = self.catalogue
        entries = [item.entry for item in catalogue.listed if not item.entry.deprecated]
        facts = await asyncio.to_thread(self._fs_scan, entries)
        if catalogue is self.catalogue:  # not replaced by a registry reload meanwhile
            self._fs_cache, self._fs_checked_at = facts, time.monotonic()

    async def _prepare(self) -> None:
        if self._by_adapter:
            await asyncio.gather(
                *(a.prepare_listing(entries) for a, entries in self._by_adapter.items()),
                return_exceptions=True,
            )
        await self._refresh_fs_facts()

    def _hidden(self, entry: Entry, adapter: Adapter | None) -> str | None:
        """Why ``/v1/models`` leaves ``entry`` out, or ``None`` when it is listed."""
        cfg = self.config
        if entry.deprecated:
            return "deprecated"
        if entry.testing and not cfg.include_test_models:
            return "test model (CHAT_PROXY_INCLUDE_TEST_MODELS=1 lists it)"
        if cfg.include_non_installed or self._installed(entry, adapter):
            return None
        if adapter is None or adapter.installed(entry) is None:
            return f"not installed: {entry.download_path} not found"
        return adapter.not_installed_reason(entry)

    def status(self, entry: Entry, adapter: Adapter | None) -> str | None:
        """``extensions.status``: ``unavailable`` for an entry that cannot be served as written (no
        adapter, no URL: :attr:`problems`), else what its adapter says."""
        if adapter is None or entry.name in self.problems:
            return "unavailable"
        return adapter.model_status(entry)

    def _installed(self, entry: Entry, adapter: Adapter | None) -> bool:
        """The adapter's installed rule, else the default one (``download_path`` exists)."""
        installed = adapter.installed(entry) if adapter is not None else None
        return self._fs_facts(entry)[0] if installed is None else installed

    async def survey(self) -> list[Row]:
        """Every catalogue entry with its id, adapter, status and whether (and why not) ``/v1/models``
        lists it, in logical-name order. Asks the adapters first, as :meth:`listing` does."""
        await self._prepare()
        rows = []
        for item in self.catalogue.listed:
            entry = item.entry
            adapter = self._routes.get(entry.name)
            hidden = self._hidden(entry, adapter)
            has_template = self._fs_facts(entry)[1] if hidden is None else None
            status = self.status(entry, adapter)
            installed = self._installed(entry, adapter)
            rows.append(Row(item.id, entry, adapter, installed, status, hidden, has_template))
        return rows

    async def listing(self) -> dict[str, Any]:
        """The ``/v1/models`` body."""
        await self._prepare()
        created = int(self.store.registry.loaded_at) or int(time.time())
        data = []
        for item in self.catalogue.listed:
            entry = item.entry
            adapter = self._routes.get(entry.name)
            if self._hidden(entry, adapter) is None:
                data.append((item.id, entry, adapter))
        # One after another: the adapters answer from their caches, and what they had to ask their servers
        # was asked for all entries at once in prepare_listing (a task per entry here would cost more than
        # the whole listing).
        caps = [await self.capabilities.effective(e, a) for _, e, a in data]
        models = [
            self._model_object(public_id, entry, adapter, created, self._fs_facts(entry)[1], c)
            for (public_id, entry, adapter), c in zip(data, caps, strict=True)
        ]
        return {"object": "list", "data": models}

    def _model_object(
        self,
        public_id: str,
        entry: Entry,
        adapter: Adapter | None,
        created: int,
        has_template: bool | None,
        caps: Effective,
    ) -> dict[str, Any]:
        fmt = entry.download_format or ("gguf" if entry.backend == "ollama" else None)
        modalities = (
            ["text"]
            + (["image"] if caps.has("vision") else [])
            + (["audio"] if "audio" in entry.capabilities else [])
        )
        ext: dict[str, Any] = {
            "logical_id": entry.name,
            "display_name": public_id,
            "size_bytes": entry.download_size_bytes,
            "capabilities": caps.names(),
            "modalities": modalities,
            "has_chat_template": has_template,
            "kind": model_kind(entry),
            "endpoints": endpoints_of(entry),
            "status": self.status(entry, adapter),
            "schema_version": self.config.schema_version,
        }
        label = public_id
        if not self.config.suppress_decorations:
            ext["backend"] = entry.backend
            ext["adapter"] = adapter.name if adapter is not None else None
            ext["format"] = fmt
            ext["quantization"] = entry.quantization
            label = " · ".join(x for x in (public_id, entry.backend, fmt) if x)
        return {
            "id": public_id,
            "object": "model",
            "created": created,
            "owned_by": "imageworks",
            "name": label,
            "extensions": ext,
        }

