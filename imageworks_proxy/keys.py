"""Typed application keys and the accessors the rest of the code uses to reach app resources."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import ClientSession, web

if TYPE_CHECKING:
    from imageworks_proxy.catalogue.service import ModelService
    from imageworks_proxy.config import Config
    from imageworks_proxy.gpu.nvml import Gpu
    from imageworks_proxy.gpu.scheduler import GpuScheduler
    from imageworks_proxy.observability.metrics import RollingMetrics
    from imageworks_proxy.observability.prometheus import PromMetrics
    from imageworks_proxy.observability.recent import RecentActivity
    from imageworks_proxy.observability.requestlog import RequestLog
    from imageworks_proxy.observability.swaps import SwapMetrics
    from imageworks_proxy.pipeline.stage import Pipeline
    from imageworks_proxy.plugins import PluginManager
    from imageworks_proxy.upstream.client import UpstreamClient

CONFIG: web.AppKey[Config] = web.AppKey("config")
PLUGINS: web.AppKey[PluginManager] = web.AppKey("plugins")
MODELS: web.AppKey[ModelService] = web.AppKey("models")
PIPELINE: web.AppKey[Pipeline] = web.AppKey("pipeline")
#: The control plane's client session: health checks, model listings, admin routes.
HTTP: web.AppKey[ClientSession] = web.AppKey("http")
#: The data plane's client: forwarded chat, text completions and embeddings (upstream/client.py).
UPSTREAM: web.AppKey[UpstreamClient] = web.AppKey("upstream")
GPU: web.AppKey[Gpu] = web.AppKey("gpu")
STARTED_AT: web.AppKey[float] = web.AppKey("started_at")
#: The GPU scheduler; plugins reach it through :func:`imageworks_proxy.tenancy` (the ``Tenancy`` protocol).
TENANCY: web.AppKey[GpuScheduler] = web.AppKey("tenancy")
METRICS: web.AppKey[RollingMetrics] = web.AppKey("metrics")
REQUEST_LOG: web.AppKey[RequestLog] = web.AppKey("request_log")
SWAPS: web.AppKey[SwapMetrics] = web.AppKey("swaps")
#: The last requests (summaries, never any prompt text) and model switches, for the status page.
RECENT: web.AppKey[RecentActivity] = web.AppKey("recent")
#: Present only when CHAT_PROXY_ENABLE_METRICS=1.
PROMETHEUS: web.AppKey[PromMetrics] = web.AppKey("prometheus")
#: Set by the command-line server: ``(level, format, args) -> taken`` queues an access line straight to its
#: log writer, without a LogRecord, when that writer is the line's only destination (cli/logs.py).
ACCESS_LINES: web.AppKey[Callable[[int, str, tuple[Any, ...]], bool]] = web.AppKey("access_lines")


# Per-request storage: typed RequestKeys on aiohttp versions that have them (3.14+), plain strings before.
if hasattr(web, "RequestKey"):
    REQUEST_ID = web.RequestKey("request_id", str)
    CHAT_CONTEXT = web.RequestKey("chat_context", object)
    #: The client sent ``Expect: 100-continue`` and waits for it (http/limits.py sends it after the checks).
    CONTINUE_PENDING = web.RequestKey("continue_pending", bool)
else:  # pragma: no cover - older aiohttp
    REQUEST_ID = "request_id"  # type: ignore[assignment]
    CHAT_CONTEXT = "chat_context"  # type: ignore[assignment]
    CONTINUE_PENDING = "continue_pending"  # type: ignore[assignment]


def config(app: web.Application) -> Config:
    return app[CONFIG]


def plugins(app: web.Application) -> PluginManager:
    return app[PLUGINS]


def models(app: web.Application) -> ModelService:
    return app[MODELS]


def pipeline(app: web.Application) -> Pipeline:
    return app[PIPELINE]


def http(app: web.Application) -> ClientSession:
    return app[HTTP]


def upstream(app: web.Application) -> UpstreamClient:
    return app[UPSTREAM]


def gpu(app: web.Application) -> Gpu:
    return app[GPU]


def scheduler(app: web.Application) -> GpuScheduler:
    return app[TENANCY]


def metrics(app: web.Application) -> RollingMetrics:
    return app[METRICS]


def request_log(app: web.Application) -> RequestLog:
    return app[REQUEST_LOG]
