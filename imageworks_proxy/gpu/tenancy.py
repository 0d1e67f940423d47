"""GPU tenancy: who may use the GPU right now.

Adapters whose backend occupies the GPU (orchestrated vLLM, Ollama when ``CHAT_PROXY_GPU_EXCLUSIVE=1``,
plugin-managed servers) take a lease for a :class:`Tenant` around each request. The implementation that
drains, switches and evicts tenants is installed on the app under ``keys.TENANCY``; this module holds the
contract.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from aiohttp import web

    from imageworks_proxy.adapters.base import ChatCall


@attrs.frozen
class Tenant:
    """Something that can hold the GPU.

    ``key`` identifies it (``"vllm:<logical name>"``, ``"ollama"``, ``"<plugin>:<logical name>"``).
    ``start`` runs when it becomes the active tenant (after the previous one was evicted) and raises
    ``ProxyError`` on failure; ``stop`` evicts it (stop the process, unload the models). Either may be None.
    ``revision`` identifies what ``start`` would launch (e.g. a hash of the command line): after a failed
    start the tenant is not started again for a backoff period unless its revision changed.
    ``exclusive`` tenants always take the GPU one at a time, even with ``CHAT_PROXY_GPU_EXCLUSIVE=0``:
    servers the proxy launches that claim most of the GPU memory or bind the shared port (vLLM,
    llama.cpp). With ``CHAT_PROXY_GPU_EXCLUSIVE=1`` every tenant is scheduled that way.
    ``model`` is the logical name of the registry entry the tenant serves, when it serves one model
    (shown as the active model in the metrics).
    ``idle_unload_s`` > 0: once the tenant is active and has had no lease and nobody waiting for it for
    that many seconds, the scheduler stops it (its ``stop``) to free the GPU; the next request starts it
    again. 0 (the default): never.
    """

    key: str
    label: str
    start: Callable[[], Awaitable[None]] | None = attrs.field(default=None, eq=False)
    stop: Callable[[], Awaitable[None]] | None = attrs.field(default=None, eq=False)
    revision: str | None = attrs.field(default=None, eq=False)
    exclusive: bool = attrs.field(default=False, eq=False)
    model: str | None = attrs.field(default=None, eq=False)
    idle_unload_s: float = attrs.field(default=0.0, eq=False)


class Lease(Protocol):
    def release(self) -> None:
        """Give the lease back (idempotent). Call it when the response, stream included, is over."""


class Tenancy(Protocol):
    async def acquire(self, tenant: Tenant, call: ChatCall) -> Lease:
        """Wait until ``tenant`` is the active GPU tenant and return a lease on it.

        Awaits ``call.waiting()`` before any wait. Raises ``ProxyError`` (429 ``queue_full``,
        503 ``model_start_failed``, 504 ``model_start_timeout``, ...).
        """
        ...

    def add_resident(self, tenant: Tenant) -> None:
        """Record that ``tenant`` may hold GPU memory although it is not active (e.g. a server that ran
        before the proxy started): its ``stop`` runs before another tenant is started."""
        ...


class NoLease:
    """The lease of a tenant that needs no exclusivity: releasing it does nothing."""

    def release(self) -> None:
        pass


def tenancy(app: web.Application) -> Tenancy:
    from imageworks_proxy import keys

    return app[keys.TENANCY]
