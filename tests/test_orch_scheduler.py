"""The GPU tenancy scheduler's policy, with in-process tenants: fast and exhaustive.

The same policy is exercised end to end with a real fake-vLLM subprocess in test_orch_vllm.py.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.scheduler import GpuScheduler
from imageworks_proxy.gpu.tenancy import Tenant
from tests.orch_helpers import Call


class World:
    """Tenants that record when they hold the GPU; starting one while another holds it is a bug."""

    def __init__(self) -> None:
        self.alive: set[str] = set()
        self.starts: list[str] = []
        self.stops: list[str] = []
        self.violations: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    def tenant(
        self,
        key: str,
        *,
        delay: float = 0.0,
        fail: str | None = None,
        revision: str | None = None,
        gate: bool = False,
        exclusive: bool | None = None,
    ) -> Tenant:
        async def start() -> None:
            if self.alive:
                self.violations.append(f"start {key} while {sorted(self.alive)} alive")
            self.starts.append(key)
            if gate:
                await self.gates.setdefault(key, asyncio.Event()).wait()
            await asyncio.sleep(delay)
            if fail:
                raise ProxyError(503, "model_start_failed", fail)
            self.alive.add(key)

        async def stop() -> None:
            self.stops.append(key)
            self.alive.discard(key)

        # servers the proxy launches are exclusive tenants; Ollama is not
        exclusive = key != "ollama" if exclusive is None else exclusive
        return Tenant(key, key, start=start, stop=stop, revision=revision, exclusive=exclusive)

    def using(self, key: str) -> None:
        if self.alive != {key}:
            self.violations.append(f"request for {key} ran while {sorted(self.alive)} alive")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
async def sched():
    s = GpuScheduler(max_queue=8, exclusive=True, backoff_s=30.0)
    await s.start()
    yield s
    await s.close()


async def test_requests_for_the_active_model_run_concurrently(sched):
    w = World()
    first = await sched.acquire(w.tenant("vllm:a"), Call())
    second_call = Call()
    second = await sched.acquire(w.tenant("vllm:a"), second_call)
    assert sched.stats()["inflight"] == 2
    assert not second_call.waited  # no wait, no keep-alives needed
    first.release()
    second.release()
    assert w.starts == ["vllm:a"]


async def test_a_switch_waits_for_in_flight_requests_and_queues_newcomers_for_the_old_model(sched):
    w = World()
    lease_a = await sched.acquire(w.tenant("vllm:a"), Call())
    call_b = Call()
    task_b = asyncio.create_task(sched.acquire(w.tenant("vllm:b"), call_b))
    await settle()
    assert call_b.waited
    # from now on a new request for the active model queues too (no starvation of b)
    task_a2 = asyncio.create_task(sched.acquire(w.tenant("vllm:a"), Call()))
    await settle()
    assert not task_b.done() and not task_a2.done()
    assert sched.phase == "draining" and w.stops == []  # the running answer is not killed
    lease_a.release()
    lease_b = await task_b
    assert w.alive == {"vllm:b"} and w.stops == ["vllm:a"]
    await settle()
    assert not task_a2.done()
    lease_b.release()
    (await task_a2).release()
    assert w.starts == ["vllm:a", "vllm:b", "vllm:a"]
    assert w.violations == []


async def test_queued_requests_for_the_new_model_are_admitted_together(sched):
    w = World()
    lease_a = await sched.acquire(w.tenant("vllm:a"), Call())
    tasks = [asyncio.create_task(sched.acquire(w.tenant("vllm:b"), Call())) for _ in range(5)]
    await settle()
    lease_a.release()
    leases = await asyncio.gather(*tasks)
    assert sched.stats()["inflight"] == 5
    assert w.starts == ["vllm:a", "vllm:b"]
    for lease in leases:
        lease.release()


async def test_models_are_served_in_the_order_of_their_first_waiting_request(sched):
    w = World()
    order: list[str] = []
    lease_a = await sched.acquire(w.tenant("vllm:a"), Call())

    async def req(key: str) -> None:
        lease = await sched.acquire(w.tenant(key), Call())
        order.append(key)
        w.using(key)
        await asyncio.sleep(0.001)
        lease.release()

    tasks = []
    for key in ["vllm:c", "vllm:b", "vllm:c", "vllm:a", "vllm:b"]:
        tasks.append(asyncio.create_task(req(key)))
        await settle()
    lease_a.release()
    await asyncio.gather(*tasks)
    assert order == ["vllm:c", "vllm:c", "vllm:b", "vllm:b", "vllm:a"]
    assert w.starts == ["vllm:a", "vllm:c", "vllm:b", "vllm:a"]
    assert w.violations == []


async def test_requests_join_a_load_in_progress(sched):
    w = World()
    t = w.tenant("vllm:a", gate=True)
    tasks = [asyncio.create_task(sched.acquire(t, Call()))]
    await settle()
    assert sched.phase == "starting"
    tasks += [asyncio.create_task(sched.acquire(w.tenant("vllm:a"), Call())) for _ in range(3)]
    await settle()
    w.gates["vllm:a"].set()
    for lease in await asyncio.gather(*tasks):
        lease.release()
    assert w.starts == ["vllm:a"]


async def test_a_cancelled_wait_leaves_the_queue_and_does_not_force_a_switch(sched):
    w = World()
    lease_a = await sched.acquire(w.tenant("vllm:a"), Call())
    task_b = asyncio.create_task(sched.acquire(w.tenant("vllm:b"), Call()))
    await settle()
    assert sched.queue_depth == 1
    task_b.cancel()  # the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await task_b
    await settle()
    assert sched.queue_depth == 0
    # requests for the active model flow again at once
    lease_a2 = await asyncio.wait_for(sched.acquire(w.tenant("vllm:a"), Call()), 1)
    lease_a.release()
    lease_a2.release()
    await settle()
    assert w.starts == ["vllm:a"] and w.stops == []


async def test_a_full_queue_answers_429_queue_full():
    w = World()
    sched = GpuScheduler(max_queue=2, exclusive=True)
    try:
        lease = await sched.acquire(w.tenant("vllm:a"), Call())
        waiting = [asyncio.create_task(sched.acquire(w.tenant("vllm:b"), Call())) for _ in range(2)]
        await settle()
        with pytest.raises(ProxyError) as exc:
            await sched.acquire(w.tenant("vllm:b"), Call())
        assert exc.value.status == 429 and exc.value.code == "queue_full"
        assert "Retry-After" in exc.value.headers
        lease.release()
        for lease_b in await asyncio.gather(*waiting):
            lease_b.release()
    finally:
        await sched.close()


async def test_a_start_failure_reaches_every_waiter_and_is_not_retried_in_a_tight_loop(sched):
    w = World()
    t = w.tenant("vllm:bad", fail="ValueError: no GPU memory", gate=True)
    tasks = [asyncio.create_task(sched.acquire(t, Call())) for _ in range(4)]
    await settle()
    w.gates["vllm:bad"].set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ProxyError) and r.code == "model_start_failed" for r in results)
    assert all("no GPU memory" in r.message for r in results)
    # an immediate retry fails fast with the same reason, without another start
    with pytest.raises(ProxyError) as exc:
        await sched.acquire(t, Call())
    assert "no GPU memory" in exc.value.message and "Retry-After" in exc.value.headers
    assert w.starts == ["vllm:bad"]
    # ...unless the registry entry changed (new revision) or the start is forced
    with pytest.raises(ProxyError):
        await sched.acquire(w.tenant("vllm:bad", fail="still bad", revision="v2"), Call())
    assert w.starts == ["vllm:bad", "vllm:bad"]
    (await sched.acquire(w.tenant("vllm:bad", revision="v3"), Call())).release()
    assert w.alive == {"vllm:bad"}
    stats = sched.stats()
    assert stats["swap_failures"] == 2 and stats["swaps"] == 1


async def test_backoff_expires():
    now = [0.0]
    w = World()
    sched = GpuScheduler(max_queue=4, backoff_s=10.0, clock=lambda: now[0])
    try:
        with pytest.raises(ProxyError):
            await sched.acquire(w.tenant("vllm:x", fail="boom"), Call())
        now[0] = 5.0
        with pytest.raises(ProxyError) as exc:
            await sched.acquire(w.tenant("vllm:x"), Call())
        assert exc.value.headers["Retry-After"] == "5"
        assert len(w.starts) == 1
        now[0] = 10.5
        (await sched.acquire(w.tenant("vllm:x"), Call())).release()
        assert len(w.starts) == 2
    finally:
        await sched.close()


async def test_a_lost_tenant_is_started_again_by_the_next_request(sched):
    w = World()
    lease = await sched.acquire(w.tenant("vllm:a"), Call())
    w.alive.clear()  # the process died on its own
    sched.lost("vllm:a")
    lease.release()  # the stale lease's release is harmless
    assert sched.stats()["inflight"] == 0
    (await sched.acquire(w.tenant("vllm:a"), Call())).release()
    assert w.starts == ["vllm:a", "vllm:a"]
    assert sched.stats()["inflight"] == 0


async def test_vacate_drains_then_stops_only_matching_tenants(sched):
    w = World()
    lease = await sched.acquire(w.tenant("vllm:a"), Call())
    done = asyncio.create_task(sched.vacate(lambda t: t.key.startswith("vllm:")))
    await settle()
    assert not done.done() and w.stops == []
    lease.release()
    await done
    assert w.stops == ["vllm:a"] and sched.active is None
    # vacating vLLM while Ollama is active leaves Ollama alone and does not wait for its requests
    ollama_lease = await sched.acquire(w.tenant("ollama"), Call())
    await asyncio.wait_for(sched.vacate(lambda t: t.key.startswith("vllm:")), 1)
    assert sched.active is not None and sched.active.key == "ollama"
    ollama_lease.release()


async def test_gpu_exclusive_evicts_a_resident_ollama_before_a_vllm_start(sched):
    w = World()
    sched.add_resident(w.tenant("ollama"))
    w.alive.add("ollama")
    (await sched.acquire(w.tenant("vllm:a"), Call())).release()
    assert w.stops == ["ollama"] and w.alive == {"vllm:a"}
    # an Ollama request while vLLM is active is a switch like any other
    (await sched.acquire(w.tenant("ollama"), Call())).release()
    assert w.stops == ["ollama", "vllm:a"] and w.violations == []


async def test_without_gpu_exclusive_only_exclusive_tenants_are_scheduled():
    w = World()
    sched = GpuScheduler(max_queue=4, exclusive=False)
    try:
        sched.add_resident(w.tenant("ollama"))
        lease = await sched.acquire(w.tenant("vllm:a"), Call())
        (await sched.acquire(w.tenant("ollama"), Call())).release()  # no switch, no wait
        assert w.stops == [] and w.starts == ["vllm:a"]
        lease.release()
        # any exclusive tenant, whatever its name (a plugin's llama.cpp server), takes its turn
        lease = await sched.acquire(w.tenant("llamacpp:b"), Call())
        assert w.stops == ["vllm:a"] and w.starts == ["vllm:a", "llamacpp:b"] and w.violations == []
        lease.release()
    finally:
        await sched.close()


async def test_closing_fails_waiters_with_503():
    w = World()
    sched = GpuScheduler(max_queue=4)
    t = w.tenant("vllm:a", gate=True)
    task = asyncio.create_task(sched.acquire(t, Call()))
    await settle()
    await sched.close()
    with pytest.raises(ProxyError) as exc:
        await task
    assert exc.value.status == 503
    with pytest.raises(ProxyError):
        await sched.acquire(t, Call())


async def test_stats_and_listeners_report_swaps(sched):
    w = World()
    events = []
    sched.listeners.append(events.append)
    (await sched.acquire(w.tenant("vllm:a"), Call())).release()
    (await sched.acquire(w.tenant("vllm:b"), Call())).release()
    stats = sched.stats()
    assert stats["swaps"] == 2 and stats["queue_depth"] == 0 and stats["active"] == "vllm:b"
    assert [(e["from"], e["to"], e["ok"]) for e in events] == [
        (None, "vllm:a", True),
        ("vllm:a", "vllm:b", True),
    ]
    assert all(e["total_s"] >= 0 for e in stats["recent_swaps"])


# -- property: random interleavings --------------------------------------------------------------
def runs(keys: list[str]) -> int:
    return sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)


async def _scenario(plan: list[tuple[str, int, int, bool]], seed: int) -> tuple[World, list[object], int]:
    rng = random.Random(seed)
    w = World()
    sched = GpuScheduler(max_queue=1000, exclusive=True)
    results: list[object] = [None] * len(plan)
    arrivals: list[str] = []

    async def req(i: int, key: str, hold: int, cancel: bool) -> None:
        t = w.tenant(key, delay=rng.choice([0, 0, 0.001]))
        arrivals.append(key)
        try:
            lease = await sched.acquire(t, Call())
        except BaseException as exc:
            results[i] = exc
            raise
        try:
            w.using(key)
            for _ in range(hold):
                await asyncio.sleep(0)
            w.using(key)
            results[i] = "ok"
        finally:
            lease.release()

    try:
        tasks = []
        for i, (key, gap, hold, cancel) in enumerate(plan):
            for _ in range(gap):
                await asyncio.sleep(0)
            task = asyncio.create_task(req(i, key, hold, cancel))
            tasks.append(task)
            if cancel:
                asyncio.get_running_loop().call_soon(task.cancel)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    finally:
        await sched.close()
    return w, results, runs(arrivals)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from(["vllm:a", "vllm:b", "vllm:c", "ollama"]),
            st.integers(0, 6),
            st.integers(0, 6),
            st.sampled_from([False, False, False, True]),
        ),
        min_size=1,
        max_size=25,
    ),
    seed=st.integers(0, 2**16),
)
def test_random_interleavings_never_overlap_always_succeed_and_switch_little(plan, seed):
    w, results, arrival_runs = asyncio.run(_scenario(plan, seed))
    assert w.violations == []
    for (key, _gap, _hold, cancel), result in zip(plan, results, strict=True):
        if not cancel:
            assert result == "ok", (key, result)
    # batching: never more starts than changes of model in the order the requests arrived
    assert len(w.starts) <= arrival_runs


async def test_a_tenant_with_nothing_to_start_or_evict_is_granted_without_waiting(sched):
    w = World()
    ollama = Tenant("ollama", "Ollama", stop=w.tenant("ollama").stop)
    call = Call()
    lease = await sched.acquire(ollama, call)
    assert not call.waited and sched.active.key == "ollama"  # nothing to wait for: no early SSE commit
    lease.release()
    # switching away needs Ollama unloaded, so the vLLM request does wait
    call_a = Call()
    (await sched.acquire(w.tenant("vllm:a"), call_a)).release()
    assert call_a.waited and w.stops == ["ollama"]
    # and back: vLLM must be stopped first, so Ollama's request waits this time
    call_o = Call()
    (await sched.acquire(ollama, call_o)).release()
    assert call_o.waited and w.stops == ["ollama", "vllm:a"]


async def test_a_tenant_that_cannot_be_stopped_fails_the_switch_instead_of_starting_into_a_busy_gpu(sched):
    w = World()
    attempts = []

    async def stuck() -> None:
        attempts.append(1)
        raise ProxyError(503, "model_start_failed", "Ollama still has llama3 loaded")

    ollama = Tenant("ollama", "Ollama", stop=stuck)
    (await sched.acquire(ollama, Call())).release()
    calls = [asyncio.create_task(sched.acquire(w.tenant("vllm:a"), Call())) for _ in range(2)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, ProxyError) and "still has llama3 loaded" in r.message for r in results)
    assert w.starts == []  # vLLM was never started into the occupied GPU
    with pytest.raises(ProxyError):  # the next request tries the stop again
        await sched.acquire(w.tenant("vllm:a"), Call())
    assert len(attempts) == 2


async def test_swap_records_say_what_kind_of_switch_it_was_and_the_proxys_share(sched):
    """A tenant's start and stop may report facts: the kind of start, the time spent on the server itself
    (engine_s), and that it was put to sleep; the record then gives the proxy's own share."""
    seen: list[str | None] = []

    def tenant(key: str, kind: str) -> Tenant:
        async def start():
            await asyncio.sleep(0.05)
            return {"kind": kind, "engine_s": 0.04}

        async def stop():
            seen.append(sched.switching_to.key if sched.switching_to else None)
            return {"evicted": "sleep", "engine_s": 0.0}

        return Tenant(key, key, start=start, stop=stop, exclusive=True)

    (await sched.acquire(tenant("vllm:a", "cold"), Call())).release()
    (await sched.acquire(tenant("vllm:b", "wake"), Call())).release()
    cold, wake = sched.stats()["recent_swaps"]
    assert (cold["kind"], cold.get("slept")) == ("cold", None)
    assert (wake["kind"], wake["slept"]) == ("wake", ["vllm:a"])
    assert seen == ["vllm:b"]  # a stop knows which tenant the GPU is being freed for
    for record in (cold, wake):
        assert record["engine_s"] >= 0.04 - 1e-9
        assert record["proxy_s"] == pytest.approx(record["total_s"] - record["drain_s"] - record["engine_s"],
                                                  abs=0.002)
    assert sched.switching_to is None


async def test_a_tenant_that_needs_no_start_is_a_switch_and_unreported_steps_count_as_the_servers(sched):
    w = World()
    (await sched.acquire(w.tenant("vllm:a"), Call())).release()
    (await sched.acquire(Tenant("ollama", "Ollama", stop=None, exclusive=True), Call())).release()
    cold, switch = sched.stats()["recent_swaps"]
    assert cold["kind"] == "cold" and switch["kind"] == "switch"
    assert switch["engine_s"] == pytest.approx(switch["stop_s"], abs=0.002)  # vllm:a's stop said nothing
