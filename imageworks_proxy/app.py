"""The application factory: ``create_app(config)`` builds a self-contained aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.catalogue.idstore import IdStore
from imageworks_proxy.catalogue.registry import RegistryStore
from imageworks_proxy.catalogue.service import ModelService
from imageworks_proxy.config import Config, load_config
from imageworks_proxy.gpu.nvml import Gpu
from imageworks_proxy.gpu.scheduler import GpuScheduler
from imageworks_proxy.http.guards import browser_guard, cors_headers
from imageworks_proxy.http.limits import body_limits, defer_continue
from imageworks_proxy.http.middlewares import access_log_middleware, auth_middleware, error_middleware
from imageworks_proxy.http.views import chat, completions, embeddings, info
from imageworks_proxy.http.views import metrics as metrics_views
from imageworks_proxy.http.views import status as status_views
from imageworks_proxy.pipeline.stage import Pipeline, Stage
from imageworks_proxy.plugins import (
    PluginError,
    PluginManager,
    call_each,
    collect,
    make_plugin_manager,
    unique_by_name,
)
from imageworks_proxy.upstream.autostart import autostart_ctx
from imageworks_proxy.upstream.client import UpstreamClient
from imageworks_proxy.upstream.process import url_host
from imageworks_proxy.vllm.lock import StateLock

log = logging.getLogger("imageworks_proxy")


def _build_adapters(app: web.Application, config: Config, pm: PluginManager) -> dict[str, Adapter]:
    adapters: dict[str, Adapter] = {}
    for name, (plugin_name, cls) in unique_by_name(collect(pm, "register_backends"), "adapter").items():
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise PluginError(f"plugin {plugin_name!r} registered {cls!r}, which is not an Adapter subclass")
        adapter = cls(app, config)
        adapter.plugin_name = plugin_name  # type: ignore[attr-defined]
        adapters[name] = adapter
    return adapters


def _build_pipeline(app: web.Application, config: Config, pm: PluginManager) -> Pipeline:
    stages: list[Stage] = []
    for _name, (plugin_name, cls) in unique_by_name(collect(pm, "register_stages"), "stage").items():
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise PluginError(f"plugin {plugin_name!r} registered {cls!r}, which is not a Stage subclass")
        stage = cls(app, config)
        stage.plugin_name = plugin_name  # type: ignore[attr-defined]
        stages.append(stage)
    return Pipeline(stages)


def _state_lock(config: Config) -> StateLock | None:
    """Take the vLLM state file for this app's life (docs/vllm.md, "One proxy per state file"), before any
    adapter looks at vLLM; raises :class:`~imageworks_proxy.vllm.lock.StateLockHeld` when another proxy
    (or ``imageworks-loader``) has it. Without single-port orchestration the file is not used: no lock."""
    if not config.vllm_single_port:
        return None
    lock = StateLock(config.vllm_state_path)
    lock.acquire({
        "pid": os.getpid(),
        "program": "imageworks-chat-proxy",
        "url": f"http://{url_host(config.host)}:{config.port}",
    })
    return lock


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Every resource with a lifetime: the state-file lock, the pooled client session, NVML, adapters, the
    registry watcher, the remembered model ids."""
    lock = _state_lock(app[keys.CONFIG])
    try:
        async for _ in _running(app):
            yield
    finally:
        if lock is not None:
            lock.release()


async def _running(app: web.Application) -> AsyncIterator[None]:
    """What :func:`_resources` runs once the lock is held."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
    # No session-wide timeout: each call sets its own (backend timeout, stream idle timeout).
    app[keys.HTTP] = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=True, trust_env=False
    )
    app[keys.UPSTREAM] = UpstreamClient()
    gpu = keys.gpu(app)
    await asyncio.to_thread(gpu.open)
    models = keys.models(app)
    started: list[Adapter] = []
    watcher: asyncio.Task[None] | None = None
    tenancy = app[keys.TENANCY]
    try:
        start_tenancy = getattr(tenancy, "start", None)
        if start_tenancy is not None:
            await start_tenancy()
        for adapter in models.adapters.values():
            await adapter.start()
            started.append(adapter)
        watcher = asyncio.get_running_loop().create_task(models.store.watch(), name="registry-watcher")
        if models.ids is not None:
            await models.ids.start()
        yield
    finally:
        if models.ids is not None:
            await models.ids.close()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        # Fail waiting requests and cancel a model start in progress before the adapters stop their processes.
        close_tenancy = getattr(tenancy, "close", None)
        if close_tenancy is not None:
            try:
                await close_tenancy()
            except Exception:
                log.exception("GPU tenancy failed to close cleanly")
        for adapter in reversed(started):
            try:
                await adapter.close()
            except Exception:
                log.exception("adapter %s failed to close cleanly", adapter.name)
        await app[keys.UPSTREAM].close()
        await app[keys.HTTP].close()
        gpu.close()


def create_app(
    config: Config | None = None,
    *,
    plugin_manager: PluginManager | None = None,
    load_entrypoints: bool = True,
) -> web.Application:
    """Build the proxy as an aiohttp application.

    ``config`` defaults to :func:`~imageworks_proxy.config.load_config` on the environment.
    ``plugin_manager`` defaults to :func:`~imageworks_proxy.plugins.make_plugin_manager` (entry points
    scanned unless ``load_entrypoints`` is false). The app works standalone and mounted with
    ``parent.add_subapp("/prefix", create_app(cfg))``; its resources start and stop with it.
    Raises :class:`~imageworks_proxy.plugins.PluginError` when plugins register clashing names.
    """
    config = config if config is not None else load_config()
    if plugin_manager is None:
        plugin_manager = make_plugin_manager(load_entrypoints=load_entrypoints)
    pm = plugin_manager
    app = web.Application(
        # Outermost first. Host and Origin before keys (a CORS preflight carries no key), keys before the
        # body is read. Without any keys the auth middleware would only pass every request on: left out.
        middlewares=[access_log_middleware, error_middleware, browser_guard(config)]
        + ([auth_middleware] if config.api_keys or config.admin_keys else [])
        + [body_limits(config)],
        client_max_size=config.max_body_bytes,
        # request bodies are inflated by the views (http/bodies.py): a corrupt one is then one 400
        handler_args={"auto_decompress": False},
    )
    if config.allowed_origins:
        app.on_response_prepare.append(cors_headers(config))
    app[keys.CONFIG] = config
    app[keys.PLUGINS] = pm
    app[keys.STARTED_AT] = time.monotonic()
    app[keys.GPU] = Gpu()
    app[keys.TENANCY] = GpuScheduler(
        max_queue=config.vllm_max_queue,
        exclusive=config.gpu_exclusive,
        backoff_s=config.vllm_failure_backoff_s,
    )
    store = RegistryStore(config.registry, config.registry_poll_s)
    models = ModelService(config, store, IdStore(config.names_path))
    app[keys.MODELS] = models
    models.set_adapters(_build_adapters(app, config, pm))
    metrics_views.install(app, config)  # request log + metrics, before the stages that feed them
    app[keys.PIPELINE] = _build_pipeline(app, config, pm)
    store.load_initial()

    app.router.add_get("/v1/health", info.health, name="health")
    app.router.add_get("/v1/models", info.list_models, name="models")
    app.router.add_get("/v1/plugins", info.list_plugins, name="plugins")
    app.router.add_post(
        "/v1/chat/completions", chat.chat_completions, name="chat", expect_handler=defer_continue
    )
    app.router.add_post(
        "/v1/embeddings", embeddings.embeddings, name="embeddings", expect_handler=defer_continue
    )
    app.router.add_post(
        "/v1/completions", completions.completions, name="completions", expect_handler=defer_continue
    )
    status_views.install(app)  # the status page at / and GET /v1/status
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(autostart_ctx)
    call_each(pm, "startup", app=app)
    return app
