"""``GET /v1/metrics`` (JSON) and ``GET /metrics`` (Prometheus text), when ``CHAT_PROXY_ENABLE_METRICS=1``."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from imageworks_proxy import __version__, keys
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.http.responses import json_response
from imageworks_proxy.http.views.info import vllm_state
from imageworks_proxy.observability.metrics import RollingMetrics, orchestrator_stats, swap_summary
from imageworks_proxy.observability.prometheus import PromMetrics
from imageworks_proxy.observability.requestlog import RequestLog, lifetime

ORCHESTRATED = "vllm-orchestrated"


def _disabled() -> ProxyError:
    return ProxyError(
        404, "metrics_disabled",
        "Metrics are disabled. Set CHAT_PROXY_ENABLE_METRICS=1 to serve /v1/metrics and /metrics.",
    )


def _active_name(active: Any) -> str | None:
    if isinstance(active, dict):
        active = active.get("logical_name") or active.get("name") or active.get("model")
    return str(active) if active else None


def present_state(app: web.Application) -> dict[str, Any]:
    """What the orchestrator and the GPU say right now (read on each metrics request, never per chat)."""
    vllm = vllm_state(app)
    return {
        "swaps": orchestrator_stats(keys.models(app).adapters.get(ORCHESTRATED)),
        "vllm": vllm,
        "active_model": _active_name(vllm.get("active")),
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
    swaps = state["swaps"]
    return {
        "object": "metrics",
        "version": __version__,
        "schema_version": config.schema_version,
        "uptime_s": round(time.monotonic() - app[keys.STARTED_AT], 3),
        **window,
        "queue_depth": swaps.queue_depth if swaps.queue_depth is not None else 0,
        "swaps": swap_summary(swaps),
        "vllm": {"active_model": state["active_model"], "state": state["vllm"].get("state")},
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
    """Build the app's request log, rolling metrics and (when metrics are on) Prometheus registry,
    and add the two routes. The request log's writer starts and stops with the app."""
    rolling = RollingMetrics(config.metrics_window_s)
    rlog = RequestLog(config.log_path, config.max_log_bytes)
    app[keys.METRICS] = rolling
    app[keys.REQUEST_LOG] = rlog
    if config.enable_metrics:
        app[keys.PROMETHEUS] = PromMetrics(rolling, rlog, lambda: present_state(app))
    app.router.add_get("/v1/metrics", metrics_json, name="metrics")
    app.router.add_get("/metrics", prometheus_text, name="prometheus")
    app.cleanup_ctx.append(lifetime)
