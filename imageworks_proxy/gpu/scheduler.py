"""GPU tenancy scheduler: who may use the GPU, and when to switch.

Tenants marked ``exclusive`` (servers the proxy launches: vLLM models, llama.cpp) are always scheduled;
with ``CHAT_PROXY_GPU_EXCLUSIVE=1`` every other GPU user (``ollama``, plugin servers) is too. The policy:

- requests for the active tenant run concurrently (a lease each);
- a request for another tenant waits, and from then on new requests for the active tenant queue too;
- the in-flight requests finish (drain), the old tenant is stopped, the new one started, and every queued
  request for it is admitted together;
- tenants are served in the order of their first waiting request (batching, no starvation, no thrash);
- requests for a tenant that is starting join that start; a cancelled wait leaves the queue;
- more than ``CHAT_PROXY_VLLM_MAX_QUEUE`` waiting requests → 429 ``queue_full``;
- a start failure reaches every waiter for that tenant; the tenant is then not restarted for a backoff
  period (doubling per consecutive failure) unless its ``revision`` changed or the start is forced;
- an active tenant with ``idle_unload_s`` is stopped once it has been idle (no lease, nobody waiting)
  that long (:mod:`imageworks_proxy.gpu.idle`).

One background task (the driver) makes every decision, so there is never a race between two switches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.backoff import StartBackoff
from imageworks_proxy.gpu.idle import IdleTimer
from imageworks_proxy.gpu.swaplog import SwapLog
from imageworks_proxy.gpu.tenancy import Lease, NoLease, Tenant
from imageworks_proxy.gpu.waiters import GrantedLease, Waiter, WaitQueue, to_evict

if TYPE_CHECKING:
    from imageworks_proxy.adapters.base import ChatCall

log = logging.getLogger("imageworks_proxy.orchestrator")


class Phase(StrEnum):
    """What the scheduler is doing with the GPU."""

    IDLE = "idle"  # no active tenant
    STARTING = "starting"  # the active tenant is being started
    READY = "ready"  # the active tenant serves requests
    DRAINING = "draining"  # another tenant waits: no new leases, in-flight requests finish
    STOPPING = "stopping"  # tenants are being evicted


IDLE, STARTING, READY, DRAINING, STOPPING = Phase


def _shutting_down() -> ProxyError:
    return ProxyError(503, "backend_unavailable", "The proxy is shutting down.", headers={"Retry-After": "5"})


class GpuScheduler:
    """The GPU tenancy implementation installed as ``app[keys.TENANCY]``
    (see :mod:`imageworks_proxy.gpu.tenancy`).

    ``exclusive`` is ``CHAT_PROXY_GPU_EXCLUSIVE``: when false only tenants marked ``exclusive`` are
    scheduled (servers the proxy launches: vLLM, llama.cpp) and the others pass straight through.
    """

    def __init__(
        self,
        *,
        max_queue: int,
        exclusive: bool = True,
        backoff_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_queue = max_queue
        self.exclusive = exclusive
        self.backoff = StartBackoff(backoff_s, clock)
        self._clock = clock
        self._active: Tenant | None = None
        self._phase = IDLE
        self._inflight = 0
        self._generation = 0
        self._waiters = WaitQueue()
        #: Tenants that may hold GPU memory although they are not active (adopted vLLM, Ollama at start-up).
        self._residents: dict[str, Tenant] = {}
        self._kick = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._closed = False
        self._switch_started: float | None = None
        #: The pending idle unload of the active tenant (``idle.remaining_s(key)`` for health pages).
        self.idle = IdleTimer(clock, self._kick.set)
        #: ``"idle"`` while the idle unload runs, else None: a ``stop`` then frees everything (no sleep).
        self.stop_reason: str | None = None
        self.swaplog = SwapLog()
        #: Called with a dict for every switch, start failure and stop (observability hooks in here).
        self.listeners = self.swaplog.listeners
        self._stats = self.swaplog.counters

    # -- public API ----------------------------------------------------------------------------
    def schedules(self, tenant: Tenant) -> bool:
        """Whether ``tenant`` goes through the scheduler (else it always gets a lease at once)."""
        return self.exclusive or tenant.exclusive

    async def acquire(self, tenant: Tenant, call: ChatCall | None = None, *, force: bool = False) -> Lease:
        """Wait until ``tenant`` is the active GPU tenant and return a lease on it.

        ``call.waiting()`` is awaited before any wait (streams get their SSE headers and keep-alives);
        the caller adds the wait to ``call.queue_ms`` (the adapters measure their whole wait). ``force``
        ignores a start-failure backoff (explicit activation). Raises ``ProxyError``: 429 ``queue_full``,
        503 ``model_start_failed``, 504 ``model_start_timeout``, 503 ``backend_unavailable`` when the
        proxy is shutting down.
        """
        if not self.schedules(tenant):
            return NoLease()
        self._check_open()
        if self._fast_path(tenant):
            return self._grant(tenant)
        if self._instant_switch(tenant):
            return self._grant(tenant)
        if not force:
            self._check_backoff(tenant)
        if len(self._waiters) >= self.max_queue:
            self._stats["rejected_queue_full"] += 1
            raise ProxyError(
                429,
                "queue_full",
                f"{len(self._waiters)} requests are already waiting for a model switch "
                f"(CHAT_PROXY_VLLM_MAX_QUEUE={self.max_queue}); try again shortly.",
                headers={"Retry-After": "5"},
            )
        waiter = Waiter(tenant, asyncio.get_running_loop().create_future(), self._clock(), force)
        return await self._wait(waiter, call)

    async def vacate(self, predicate: Callable[[Tenant], bool]) -> None:
        """Queue a request to stop every active or resident tenant matching ``predicate`` (after the
        waiters ahead of it were served and in-flight requests drained). Returns when done."""
        self._check_open()
        waiter = Waiter(None, asyncio.get_running_loop().create_future(), self._clock(), vacate=predicate)
        await self._wait(waiter, None)

    def add_resident(self, tenant: Tenant) -> None:
        """Record that ``tenant`` may hold GPU memory now (its ``stop`` runs before another tenant starts)."""
        if self.schedules(tenant) and (self._active is None or self._active.key != tenant.key):
            self._residents[tenant.key] = tenant

    def adopt(self, tenant: Tenant) -> bool:
        """Make ``tenant`` the active, ready tenant without starting it (it is already running, e.g. a vLLM
        found by a restarted proxy). Only while nothing is active or waiting; returns whether it was taken."""
        if not self.schedules(tenant) or self._active is not None or self._waiters or self._phase != IDLE:
            return False
        self._residents.pop(tenant.key, None)
        self._active, self._phase = tenant, READY
        self._generation += 1
        self.idle.arm(tenant)
        return True

    def lost(self, key: str) -> None:
        """Tenant ``key`` died on its own (process exit): forget it; in-flight leases become stale and
        the next request for it starts it again."""
        self._residents.pop(key, None)
        if self._active is not None and self._active.key == key and self._phase in (READY, DRAINING):
            log.warning("GPU tenant %s is gone; the next request for it starts it again", key)
            self._stats["lost"] += 1
            self._active = None
            self._phase = IDLE
            self._inflight = 0
            self._generation += 1
            self._kick.set()

    @property
    def active(self) -> Tenant | None:
        return self._active

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def switching_to(self) -> Tenant | None:
        """While tenants are evicted for a switch, the tenant it is for (a ``stop`` may spare what that one
        needs, e.g. a sleeping vLLM about to be woken); otherwise None. A hint, safe to ignore."""
        return self._waiters.head.tenant if self._phase == STOPPING and self._waiters else None

    @property
    def inflight(self) -> int:
        """Leases held on the active tenant."""
        return self._inflight

    @property
    def queue_depth(self) -> int:
        return self._waiters.depth()

    def waiting_for(self, key: str) -> int:
        return self._waiters.waiting_for(key)

    def stats(self) -> dict[str, Any]:
        """Counters and recent swaps for metrics: ``swaps`` (successful switches), ``swap_failures``,
        ``starts``/``stops``, ``queue_depth``, ``inflight``, ``active``, ``phase`` and ``recent_swaps``
        (the last 50 swap records: :mod:`imageworks_proxy.gpu.swaplog`)."""
        return {
            **self.swaplog.snapshot(),
            "queue_depth": self.queue_depth,
            "inflight": self._inflight,
            "active": self._active.key if self._active is not None else None,
            "phase": self._phase,
            "idle_unload_in_s": self.idle.remaining_s(self.idle.key) if self.idle.key else None,
        }

    async def start(self) -> None:
        if self._driver is None:
            self._driver = asyncio.get_running_loop().create_task(self._run(), name="gpu-scheduler")

    async def close(self) -> None:
        """Stop the driver (an in-progress start is cancelled) and fail every waiter with 503."""
        self._closed = True
        self.idle.cancel()
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        self._waiters.fail_all(_shutting_down())

    # -- internals -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise _shutting_down()
        if self._driver is None:
            self._driver = asyncio.get_running_loop().create_task(self._run(), name="gpu-scheduler")

    def _fast_path(self, tenant: Tenant) -> bool:
        return (
            self._active is not None
            and self._active.key == tenant.key
            and self._phase == READY
            and not self._waiters
        )

    def _instant_switch(self, tenant: Tenant) -> bool:
        """Switch to ``tenant`` on the spot when there is nothing to wait for: no queue, nothing in flight,
        nothing to stop and nothing to start (e.g. the first Ollama request). No ``waiting()``, no commit."""
        if self._waiters or self._inflight or self._phase not in (IDLE, READY) or tenant.start is not None:
            return False
        active = self._active
        if active is not None and active.key != tenant.key and active.stop is not None:
            return False
        if any(t.stop is not None for k, t in self._residents.items() if k != tenant.key):
            return False
        if self.backoff.error_for(tenant) is not None:
            return False
        # nothing was stopped or started: not a swap for the metrics
        self._residents.pop(tenant.key, None)
        self._active, self._phase = tenant, READY
        self._generation += 1
        return True

    def _grant(self, tenant: Tenant) -> GrantedLease:
        if self.idle.key is not None:
            self.idle.cancel()
        self._inflight += 1
        self._stats["admitted"] += 1
        return GrantedLease(self._release, self._active or tenant, self._generation)

    def _release(self, generation: int) -> None:
        if generation != self._generation:
            return  # a lease on an instance that is gone
        self._inflight -= 1
        if self._inflight <= 0:
            self._inflight = 0
            if self._waiters:
                self._kick.set()
            elif self._active is not None and self._phase == READY:
                self.idle.arm(self._active)

    def _check_backoff(self, tenant: Tenant) -> None:
        if self._active is not None and self._active.key == tenant.key and self._phase == STARTING:
            return  # a (forced) start is under way: join it
        err = self.backoff.error_for(tenant)
        if err is not None:
            raise err

    async def _wait(self, waiter: Waiter, call: ChatCall | None) -> Lease:
        self._waiters.append(waiter)
        self._stats["queued"] += 1
        self._kick.set()
        try:
            if call is not None:
                await call.waiting()
            result = await asyncio.shield(waiter.future)
        except BaseException:  # cancelled (client gone), or the start failed
            if self._waiters.abandon(waiter):
                self._stats["cancelled_waits"] += 1
            self._kick.set()
            raise
        return result

    def _admit(self, key: str) -> None:
        """Admit every queued request for ``key`` (the active, ready tenant) together."""
        active = self._active
        assert active is not None
        self._waiters.settle(key, lambda w: w.future.set_result(self._grant(active)))

    def _fail(self, key: str, error: ProxyError) -> None:
        self._waiters.settle(key, lambda w: w.future.set_exception(error))

    async def _run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the driver must never die
                log.exception("GPU scheduler step failed")

    async def _step(self) -> None:
        self._waiters.prune()
        if not self._waiters:
            if self._phase == DRAINING:
                self._phase = READY
            idle = self.idle.update(self._active if self._phase == READY and not self._inflight else None)
            if idle is not None:  # its idle time ran out: stop it alone
                self.stop_reason = "idle"
                try:
                    await self._switch(idle)
                finally:
                    self.stop_reason = None
            return
        head = self._waiters.head
        active = self._active
        if head.tenant is None and (active is None or not head.vacates(active)):
            await self._switch(head)  # nothing in flight needs to drain for this vacate
            self._kick.set()
            return
        if (
            head.tenant is not None
            and active is not None
            and active.key == head.key
            and self._phase in (READY, DRAINING)
        ):
            self._phase = READY
            self._admit(active.key)
            self._kick.set()
            return
        if self._inflight > 0:
            if self._phase == READY:
                self._phase = DRAINING
                self._switch_started = self._clock()
                log.info(
                    "GPU: draining %d in-flight request(s) on %s before switching to %s",
                    self._inflight,
                    active.key if active else None,
                    head.key or "nothing",
                )
            return  # a release kicks us again
        await self._switch(head)
        self._kick.set()

    async def _stop_tenant(self, tenant: Tenant) -> tuple[float, object]:
        """Run ``tenant.stop``; returns how long it took and what it returned (facts for the swap record).
        Raises ``ProxyError`` when it could not free the GPU."""
        t0 = self._clock()
        info = None
        if tenant.stop is not None:
            try:
                info = await tenant.stop()
            except (asyncio.CancelledError, ProxyError):
                raise
            except Exception as exc:
                log.exception("stopping GPU tenant %s failed", tenant.key)
                raise ProxyError(
                    503,
                    "model_start_failed",
                    f"{tenant.label} could not be stopped to free the GPU: {type(exc).__name__}: {exc}",
                    headers={"Retry-After": "10"},
                ) from None
        self._stats["stops"] += 1
        return self._clock() - t0, info

    async def _switch(self, head: Waiter) -> None:
        """Serve the head of the queue: evict what is in the way, then start its tenant (or, for a
        vacate, just evict). Runs only in the driver, with nothing in flight on what it evicts."""
        began = self._switch_started if self._switch_started is not None else self._clock()
        self._switch_started = None
        self.idle.cancel()
        target = head.tenant
        record: dict[str, Any] = {
            "from": self._active.key if self._active else None,
            "to": target.key if target else None,
            "kind": "switch",
            "drain_s": round(self._clock() - began, 3),
            **({"reason": head.reason} if head.reason else {}),
        }
        self._phase = STOPPING
        stop_s = 0.0
        for tenant in to_evict(head, self._active, self._residents):
            self._residents.pop(tenant.key, None)
            if self._active is tenant:
                self._active = None
                self._generation += 1
            try:
                seconds, info = await self._stop_tenant(tenant)
            except ProxyError as error:
                # It may still hold the GPU: never start the next tenant into it. It stays resident so
                # the next switch tries to stop it again.
                self._residents[tenant.key] = tenant
                self._phase = READY if self._active is not None else IDLE  # a vacate may keep the active one
                log.warning("GPU: could not stop %s before switching to %s: %s",
                            tenant.key, record["to"], error.message)
                self._switch_failed(head, record, error, began, stop_s=stop_s)
                return
            stop_s += seconds
            self.swaplog.step(record, tenant.key, seconds, info)
        record["stop_s"] = round(stop_s, 3)
        if target is None:
            self._vacated(head, record)
        else:
            await self._start(head, target, record, began)

    def _vacated(self, head: Waiter, record: dict[str, Any]) -> None:
        """A vacate request is done: the GPU is free of every tenant it named."""
        if self._active is not None and not head.vacates(self._active):
            self._phase = READY
        else:
            self._active, self._phase = None, IDLE
        if not head.future.done():
            head.future.set_result(None)
        self._waiters.remove(head)
        self.swaplog.emit({"event": "vacate", **record})

    async def _start(self, head: Waiter, target: Tenant, record: dict[str, Any], began: float) -> None:
        """Start ``target`` (its waiters share this one start) and admit them, or fail them all."""
        self._active, self._phase = None, IDLE
        if not head.force:  # a tenant that failed a moment ago is not started again (unless forced)
            err = self.backoff.error_for(target)
            if err is not None:
                self._fail(target.key, err)
                return
        self._active, self._phase = target, STARTING
        self._residents.pop(target.key, None)
        t0 = self._clock()
        try:
            info = await target.start() if target.start is not None else None
        except asyncio.CancelledError:
            self._active, self._phase = None, IDLE
            raise
        except Exception as exc:
            error = exc if isinstance(exc, ProxyError) else ProxyError(
                503, "model_start_failed", f"{target.label} could not be started: {type(exc).__name__}: {exc}"
            )
            if not isinstance(exc, ProxyError):
                log.exception("starting GPU tenant %s failed", target.key)
            log.warning(
                "GPU: starting %s failed after %.1fs: %s", target.key, self._clock() - t0, error.message
            )
            self.backoff.record(target, error)
            self._active, self._phase = None, IDLE
            self._generation += 1
            self._switch_failed(head, record, error, began, start_s=self._clock() - t0)
            return
        self.swaplog.step(record, target.key, self._clock() - t0, info, start=target.start is not None)
        self._started(target, record, began, self._clock() - t0)

    def _started(self, target: Tenant, record: dict[str, Any], began: float, start_s: float) -> None:
        self.backoff.clear(target.key)
        self._phase = READY
        self._generation += 1
        self._stats["starts"] += 1
        self._stats["swaps"] += 1
        record.update(ok=True, start_s=round(start_s, 3), total_s=round(self._clock() - began, 3))
        self.swaplog.swap(record)
        log.info("GPU: switched %(from)s -> %(to)s in %(total_s).2fs (%(kind)s: drain %(drain_s).2fs, stop "
                 "%(stop_s).2fs, start %(start_s).2fs, proxy %(proxy_s).3fs); admitting %(n)d request(s)",
                 {**record, "n": self.waiting_for(target.key)})
        self._admit(target.key)

    def _switch_failed(self, head: Waiter, record: dict[str, Any], error: ProxyError, began: float, *,
                       stop_s: float | None = None, start_s: float = 0.0) -> None:
        """Record a failed switch and hand ``error`` to whoever waited for it."""
        self._stats["swap_failures"] += 1
        if stop_s is not None:
            record["stop_s"] = round(stop_s, 3)
        record.update(ok=False, error=error.code, start_s=round(start_s, 3),
                      total_s=round(self._clock() - began, 3))
        self.swaplog.swap(record)
        if head.tenant is not None:
            self._fail(head.tenant.key, error)
        elif not head.future.done():
            head.future.set_exception(error)
