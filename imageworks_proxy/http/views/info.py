"""``/v1/health``, ``/v1/models`` and ``/v1/plugins``."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy._version import __version__
from imageworks_proxy.gpu.scheduler import GpuScheduler
from imageworks_proxy.http.responses import json_response


async def health(request: web.Request) -> web.Response:
    """Readiness of the proxy itself; never calls a backend."""
    app = request.app
    models = keys.models(app)
    store = models.store
    pm = keys.plugins(app)
    body = {
        "status": "ok",
        "uptime_s": round(time.monotonic() - app[keys.STARTED_AT], 3),
        "version": __version__,
        "registry": {
            "source": store.location,
            "models": len(store.registry.entries),
            "loaded_at": store.registry.loaded_at or None,
            "error": store.error,
            "warnings": list(store.registry.warnings),
            # entries no adapter can serve as written; /v1/models marks them unavailable
            "problems": [f"entry {name!r}: {problem}" for name, problem in models.problems.items()],
        },
        **models.adapter_states(),
        "tenancy": _tenancy(app),
        "gpu": keys.gpu(app).devices(),
        "plugins": {"errors": [{"name": f.name, "error": f.error} for f in pm.failures]},
    }
    return json_response(body)


def _tenancy(app: web.Application) -> dict[str, Any] | None:
    """Who holds the GPU: the active tenant, what the scheduler is doing, requests in flight and waiting,
    and the pending idle unload (``idle_unload_in_s``: seconds until it is stopped; ``None``: never).
    ``None`` when the app runs another tenancy implementation than the built-in scheduler."""
    sched = app.get(keys.TENANCY)
    if not isinstance(sched, GpuScheduler):
        return None
    active = sched.active
    return {
        "active": active.key if active is not None else None,
        "model": active.model if active is not None else None,
        "phase": sched.phase,
        "inflight": sched.inflight,
        "queue_depth": sched.queue_depth,
        "idle_unload_s": (active.idle_unload_s or None) if active is not None else None,
        "idle_unload_in_s": sched.idle.remaining_s(active.key) if active is not None else None,
    }


async def list_models(request: web.Request) -> web.Response:
    return json_response(await keys.models(request.app).listing())


def plugin_listing(app: web.Application) -> dict[str, Any]:
    pm = keys.plugins(app)
    models = keys.models(app)
    by_plugin: dict[str, list[dict[str, Any]]] = {}
    for adapter in models.adapters.values():
        plugin = getattr(adapter, "plugin_name", None) or "?"
        by_plugin.setdefault(plugin, []).append(
            {"name": adapter.name, "backends": list(adapter.backends), "description": adapter.description}
        )
    stages = {getattr(s, "plugin_name", "?"): [] for s in keys.pipeline(app).stages}
    for stage in keys.pipeline(app).stages:
        stages.setdefault(getattr(stage, "plugin_name", "?"), []).append(stage.name)
    data = []
    for name, info in pm.infos.items():
        data.append({
            "name": name,
            "distribution": info.distribution,
            "version": info.version,
            "builtin": info.builtin,
            "adapters": by_plugin.get(name, []),
            "stages": stages.get(name, []),
        })
    return {
        "object": "list",
        "data": data,
        "errors": [{"name": f.name, "error": f.error} for f in pm.failures],
    }


async def list_plugins(request: web.Request) -> web.Response:
    return json_response(plugin_listing(request.app))
