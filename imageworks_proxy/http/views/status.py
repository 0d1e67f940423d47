"""The status page: ``GET /`` (HTML for a browser), its script and style under ``/static/``, and
``GET /v1/status``, the JSON the page polls (scripts may use it too). docs/status-page.md describes them.

The page is a static shell shipped in the package (``http/static/``): it holds no data, so it needs no API
key; everything it shows comes from ``/v1/status``, which is keyed like every other ``/v1`` route.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy._version import __version__
from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.http.responses import json_response

#: The files under ``http/static/`` that are served, with their content types.
ASSETS = {
    "status.html": "text/html",
    "status.js": "text/javascript",
    "status.css": "text/css",
}
#: The page loads only its own script and style and talks only to its own origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: Switches and requests shown; the rings behind them hold a few more.
SHOWN_SWITCHES = 10


def wants_html(request: web.Request) -> bool:
    """Whether the client asked for HTML (a browser navigating), not JSON or anything (``*/*``)."""
    for part in request.headers.get("Accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() not in ("text/html", "application/xhtml+xml"):
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        return quality > 0
    return False


def _root_not_found() -> ProxyError:
    return ProxyError(
        404, "not_found",
        "This is the proxy's root, not an API route. The OpenAI-compatible API is under /v1 (/v1/models, "
        "/v1/chat/completions); GET /v1/status has the proxy's state as JSON; open / in a browser for the "
        "status page.",
    )


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


def admin_allowed(request: web.Request) -> bool:
    """The admin API's rule: loopback clients, or any client once API or admin keys are set (the auth
    middleware checks the key on the admin routes themselves)."""
    config = keys.config(request.app)
    return bool(config.api_keys or config.admin_keys) or _is_loopback(request.remote)


def _admin_url(app: web.Application, adapter: Adapter | None, action: str) -> str | None:
    """The admin route for ``action`` on ``adapter``'s models, when it registers one: routes named
    ``admin_<state_key>_activate`` / ``admin_<state_key>_stop`` (docs/status-page.md)."""
    if adapter is None or not adapter.state_key:
        return None
    resource = app.router.named_resources().get(f"admin_{adapter.state_key}_{action}")
    return str(resource.url_for()) if resource is not None else None


def _adapter_of(app: web.Application, entry: Entry | None) -> Adapter | None:
    if entry is None:
        return None
    try:
        return keys.models(app).adapter_for(entry)
    except ProxyError:
        return None


def _model_row(
    app: web.Application, item: dict[str, Any], states: dict[str, dict[str, Any]], admin: bool
) -> dict[str, Any]:
    """One listed model: what it is, where it runs, its state and what an admin may do with it."""
    ext = item.get("extensions") or {}
    logical = ext.get("logical_id")
    entry = keys.models(app).catalogue.by_name.get(logical) if logical else None
    adapter = _adapter_of(app, entry)
    state = ext.get("status")
    public = states.get(adapter.state_key, {}) if adapter is not None and adapter.state_key else {}
    if public.get("active") == logical and isinstance(public.get("state"), str):
        state = public["state"]  # the adapter's own word is finer (draining, stopping, ...)
    if adapter is None:
        state = "unavailable"
    active = keys.scheduler(app).active
    return {
        "id": item.get("id"),
        "logical_id": logical,
        "backend": entry.backend if entry is not None else None,
        "adapter": adapter.name if adapter is not None else None,
        "capabilities": ext.get("capabilities") or [],
        "modalities": ext.get("modalities") or [],
        "state": state,
        "active": active is not None and active.model is not None and active.model == logical,
        "activate": _admin_url(app, adapter, "activate") if admin else None,
    }


def _adapters(app: web.Application, states: dict[str, dict[str, Any]], admin: bool) -> list[dict[str, Any]]:
    out = []
    for adapter in keys.models(app).adapters.values():
        state = states.get(adapter.state_key) if adapter.state_key else None
        if state is None:
            continue
        out.append({
            "name": adapter.name,
            "key": adapter.state_key,
            "state": state,
            "stop": _admin_url(app, adapter, "stop") if admin else None,
        })
    return out


def _gpu(app: web.Application) -> dict[str, Any]:
    sched = keys.scheduler(app)
    active = sched.active
    return {
        "phase": sched.phase,
        "active": (
            {"key": active.key, "label": active.label, "model": active.model} if active is not None else None
        ),
        "inflight": sched.inflight,
        "queue_depth": sched.queue_depth,
        # seconds until the idle active tenant is stopped (docs/vllm.md#idle-unload); None: not pending
        "idle_unload_in_s": sched.idle.remaining_s(active.key) if active is not None else None,
        "devices": keys.gpu(app).devices(),
    }


def _metrics(app: web.Application) -> dict[str, Any] | None:
    if not keys.config(app).enable_metrics:
        return None
    rolling = keys.metrics(app)
    snap = rolling.snapshot()
    return {
        "window_s": snap["window_s"],
        "in_flight": snap["in_flight"],
        "total_requests": snap["total_requests"],
        "overall": snap["overall"],
        **rolling.series(),
    }


async def status_json(request: web.Request) -> web.Response:
    """``GET /v1/status``: everything the status page shows, in one JSON object."""
    app = request.app
    models = keys.models(app)
    listing = await models.listing()
    states = models.adapter_states()
    admin = admin_allowed(request)
    store = models.store
    recent = app[keys.RECENT]
    body = {
        "object": "status",
        "version": __version__,
        "time": time.time(),
        "uptime_s": round(time.monotonic() - app[keys.STARTED_AT], 3),
        "registry": {"source": store.location, "error": store.error},
        "models": [_model_row(app, item, states, admin) for item in listing["data"]],
        "gpu": _gpu(app),
        "adapters": _adapters(app, states, admin),
        "switches": recent.switches()[:SHOWN_SWITCHES],
        "requests": recent.requests(),
        "metrics": _metrics(app),
        "admin": {"allowed": admin},
    }
    return json_response(body)


def _asset_handler(assets: dict[str, bytes]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in assets or name == "status.html":
            raise web.HTTPNotFound()
        return web.Response(
            body=assets[name], content_type=ASSETS[name], charset="utf-8", headers=PAGE_HEADERS
        )

    return asset


def _page_handler(page: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def status_page(request: web.Request) -> web.Response:
        if not wants_html(request):
            raise _root_not_found()  # API clients probing the root keep their 404 in the OpenAI shape
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)

    return status_page


def install(app: web.Application) -> None:
    """Add ``/``, ``/static/{name}`` and ``/v1/status``. The page's files are read once, here, from the
    package."""
    static = importlib.resources.files("imageworks_proxy.http") / "static"
    assets = {name: (static / name).read_bytes() for name in ASSETS}
    app.router.add_get("/", _page_handler(assets["status.html"]), name="status_page")
    app.router.add_get("/static/{name}", _asset_handler(assets), name="status_asset")
    app.router.add_get("/v1/status", status_json, name="status")
