"""The queue of requests waiting for the GPU scheduler (:mod:`imageworks_proxy.gpu.scheduler`), and the
leases it grants."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from imageworks_proxy.gpu.tenancy import Tenant


@attrs.define(eq=False)
class Waiter:
    """One waiting request: for a tenant's lease, or (``tenant`` None) for a vacate of the GPU."""

    tenant: Tenant | None
    future: asyncio.Future[Any]
    enqueued: float
    force: bool = False
    #: For a vacate: which tenants to stop.
    vacate: Callable[[Tenant], bool] | None = None

    @property
    def key(self) -> str | None:
        return self.tenant.key if self.tenant is not None else None


class WaitQueue:
    """Waiters in arrival order. Settled waiters (future done) are dropped when the queue is walked."""

    def __init__(self) -> None:
        self._items: collections.deque[Waiter] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._items)

    @property
    def head(self) -> Waiter:
        return self._items[0]

    def append(self, waiter: Waiter) -> None:
        self._items.append(waiter)

    def remove(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._items.remove(waiter)

    def prune(self) -> None:
        if any(w.future.done() for w in self._items):
            self._items = collections.deque(w for w in self._items if not w.future.done())

    def depth(self) -> int:
        """Waiters still waiting."""
        return sum(1 for w in self._items if not w.future.done())

    def waiting_for(self, key: str) -> int:
        return sum(1 for w in self._items if w.key == key and not w.future.done())

    def settle(self, key: str, outcome: Callable[[Waiter], None]) -> None:
        """Apply ``outcome`` (set a lease or an error) to every waiter for tenant ``key``, together, and
        drop them and any already settled waiter from the queue."""
        keep: collections.deque[Waiter] = collections.deque()
        for w in self._items:
            if w.future.done():
                continue
            if w.key == key:
                outcome(w)
            else:
                keep.append(w)
        self._items = keep

    def fail_all(self, error: BaseException) -> None:
        for w in self._items:
            if not w.future.done():
                w.future.set_exception(error)
        self._items.clear()


class GrantedLease:
    """A lease on the active tenant; :meth:`release` is idempotent. ``generation`` identifies the tenant's
    run: a lease on a run that is over (the tenant was lost and restarted) releases nothing."""

    __slots__ = ("_generation", "_release", "_released", "tenant")

    def __init__(self, release: Callable[[int], None], tenant: Tenant, generation: int) -> None:
        self._release = release
        self._generation = generation
        self._released = False
        self.tenant = tenant

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self._generation)


def everything(tenant: Tenant) -> bool:
    """The vacate predicate that matches every tenant."""
    return True
