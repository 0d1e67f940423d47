"""Built-in adapter plugin: vLLM models started and switched on demand on one port.

Each chat request takes a lease on the (exclusive) GPU tenant ``vllm:<logical name>`` from the app's
scheduler; the scheduler drains, stops and starts models, and this adapter's
:class:`~imageworks_proxy.vllm.supervisor.VllmSupervisor` does the process work. With the lease
held, the request is forwarded exactly like ``vllm-external`` to ``http://<VLLM_HOST>:<VLLM_PORT>/v1``;
the lease is given back when the response, stream included, is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import ChatCall, ChunkStream, Completion, Embeddings
from imageworks_proxy.adapters.vllm_external import VllmExternalAdapter
from imageworks_proxy.catalogue.registry import Entry, Registry
from imageworks_proxy.catalogue.service import model_kind
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.scheduler import GpuScheduler
from imageworks_proxy.gpu.tenancy import Lease, Tenant
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.pipeline.template import check_template
from imageworks_proxy.vllm.command import build_command
from imageworks_proxy.vllm.supervisor import Instance, VllmSupervisor

log = logging.getLogger("imageworks_proxy.orchestrator")

TENANT_PREFIX = "vllm:"
#: How many 20 ms looks at the process after a failed upstream call before deciding it is alive.
DEATH_POLLS = 15


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~"))


def is_vllm_tenant(tenant: Tenant) -> bool:
    return tenant.key.startswith(TENANT_PREFIX)


class _Activation:
    """The ``ChatCall`` stand-in for an explicit activation (admin API): nothing to commit while waiting."""

    queue_ms = 0.0

    async def waiting(self) -> None:
        pass


class VllmOrchestratedAdapter(VllmExternalAdapter):
    name = "vllm-orchestrated"
    backends = ("vllm",)
    description = "vLLM started by the proxy, one model at a time on CHAT_PROXY_VLLM_PORT"
    state_key = "vllm"
    uses_autostart = False  # it starts vLLM itself
    requires_chat_template = True  # vLLM refuses chat without a template

    def __init__(self, app: web.Application, config: Config) -> None:
        super().__init__(app, config)
        self.supervisor = VllmSupervisor(config, lambda: keys.http(app), keys.gpu(app), self._on_exit)
        self._restarts: set[asyncio.Task[None]] = set()

    # -- routing and listing -------------------------------------------------------------------
    def accepts(self, entry: Entry) -> bool:
        return self.config.vllm_single_port and not entry.backend_config.base_url

    def installed(self, entry: Entry) -> bool | None:
        if entry.download_path:
            return None  # the default rule (cached stat of download_path)
        path = entry.backend_config.model_path
        if path and _looks_local(path):
            return os.path.exists(os.path.expanduser(path))
        return True  # a hub id: vLLM fetches it itself

    def model_status(self, entry: Entry) -> str | None:
        return self.supervisor.status_of(entry.name)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def scheduler(self) -> GpuScheduler:
        return keys.scheduler(self.app)

    async def start(self) -> None:
        await super().start()
        if not self.config.vllm_single_port:
            return  # nothing is routed here; leave any recorded vLLM alone
        sched = self.scheduler
        inst = await self.supervisor.adopt()
        if inst is not None:
            tenant = self._tenant_for_name(inst.logical_name)
            # healthy: serve it at once; still loading: the first request's start waits for its readiness
            if not (inst.ready and sched.adopt(tenant)):
                sched.add_resident(tenant)
        self.supervisor.start_monitor()
        keys.models(self.app).store.on_change.append(self._registry_changed)

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            keys.models(self.app).store.on_change.remove(self._registry_changed)
        for task in self._restarts:
            task.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        await self.supervisor.close(keep=self.config.vllm_keep_on_exit)
        await super().close()

    def _registry_changed(self, registry: Registry) -> None:
        """The registry was edited: if the running model's command changed, restart it (after its in-flight
        requests finish) so the edit applies without restarting the proxy."""
        inst = self.supervisor.instance
        sched = self.scheduler
        if inst is None or not inst.ready:
            return
        entry = registry.by_name.get(inst.logical_name)
        if entry is None:
            return  # removed from the registry: keep serving what runs until another model is needed
        try:
            flags = build_command(self.config, entry).flags
        except ProxyError:
            return
        if flags == inst.flags:
            return
        key = TENANT_PREFIX + inst.logical_name
        log.info(
            "vLLM: the registry entry of running model %r changed; restarting it once in-flight "
            "requests finish",
            inst.logical_name,
        )
        task = asyncio.get_running_loop().create_task(
            sched.vacate(lambda t: t.key == key), name=f"restart-{key}"
        )
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    # -- tenants -------------------------------------------------------------------------------
    def tenant(self, entry: Entry) -> Tenant:
        """The GPU tenant for ``entry``: starting it launches (or reuses) its vLLM; stopping it stops vLLM."""
        cmd = build_command(self.config, entry)
        revision = hashlib.sha1("\0".join(cmd.flags).encode()).hexdigest()[:16]

        async def start() -> None:
            await self.supervisor.ensure(entry)

        return Tenant(
            TENANT_PREFIX + entry.name,
            f"vLLM model {entry.name!r}",
            start=start,
            stop=self._stop,
            revision=revision,
            exclusive=True,  # one vLLM at a time: they share the port and most of the GPU memory
            model=entry.name,
            idle_unload_s=self.config.vllm_idle_unload_s,
        )

    def _tenant_for_name(self, name: str) -> Tenant:
        entry = keys.models(self.app).store.registry.by_name.get(name)
        if entry is not None:
            try:
                return self.tenant(entry)
            except ProxyError:
                pass
        return Tenant(
            TENANT_PREFIX + name,
            f"vLLM model {name!r}",
            stop=self._stop,
            exclusive=True,
            model=name,
            idle_unload_s=self.config.vllm_idle_unload_s,
        )

    async def _stop(self) -> None:
        await self.supervisor.stop("GPU needed by another model")

    def _on_exit(self, inst: Instance, code: int | None, line: str | None) -> None:
        self.scheduler.lost(TENANT_PREFIX + inst.logical_name)

    async def acquire(self, entry: Entry, call: Any, *, force: bool = False) -> Lease:
        """A lease on ``entry``'s vLLM (started or switched to first); the wait is added to
        ``call.queue_ms``."""
        tenant = self.tenant(entry)
        started = time.perf_counter()
        try:
            return await self.scheduler.acquire(tenant, call, force=force)
        finally:
            call.queue_ms += (time.perf_counter() - started) * 1000

    # -- chat ----------------------------------------------------------------------------------
    def _upstream(self) -> str:
        inst = self.supervisor.instance
        if inst is not None:
            return inst.base_url
        from imageworks_proxy.upstream.process import url_host

        return f"http://{url_host(self.config.vllm_host)}:{self.config.vllm_port}/v1"

    async def on_unreachable(self, call: ChatCall) -> bool:
        """Orchestrated entries never autostart; a refused connection is handled in
        :meth:`chat`."""
        return False

    def where(self, call: ChatCall) -> str:
        return f"vLLM for {call.entry.name!r}"

    async def _died(self) -> bool:
        """After a failed upstream call: did our vLLM die? (Then the failure was the crash, not the request.)
        A process that is exiting can close its sockets a moment before it can be reaped, so look briefly."""
        inst = self.supervisor.instance
        if inst is None:
            return True
        for _ in range(DEATH_POLLS):
            if not inst.poll():
                await self.supervisor.check()
                return True
            await asyncio.sleep(0.02)
        return False

    async def chat(self, call: ChatCall) -> Completion | ChunkStream:
        retried = False
        while True:
            lease = await self.acquire(call.entry, call)
            try:
                inst = self.supervisor.instance
                if inst is not None:
                    call.body["model"] = inst.served_model_id
                result = await self.forward(call, base_url=self._upstream())
            except ProxyError as exc:
                lease.release()
                if not retried and exc.status in (502, 503) and await self._died():
                    # vLLM died between requests: the next request restarts it, and that is this one
                    log.warning(
                        "vLLM for %r died before answering; starting it again for request %s",
                        call.entry.name,
                        call.request_id,
                    )
                    retried = True
                    continue
                raise
            except BaseException:
                lease.release()
                raise
            if isinstance(result, dict):
                lease.release()
                return result
            return self._hold(result, lease)

    async def embeddings(self, call: ChatCall) -> Embeddings:
        """Only for entries marked as embedding models: starting a chat model for an embeddings request
        would evict the running model just to be refused."""
        if "embedding" not in call.entry.capabilities:
            raise ProxyError(
                409,
                "capability_mismatch",
                f"Model {call.model!r} is not an embedding model: its registry entry does not list the "
                "\"embedding\" capability (vLLM serves embeddings from a model started with "
                "--runner pooling in backend_config.extra_args).",
                param="model",
            )
        return await super().embeddings(call)

    async def _hold(self, chunks: ChunkStream, lease: Lease) -> AsyncIterator[dict[str, Any]]:
        try:
            async for chunk in chunks:
                yield chunk
        except ProxyError:
            await self.supervisor.check()
            raise
        finally:
            lease.release()
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- control (admin API, imageworks-loader) ------------------------------------------------
    async def activate(self, entry: Entry) -> dict[str, Any]:
        """Make ``entry`` the active model (waiting for in-flight requests on another one to finish),
        ignoring a start-failure backoff. Returns :meth:`public_state`."""
        if self.config.require_template and model_kind(entry) == "chat":  # embedding models need none
            check_template(entry)
        lease = await self.acquire(entry, _Activation(), force=True)
        lease.release()
        return self.public_state()

    async def deactivate(self) -> dict[str, Any]:
        """Stop the active vLLM model once its in-flight requests are done. Returns :meth:`public_state`."""
        await self.scheduler.vacate(is_vllm_tenant)
        return self.public_state()

    # -- state ---------------------------------------------------------------------------------
    def public_state(self) -> dict[str, Any]:
        """``{"active": logical name or None, "state": "stopped"|"loading"|"loaded"|"draining"|"stopping",
        ..., "idle_unload_s": the idle limit or None, "idle_unload_in_s": seconds until the idle model is
        stopped or None}`` for ``/v1/health`` and the admin API. Never does I/O."""
        sup = self.supervisor
        inst = sup.instance
        sched = self.scheduler
        active: str | None = None
        state = "stopped"
        if sup.starting is not None:
            active, state = sup.starting, "loading"
        elif inst is not None:
            active = inst.logical_name
            if inst.stopping:
                state = "stopping"
            elif not inst.ready:
                state = "loading"
            elif (
                sched.phase == "draining"
                and sched.active is not None
                and sched.active.key == TENANT_PREFIX + inst.logical_name
            ):
                state = "draining"
            else:
                state = "loaded"
        out: dict[str, Any] = {
            "active": active,
            "state": state,
            "served_model_id": inst.served_model_id if inst is not None else None,
            "pid": inst.pid if inst is not None else None,
            "port": inst.port if inst is not None else self.config.vllm_port,
            "started_at": inst.started_at if inst is not None else None,
            "adopted": inst.adopted if inst is not None else False,
            "last_error": sup.last_error,
        }
        out["queue_depth"] = sched.queue_depth
        out["inflight"] = sched.inflight if sched.active is not None and is_vllm_tenant(sched.active) else 0
        out["idle_unload_s"] = self.config.vllm_idle_unload_s or None
        # seconds until the running model is stopped for idleness; None: no such stop is pending
        out["idle_unload_in_s"] = sched.idle.remaining_s(TENANT_PREFIX + active) if active else None
        return out

    def stats(self) -> dict[str, Any]:
        """Metrics for observability: the scheduler's counters (swaps, failures, recent swap durations,
        queue depth, in-flight) plus vLLM launches and the public state."""
        out: dict[str, Any] = dict(self.scheduler.stats())
        out["vllm_launches"] = self.supervisor.launches
        out["vllm"] = self.public_state()
        return out


def orchestrator(app: web.Application) -> VllmOrchestratedAdapter | None:
    """The app's orchestrated-vLLM adapter, or ``None`` when it is not loaded."""
    adapter = keys.models(app).adapters.get(VllmOrchestratedAdapter.name)
    return adapter if isinstance(adapter, VllmOrchestratedAdapter) else None


@hookimpl
def register_backends(register):
    register(VllmOrchestratedAdapter)


@hookimpl
def startup(app: web.Application) -> None:
    """The admin API of the orchestrator (``/v1/admin/vllm``), used by ``imageworks-loader``."""
    from imageworks_proxy.adapters import vllm_admin

    vllm_admin.add_routes(app)
