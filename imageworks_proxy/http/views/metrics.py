"""``GET /v1/metrics`` (JSON) and ``GET /metrics`` (Prometheus text), when ``CHAT_PROXY_ENABLE_METRICS=1``."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy._version import __version__
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.http.responses import json_response
from imageworks_proxy.observability.metrics import RollingMetrics
from imageworks_proxy.observability.prometheus import PromMetrics
from imageworks_proxy.observability.recent import RecentActivity
from imageworks_proxy.observability.requestlog import RequestLog, lifetime
from imageworks_proxy.observability.swaps import SwapMetrics


def _disabled() -> ProxyError:
    return ProxyError(
        404, "metrics_disabled",
        "Metrics are disabled. Set CHAT_PROXY_ENABLE_METRICS=1 to serve /v1/metrics and /metrics.",
    )


def present_state(app: web.Application) -> dict[str, Any]:
    """What the GPU scheduler and the GPU say right now (read on each metrics request, never per chat)."""
    sched = keys.scheduler(app)
    active = sched.active
    return {
        "queue_depth": sched.queue_depth,
        "active_model": active.model if active is not None and sched.phase != "starting" else None,
        "gpu": keys.gpu(app).devices(),
    }


def snapshot(app: web.Application) -> dict[str, Any]:
    """The ``/v1/metrics`` body."""
    config = keys.config(app)
    rolling = keys.metrics(app)
    prom = app.get(keys.PROMETHEUS)
    state = prom.read_state() if prom is not None else present_state(app)
    rlog = keys.request_log(app)
    window = rolling.snapshot()
    # each adapter's own state (e.g. "vllm"), reduced to its active model and state, for adapters that have
    # a model state (Ollama's shows only its GPU tenancy)
    adapters = {
        key: {"active_model": st.get("active"), "state": st.get("state")}
        for key, st in keys.models(app).adapter_states().items()
        if "state" in st
    }
    return {
        "object": "metrics",
        "version": __version__,
        "schema_version": config.schema_version,
        "uptime_s": round(time.monotonic() - app[keys.STARTED_AT], 3),
        **window,
        "queue_depth": state["queue_depth"],
        "swaps": app[keys.SWAPS].summary(),
        "active_model": state["active_model"],
        **adapters,
        "gpu": state["gpu"],
        "request_log": {
            "enabled": rlog.enabled,
            "path": rlog.path or None,
            "written": rlog.written,
            "dropped": rlog.dropped,
            "write_errors": rlog.write_errors,
            "rotations": rlog.rotations,
            "queued": rlog.queued,
        },
    }


async def metrics_json(request: web.Request) -> web.Response:
    if not keys.config(request.app).enable_metrics:
        raise _disabled()
    return json_response(snapshot(request.app))


async def prometheus_text(request: web.Request) -> web.Response:
    prom = request.app.get(keys.PROMETHEUS)
    if prom is None:
        raise _disabled()
    body, content_type = prom.exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


def install(app: web.Application, config: Config) -> None:
    """Build the app's request log, rolling metrics, recent requests and switches (for the status page)
    and (when metrics are on) Prometheus registry, and add the two routes. The request log's writer starts
    and stops with the app."""
    rolling = RollingMetrics(config.metrics_window_s)
    rlog = RequestLog(config.log_path, config.max_log_bytes)
    swaps = SwapMetrics()
    keys.scheduler(app).listeners.append(swaps.on_event)
    app[keys.METRICS] = rolling
    app[keys.REQUEST_LOG] = rlog
    app[keys.SWAPS] = swaps
    recent = RecentActivity()
    keys.scheduler(app).listeners.append(recent.on_event)
    app[keys.RECENT] = recent
    if config.enable_metrics:
        app[keys.PROMETHEUS] = PromMetrics(rolling, rlog, swaps, lambda: present_state(app))
    app.router.add_get("/v1/metrics", metrics_json, name="metrics")
    app.router.add_get("/metrics", prometheus_text, name="prometheus")
    app.cleanup_ctx.append(lifetime)
