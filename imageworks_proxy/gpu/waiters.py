"""The queue of requests waiting for the GPU scheduler (:mod:`imageworks_proxy.gpu.scheduler`), and the
leases it grants."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterator, Mapping
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
    #: Why, when it is not a request's (``"idle"``: the idle unload); kept in the swap record.
    reason: str | None = None

    @property
    def key(self) -> str | None:
        return self.tenant.key if self.tenant is not None else None

    def vacates(self, tenant: Tenant) -> bool:
        """For a vacate: whether ``tenant`` is one it stops."""
        return (self.vacate or everything)(tenant)


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

    def abandon(self, waiter: Waiter) -> bool:
        """The waiting request went away (disconnect, cancel): leave the queue, or give back a lease
        that was granted in the same instant. Returns whether a wait was cut short."""
        self.remove(waiter)
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            lease = fut.result()
            if lease is not None:
                lease.release()
        elif not fut.done():
            fut.cancel()
            return True
        return False

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


def to_evict(head: Waiter, active: Tenant | None, residents: Mapping[str, Tenant]) -> list[Tenant]:
    """The tenants ``head`` needs gone: the ``active`` one and every resident that is not the target (for
    a vacate, only those it names)."""
    target = head.tenant
    evict = [active] if active is not None and (target is None or active.key != target.key) else []
    evict += [
        t
        for k, t in list(residents.items())
        if (target is None or k != target.key) and (active is None or k != active.key)
    ]
    if target is None:
        evict = [t for t in evict if head.vacates(t)]
    return evict
