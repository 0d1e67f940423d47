"""Built-in adapter plugin: vLLM models started and switched on demand on one port.

Each chat request takes a lease on the (exclusive) GPU tenant ``vllm:<logical name>`` from the app's
scheduler; the scheduler drains, stops and starts models, and this adapter's
:class:`~imageworks_proxy.vllm.supervisor.VllmSupervisor` does the process work. With sleep mode
(``CHAT_PROXY_VLLM_SLEEP_LEVEL`` 1 or 2) a tenant's stop puts its vLLM to sleep and its start wakes it
(docs/vllm.md). With the lease held, the request is forwarded exactly like ``vllm-external`` to the awake
vLLM (``http://<VLLM_HOST>:<its port>/v1``); the lease is given back when the response, stream included,
is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import ChatCall, ChunkStream, Completion, Embeddings, HeldStream
from imageworks_proxy.adapters.vllm_external import VllmExternalAdapter
from imageworks_proxy.catalogue.capabilities import Capabilities
from imageworks_proxy.catalogue.registry import Entry, Registry
from imageworks_proxy.catalogue.service import model_kind
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.scheduler import GpuScheduler
from imageworks_proxy.gpu.tenancy import Lease, Tenant
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.pipeline.template import check_template
from imageworks_proxy.vllm.command import build_command, launch_capabilities, without_port
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
        self._restarts: set[asyncio.Task[Any]] = set()
        #: Models to stop rather than put to sleep while a vacate is under way (None: every model).
        self._retiring: dict[object, set[str] | None] = {}
        #: Entry name -> (the entry, what its launch flags say): asked before every request.
        self._launch_capabilities: dict[str, tuple[Entry, Capabilities | None]] = {}

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

    def not_installed_reason(self, entry: Entry) -> str:
        return f"not installed: {entry.backend_config.model_path} not found"

    def entry_problem(self, entry: Entry) -> str | None:
        try:
            build_command(self.config, entry)
        except ProxyError as exc:
            return exc.message
        return None

    async def check_upstreams(self, entries: Sequence[Entry]) -> dict[str, bool]:
        return {}  # it starts its server itself; the models' status says whether one runs

    def model_status(self, entry: Entry) -> str | None:
        return self.supervisor.status_of(entry.name)

    async def capabilities(self, entry: Entry) -> Capabilities | None:
        """From the flags the entry's vLLM is (or would be) started with (worked out once per entry)."""
        known = self._launch_capabilities.get(entry.name)
        if known is not None and known[0] is entry:
            return known[1]
        try:
            says = launch_capabilities(build_command(self.config, entry).flags)
        except ProxyError:
            says = None
        self._launch_capabilities[entry.name] = (entry, says)
        return says

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def scheduler(self) -> GpuScheduler:
        return keys.scheduler(self.app)

    async def start(self) -> None:
        await super().start()
        if not self.config.vllm_single_port:
            return  # nothing is routed here; leave any recorded vLLM alone
        sched = self.scheduler
        for inst in await self.supervisor.adopt():
            if inst.asleep:
                continue  # sleepers hold no GPU memory: nothing to schedule
            tenant = self._tenant_for_name(inst.logical_name)
            # healthy: serve it at once; still loading: the first request's start waits for its readiness;
            # a second awake one (a switch cut short) is put to sleep or stopped before the next start
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
        """The registry was edited: if the awake model's command changed, restart it (after its in-flight
        requests finish) so the edit applies without restarting the proxy; sleeping models whose command
        changed, or whose entry is gone, are stopped (a request starts them afresh)."""
        sup = self.supervisor
        for inst in sup.sleepers:
            if self._identity(registry, inst.logical_name) != inst.identity:
                self._background(sup.stop_model(inst.logical_name, "registry entry changed or removed"),
                                 f"stop-{inst.logical_name}")
        inst = sup.instance
        if inst is None or not inst.ready or inst.asleep:
            return
        identity = self._identity(registry, inst.logical_name)
        if identity is None or identity == inst.identity:
            return  # unchanged, or removed from the registry: keep serving what runs
        key = TENANT_PREFIX + inst.logical_name
        log.info(
            "vLLM: the registry entry of running model %r changed; restarting it once in-flight "
            "requests finish",
            inst.logical_name,
        )
        self._background(self._vacate({inst.logical_name}, lambda t: t.key == key), f"restart-{key}")

    def _identity(self, registry: Registry, name: str) -> tuple[str, ...] | None:
        entry = registry.by_name.get(name)
        if entry is None:
            return None
        try:
            return without_port(build_command(self.config, entry).flags)
        except ProxyError:
            return None

    def _background(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _vacate(self, names: set[str] | None, predicate: Any) -> None:
        """Vacate the GPU tenants ``predicate`` names, stopping (not putting to sleep) models ``names``
        (every model when None) that are evicted meanwhile."""
        token = object()
        self._retiring[token] = names
        try:
            await self.scheduler.vacate(predicate)
        finally:
            del self._retiring[token]

    def _retired(self, name: str) -> bool:
        """Whether model ``name`` is to be stopped rather than put to sleep when it is evicted now."""
        if keys.models(self.app).store.registry.by_name.get(name) is None:
            return True  # nothing could ask for it again
        return any(names is None or name in names for names in self._retiring.values())

    # -- tenants -------------------------------------------------------------------------------
    def tenant(self, entry: Entry) -> Tenant:
        """The GPU tenant for ``entry``: starting it wakes its sleeping vLLM or launches (or reuses) one;
        stopping it puts vLLM to sleep (sleep mode) or stops it."""
        cmd = build_command(self.config, entry)
        revision = hashlib.sha1("\0".join(cmd.flags).encode()).hexdigest()[:16]

        async def start() -> dict[str, Any]:
            outcome = await self.supervisor.bring_up(entry)
            return {"kind": "wake" if outcome.action == "wake" else "cold", "engine_s": outcome.engine_s}

        return Tenant(
            TENANT_PREFIX + entry.name,
            f"vLLM model {entry.name!r}",
            start=start,
            stop=self._stopper(entry.name),
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
            stop=self._stopper(name),
            exclusive=True,
            model=name,
            idle_unload_s=self.config.vllm_idle_unload_s,
        )

    def _stopper(self, name: str) -> Any:
        async def stop() -> dict[str, Any]:
            # an idle unload frees the GPU and host memory: the model is stopped, never put to sleep
            idle = self.scheduler.stop_reason == "idle"
            target = None if idle else self.scheduler.switching_to
            outcome = await self.supervisor.evict(
                name,
                "idle for CHAT_PROXY_VLLM_IDLE_UNLOAD_S" if idle else "GPU needed by another model",
                sleep=not idle and not self._retired(name),
                keep=target.model if target is not None and is_vllm_tenant(target) else None,
            )
            return {"evicted": outcome.action, "engine_s": outcome.engine_s}

        return stop

    def _on_exit(self, inst: Instance, code: int | None, line: str | None) -> None:
        if not inst.asleep:
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
            return HeldStream(result, lease.release, on_error=self._stream_failed)

    async def _stream_failed(self, exc: ProxyError) -> None:
        await self.supervisor.check()  # a stream that broke may mean vLLM died: notice it now

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

    async def activate(self, entry: Entry) -> dict[str, Any]:
        """Make ``entry`` the active model (waiting for in-flight requests on another one to finish),
        ignoring a start-failure backoff. Returns :meth:`public_state`."""
        if self.config.require_template and model_kind(entry) == "chat":  # embedding models need none
            check_template(entry)
        lease = await self.acquire(entry, _Activation(), force=True)
        lease.release()
        return self.public_state()

    async def deactivate(self, model: str | None = None) -> dict[str, Any]:
        """Stop vLLM model ``model`` (awake: once its in-flight requests are done; asleep: at once), or
        with None every vLLM model, awake and asleep. Returns :meth:`public_state`."""
        if model is None:
            await self._vacate(None, is_vllm_tenant)
            await self.supervisor.stop_all("stopped through the admin API")
        else:
            key = TENANT_PREFIX + model
            await self._vacate({model}, lambda t: t.key == key)
            await self.supervisor.stop_model(model, "stopped through the admin API")
        return self.public_state()

    async def sleep(self, model: str | None = None) -> dict[str, Any]:
        """Put the awake vLLM model to sleep once its in-flight requests are done (sleep mode); ``model``,
        when given, must be that model or already asleep. Returns :meth:`public_state`. Raises
        ``ProxyError`` 409 ``sleep_disabled`` with ``CHAT_PROXY_VLLM_SLEEP_LEVEL=0`` and 409
        ``model_not_awake`` for a model that is neither awake nor asleep."""
        if not self.config.vllm_sleep_level:
            raise ProxyError(
                409, "sleep_disabled",
                "vLLM sleep mode is off; set CHAT_PROXY_VLLM_SLEEP_LEVEL=1 or 2 to put models to sleep.",
            )
        sup = self.supervisor
        if model is not None and sup.status_of(model) == "asleep":
            return self.public_state()
        inst = sup.instance
        if model is not None and (inst is None or inst.logical_name != model):
            raise ProxyError(409, "model_not_awake", f"vLLM model {model!r} is not the awake model.")
        if inst is not None:
            key = TENANT_PREFIX + inst.logical_name
            await self.scheduler.vacate(lambda t: t.key == key)
        return self.public_state()

    # -- state ---------------------------------------------------------------------------------
    def public_state(self) -> dict[str, Any]:
        """``{"active": logical name or None, "state": "stopped"|"loading"|"loaded"|"draining"|"sleeping"|
        "waking"|"stopping", ..., "sleeping": [sleeping models], "idle_unload_s": the idle limit or None,
        "idle_unload_in_s": seconds until the idle model is stopped or None}`` for ``/v1/health`` and the
        admin API. Never does I/O."""
        sup = self.supervisor
        inst = sup.instance
        sched = self.scheduler
        active, state = self._active_state()
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
        out["sleep_level"] = self.config.vllm_sleep_level
        out["sleeping"] = [
            {
                "model": s.logical_name,
                "served_model_id": s.served_model_id,
                "pid": s.pid,
                "port": s.port,
                "sleep_level": s.sleep_level,
                "asleep_since": s.asleep_since,
                "adopted": s.adopted,
            }
            for s in sup.sleepers
        ]
        out["idle_unload_s"] = self.config.vllm_idle_unload_s or None
        # seconds until the running model is stopped for idleness; None: no such stop is pending
        out["idle_unload_in_s"] = sched.idle.remaining_s(TENANT_PREFIX + active) if active else None
        return out

    def _active_state(self) -> tuple[str | None, str]:
        sup = self.supervisor
        inst = sup.instance
        if sup.starting is not None:
            return sup.starting, "loading"
        if inst is None:
            return None, "stopped"
        sched = self.scheduler
        if inst.stopping:
            state = "stopping"
        elif inst.transition is not None:
            state = inst.transition  # "sleeping" or "waking"
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
        return inst.logical_name, state

    def stats(self) -> dict[str, Any]:
        """Metrics for observability: the scheduler's counters (swaps, failures, recent swap durations,
        queue depth, in-flight) plus vLLM launches, wake-ups and sleeps, and the public state."""
        out: dict[str, Any] = dict(self.scheduler.stats())
        out["vllm_launches"] = self.supervisor.launches
        out["vllm_wakes"] = self.supervisor.wakes
        out["vllm_sleeps"] = self.supervisor.sleeps
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
