"""Idle unload: a GPU tenant left without requests for its idle limit is stopped, freeing the GPU, and the
next request starts it again. In-process tenants for the policy, then a real fake-vLLM subprocess and a
fake Ollama end to end."""

from __future__ import annotations

import asyncio

import attrs
import pytest

from imageworks_proxy.gpu.scheduler import GpuScheduler
from imageworks_proxy.gpu.tenancy import Tenant
from imageworks_proxy.testing import free_port, pid_alive, user
from imageworks_proxy.testing.fakes.ollama import FakeOllama, ollama_entry
from tests.orch_helpers import Call, chat, events, orch_settings, started, until, vllm_entry

IDLE_S = 0.3


@attrs.define
class Gpu:
    """Tenants that record their starts and stops."""

    starts: list[str] = attrs.Factory(list)
    stops: list[str] = attrs.Factory(list)

    def tenant(self, key: str, idle_unload_s: float = IDLE_S) -> Tenant:
        async def start() -> None:
            self.starts.append(key)

        async def stop() -> None:
            self.stops.append(key)

        return Tenant(key, key, start=start, stop=stop, exclusive=True, idle_unload_s=idle_unload_s)


@pytest.fixture
async def sched():
    s = GpuScheduler(max_queue=8)
    swaps: list[dict] = []
    s.listeners.append(swaps.append)
    await s.start()
    yield s, swaps
    await s.close()


# -- the policy -----------------------------------------------------------------------------------
async def test_an_idle_tenant_is_stopped_and_the_next_request_starts_it_again(sched):
    s, swaps = sched
    gpu = Gpu()
    (await s.acquire(gpu.tenant("vllm:a"), Call())).release()
    assert 0 < s.idle.remaining_s("vllm:a") <= IDLE_S
    await until(lambda: gpu.stops == ["vllm:a"])
    assert s.active is None and s.phase == "idle" and s.idle.remaining_s("vllm:a") is None
    assert swaps[-1]["event"] == "vacate" and swaps[-1]["reason"] == "idle" and swaps[-1]["from"] == "vllm:a"
    (await s.acquire(gpu.tenant("vllm:a"), Call())).release()
    assert gpu.starts == ["vllm:a", "vllm:a"] and s.active.key == "vllm:a"


async def test_a_tenant_is_never_stopped_while_a_request_holds_it(sched):
    s, _ = sched
    gpu = Gpu()
    lease = await s.acquire(gpu.tenant("vllm:a"), Call())
    await asyncio.sleep(IDLE_S * 3)
    assert gpu.stops == [] and s.idle.remaining_s("vllm:a") is None
    lease.release()  # from now on it counts
    await until(lambda: gpu.stops == ["vllm:a"])


async def test_each_request_starts_the_idle_count_again(sched):
    s, _ = sched
    gpu = Gpu()
    tenant = gpu.tenant("vllm:a", idle_unload_s=IDLE_S * 2)
    for _ in range(4):  # traffic at shorter intervals than the limit keeps the model
        (await s.acquire(tenant, Call())).release()
        await asyncio.sleep(IDLE_S)
    assert gpu.stops == []
    await until(lambda: gpu.stops == ["vllm:a"])


async def test_a_request_that_arrives_while_the_idle_stop_runs_waits_and_restarts_it(sched):
    s, _ = sched
    gpu = Gpu()
    stopping = asyncio.Event()
    release = asyncio.Event()

    async def slow_stop() -> None:
        stopping.set()
        await release.wait()
        gpu.stops.append("vllm:a")

    tenant = attrs.evolve(gpu.tenant("vllm:a"), stop=slow_stop)
    (await s.acquire(tenant, Call())).release()
    await stopping.wait()
    waiting = asyncio.create_task(s.acquire(tenant, Call()))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # never served by a tenant that is being stopped
    release.set()
    (await waiting).release()
    assert gpu.stops == ["vllm:a"] and gpu.starts == ["vllm:a", "vllm:a"] and s.active.key == "vllm:a"


async def test_without_a_limit_nothing_is_stopped(sched):
    s, _ = sched
    gpu = Gpu()
    (await s.acquire(gpu.tenant("vllm:a", idle_unload_s=0), Call())).release()
    await asyncio.sleep(IDLE_S * 2)
    assert gpu.stops == [] and s.active.key == "vllm:a" and s.idle.remaining_s("vllm:a") is None


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sleep_level", ["0", "1"], ids=["plain", "sleep-mode"])
async def test_an_orchestrated_vllm_is_stopped_when_idle_and_started_again_by_the_next_request(
    tmp_path, registry_file, make_config, make_app, aiohttp_client, sleep_level
):
    # with sleep mode on too: an idle unload frees the memory, so it stops the model instead of sleeping
    registry_file([vllm_entry("alpha", tmp_path)])
    settings = orch_settings(free_port(), VLLM_IDLE_UNLOAD_S="1", VLLM_SLEEP_LEVEL=sleep_level)
    client = await aiohttp_client(make_app(make_config(**settings)))
    first, _, _ = await chat(client.app, "alpha")
    pid = int(first.rsplit("pid ", 1)[1])
    health = await (await client.get("/v1/health")).json()
    assert health["vllm"]["state"] == "loaded" and health["vllm"]["idle_unload_s"] == 1
    assert 0 < health["vllm"]["idle_unload_in_s"] <= 1
    assert health["tenancy"]["active"] == "vllm:alpha" and 0 < health["tenancy"]["idle_unload_in_s"] <= 1
    status = await (await client.get("/v1/status")).json()  # what the status page reads
    assert 0 < status["gpu"]["idle_unload_in_s"] <= 1

    async def state() -> str:
        return (await (await client.get("/v1/health")).json())["vllm"]["state"]

    for _ in range(1500):
        if await state() == "stopped":
            break
        await asyncio.sleep(0.02)
    assert not pid_alive(pid)  # the process is gone: GPU and host memory are free
    seen = [e["event"] for e in events(tmp_path) if e["pid"] == pid]
    assert "stop" in seen and "sleep" not in seen  # stopped, not put to sleep
    health = await (await client.get("/v1/health")).json()
    assert health["tenancy"]["active"] is None and health["vllm"]["idle_unload_in_s"] is None

    second, _, waited = await chat(client.app, "alpha", stream=True)
    assert waited == [True]  # the stream was committed and kept alive while vLLM started again
    assert int(second.rsplit("pid ", 1)[1]) != pid and len(started(tmp_path, "served-alpha")) == 2


async def test_ollama_is_asked_to_unload_when_idle(aiohttp_server, registry_file, make_config, proxy_client,
                                                   openai_sdk):
    fake = FakeOllama()
    server = await aiohttp_server(fake.app())
    registry_file([ollama_entry(str(server.make_url("")).rstrip("/"))])
    client = await proxy_client(make_config(GPU_EXCLUSIVE="1", OLLAMA_IDLE_UNLOAD_S="1"))
    sdk = openai_sdk(client)
    await sdk.chat.completions.create(model="llama3.2 3b", messages=user("hi"))
    assert fake.loaded  # Ollama holds the model
    health = await (await client.get("/v1/health")).json()
    assert health["ollama"]["holds_gpu"] is True and 0 < health["ollama"]["idle_unload_in_s"] <= 1
    await until(lambda: fake.unloads == ["llama3.2:latest"] and not fake.loaded_now())
    health = await (await client.get("/v1/health")).json()
    assert health["ollama"]["holds_gpu"] is False and health["ollama"]["idle_unload_in_s"] is None
    await sdk.chat.completions.create(model="llama3.2 3b", messages=user("again"))
    assert fake.loaded
