"""Orchestrator control for ``imageworks-loader``: ``GET /v1/admin/vllm``,
``POST /v1/admin/vllm/activate {"model"}``, ``POST /v1/admin/vllm/stop {"model"?}`` and (sleep mode)
``POST /v1/admin/vllm/sleep {"model"?}``.

Loopback clients only, unless keys are set: then the auth middleware requires one of
``CHAT_PROXY_ADMIN_KEYS`` (or, without admin keys, of ``CHAT_PROXY_API_KEYS``) from any address.
"""

from __future__ import annotations

import ipaddress

import orjson
from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.adapters.vllm_orchestrated import VllmOrchestratedAdapter, orchestrator
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.errors import ProxyError, invalid_request


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False  # unix sockets and unknown peers: refuse unless keys are configured
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


def json_response(data: object) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _guard(request: web.Request) -> VllmOrchestratedAdapter:
    config = keys.config(request.app)
    if not (config.api_keys or config.admin_keys) and not _is_loopback(request.remote):
        raise ProxyError(
            403,
            "forbidden",
            "The admin API answers loopback clients only. Call it on the proxy's machine (in Docker: "
            "docker exec chat-proxy imageworks-loader ...), or set CHAT_PROXY_ADMIN_KEYS to allow it "
            "with a key from elsewhere.",
        )
    adapter = orchestrator(request.app)
    if adapter is None or not adapter.config.vllm_single_port:
        raise ProxyError(
            409,
            "orchestration_disabled",
            "vLLM single-port orchestration is off "
            "(CHAT_PROXY_VLLM_SINGLE_PORT=0 or the adapter is not loaded).",
        )
    return adapter


async def vllm_state(request: web.Request) -> web.Response:
    adapter = _guard(request)
    return json_response({"vllm": adapter.public_state(), "stats": adapter.stats()})


async def _model(request: web.Request, adapter: VllmOrchestratedAdapter, *, required: bool) -> Entry | None:
    """The orchestrated vLLM entry the body's ``model`` names (None when the body names none and it is
    optional)."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw.strip() or required else {}
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"Invalid JSON body: {exc}") from None
    model = body.get("model") if isinstance(body, dict) else None
    if model is None and not required and isinstance(body, dict):
        return None
    if not isinstance(model, str) or not model.strip():
        raise invalid_request('Body must be {"model": "<logical name or listed id>"}', param="model")
    models = keys.models(request.app)
    entry = models.resolve(model)
    if models.adapter_for(entry) is not adapter:
        raise invalid_request(
            f"Model {entry.name!r} is not an orchestrated vLLM model (backend {entry.backend!r}); only those "
            "can be activated, put to sleep or stopped.",
            param="model",
        )
    return entry


async def vllm_activate(request: web.Request) -> web.Response:
    adapter = _guard(request)
    entry = await _model(request, adapter, required=True)
    assert entry is not None
    return json_response({"vllm": await adapter.activate(entry)})


async def vllm_stop(request: web.Request) -> web.Response:
    """Stop the named model (awake or asleep), or every vLLM model."""
    adapter = _guard(request)
    entry = await _model(request, adapter, required=False)
    return json_response({"vllm": await adapter.deactivate(entry.name if entry else None)})


async def vllm_sleep(request: web.Request) -> web.Response:
    """Put the awake model to sleep (409 ``sleep_disabled`` with sleep mode off)."""
    adapter = _guard(request)
    entry = await _model(request, adapter, required=False)
    return json_response({"vllm": await adapter.sleep(entry.name if entry else None)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/admin/vllm", vllm_state, name="admin_vllm")
    app.router.add_post("/v1/admin/vllm/activate", vllm_activate, name="admin_vllm_activate")
    app.router.add_post("/v1/admin/vllm/stop", vllm_stop, name="admin_vllm_stop")
    app.router.add_post("/v1/admin/vllm/sleep", vllm_sleep, name="admin_vllm_sleep")
