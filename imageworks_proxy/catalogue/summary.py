"""The start-up summary the server logs once it listens: what it serves, what it hides and why, and which
backend servers answer (docs/configuration.md, "Start-up summary")."""

from __future__ import annotations

import asyncio
import logging

from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.catalogue.service import ModelService

log = logging.getLogger("imageworks_proxy.catalogue")

#: How long the summary waits for the adapters' reachability checks.
CHECK_TIMEOUT_S = 3.0


async def _reachability(models: ModelService) -> list[tuple[Adapter, str, bool]]:
    adapters = [a for a in models.adapters.values() if models.entries_for(a)]
    results = await asyncio.gather(
        *(asyncio.wait_for(a.check_upstreams(models.entries_for(a)), CHECK_TIMEOUT_S) for a in adapters),
        return_exceptions=True,
    )
    out = []
    for adapter, result in zip(adapters, results, strict=True):
        if isinstance(result, BaseException):
            log.debug("adapter %s could not check its servers: %r", adapter.name, result)
            continue
        out.extend((adapter, address, ok) for address, ok in sorted(result.items()))
    return out


async def startup_summary(models: ModelService, *, version: str, address: str) -> tuple[int, str]:
    """The summary as one log record: (level, text). INFO, or WARNING when nothing is listed. (A server
    that does not answer is marked in the text; the adapter that found it warns on its own, as the
    Ollama adapter does.)"""
    store = models.store
    rows = await models.survey()
    listed = [r for r in rows if r.hidden is None]
    hidden = [r for r in rows if r.hidden is not None]
    servers = await _reachability(models)
    width = max((len(r.id) for r in rows), default=0)
    lines = [
        f"imageworks-chat-proxy {version} listening on {address}",
        f"registry: {store.location} ({len(store.registry.entries)} entries)"
        + (f"; NOT LOADED: {store.error}" if store.error else ""),
        f"models listed ({len(listed)}):" if listed else "models listed: none",
    ]
    lines += [f"  {r.id:<{width}}  {r.entry.backend:<8} {r.status or '-'}" for r in listed]
    if hidden:
        lines.append(f"hidden ({len(hidden)}):")
        lines += [f"  {r.id:<{width}}  {r.hidden}" for r in hidden]
    if servers:
        lines.append("backend servers:")
        lines += [
            f"  {address:<30} {'answers' if ok else 'DOES NOT ANSWER'} ({adapter.name})"
            for adapter, address, ok in servers
        ]
    return logging.INFO if listed else logging.WARNING, "\n  ".join(lines)
