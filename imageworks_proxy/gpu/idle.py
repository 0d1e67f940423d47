"""Idle unload: the timer that lets the GPU scheduler stop its active tenant once it has been idle — no
lease held, nobody waiting — for the tenant's ``idle_unload_s`` (docs/vllm.md#idle-unload).

The timer only marks the unload as due and wakes the scheduler's driver; the driver checks that the tenant
is still idle and stops it, so an unload never races a request (:mod:`imageworks_proxy.gpu.scheduler`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from imageworks_proxy.gpu.tenancy import Tenant
from imageworks_proxy.gpu.waiters import Waiter

log = logging.getLogger("imageworks_proxy.orchestrator")


class IdleTimer:
    """One pending idle unload, for the active tenant of one scheduler."""

    def __init__(self, clock: Callable[[], float], wake: Callable[[], None]) -> None:
        self._clock = clock
        self._wake = wake
        self._handle: asyncio.TimerHandle | None = None
        #: The tenant whose unload is pending or due, and when it falls due (scheduler clock).
        self.key: str | None = None
        self.deadline: float | None = None
        #: The time ran out: the driver should stop ``key`` if it is still idle.
        self.due = False

    def update(self, idle: Tenant | None) -> Waiter | None:
        """The driver's check when nobody waits: ``idle`` is the active tenant when it is ready with nothing
        in flight, else ``None``. Starts counting for it, stops counting for a busy or replaced tenant,
        and once its time ran out returns the vacate that stops it, for the driver to run as a switch."""
        if idle is None or self.key not in (None, idle.key):
            self.cancel()
        if idle is None:
            return None
        if not self.due:
            self.arm(idle)
            return None
        self.cancel()
        key = idle.key
        log.info("GPU: %s was idle for %gs; stopping it to free the GPU", key, idle.idle_unload_s)
        future = asyncio.get_running_loop().create_future()
        # nobody awaits it: a failed stop is logged and recorded by the scheduler, so mark it as seen
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return Waiter(None, future, self._clock(), vacate=lambda t: t.key == key, reason="idle")

    def arm(self, tenant: Tenant) -> None:
        """Start counting ``tenant``'s idle time (no-op when it has no limit or the count already runs)."""
        if not tenant.idle_unload_s or self.key == tenant.key:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a lease released while the loop shuts down: nothing left to unload for
        self.cancel()
        self.key = tenant.key
        self.deadline = self._clock() + tenant.idle_unload_s
        self._handle = loop.call_later(tenant.idle_unload_s, self._expired)

    def cancel(self) -> None:
        """The tenant is busy again (a lease, a waiter) or gone: forget the pending unload."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.key = self.deadline = None
        self.due = False

    def remaining_s(self, key: str) -> float | None:
        """Seconds until ``key`` is unloaded for idleness; ``None`` when no unload is pending for it."""
        if self.key != key or self.deadline is None:
            return None
        return max(0.0, self.deadline - self._clock())

    def _expired(self) -> None:
        self._handle = None
        self.due = True
        self._wake()
