"""GPU tenancy around Ollama chats, and the primitives the orchestrator uses: /api/ps and keep_alive: 0."""

from __future__ import annotations

import asyncio

import attrs
import openai
import pytest

from imageworks_proxy import keys
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.tenancy import Tenant
from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes.ollama import FakeOllama, Reply, ollama_entry

MODEL = "llama3.2 3b"


@attrs.define
class RecordingTenancy:
    """Grants every lease at once and records who asked and whether each lease came back."""

    tenants: list[Tenant] = attrs.Factory(list)
    released: list[bool] = attrs.Factory(list)
    residents: list[Tenant] = attrs.Factory(list)

    def add_resident(self, tenant):
        self.residents.append(tenant)

    async def acquire(self, tenant, call):
        self.tenants.append(tenant)
        self.released.append(False)
        index = len(self.released) - 1
        outer = self

        class _Lease:
            def release(self) -> None:
                outer.released[index] = True

        return _Lease()


@pytest.fixture
async def env(aiohttp_server, aiohttp_client, registry_file, make_config, make_app):
    sdks = []

    async def start(*fakes: FakeOllama, tags=("llama3.2:latest",), **overrides):
        entries = []
        for n, fake in enumerate(fakes or (FakeOllama(),)):
            server = await aiohttp_server(fake.app())
            base = str(server.make_url("")).rstrip("/")
            for tag in tags:
                entries.append(ollama_entry(base, name=f"m{n}-{tag}", display_name=f"m{n} {tag}", tag=tag))
        registry_file(entries)
        app = make_app(make_config(**overrides))
        recorder = RecordingTenancy()
        app[keys.TENANCY] = recorder
        client = await aiohttp_client(app)
        sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
        sdks.append(sdk)
        adapter = keys.models(client.app).adapters["ollama"]
        return client, sdk, adapter, recorder

    yield start
    for sdk in sdks:
        await sdk.close()


async def test_each_chat_holds_the_ollama_lease_until_the_response_ends(env):
    fake = FakeOllama()
    client, sdk, adapter, recorder = await env(fake)
    await sdk.chat.completions.create(model="m0 llama3.2:latest", messages=user("hi"))
    assert recorder.released == [True]
    resume = asyncio.Event()
    fake.responder = lambda body: Reply(content="abcdefgh", stall_after=1, resume=resume)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m0 llama3.2:latest", "stream": True, "messages": user("x")}
    )
    await resp.content.readuntil(b"abcd")  # the stream is flowing, and Ollama is still generating
    assert recorder.released == [True, False]
    resume.set()
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]" and "error" not in events[-2]
    assert recorder.released == [True, True]
    assert [t.key for t in recorder.tenants] == ["ollama", "ollama"]
    assert recorder.tenants[0].start is None
    assert fake.loaded  # the chats loaded the model; evicting Ollama unloads it
    await recorder.tenants[0].stop()
    assert fake.unloads == ["llama3.2:latest"] and not fake.loaded
    assert [t.key for t in recorder.residents] == ["ollama"]  # it may hold the GPU from before


async def test_lease_comes_back_after_errors(env):
    fake = FakeOllama(responder=lambda body: Reply(content="abc", error="boom", error_after=1))
    client, sdk, _, recorder = await env(fake)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m0 llama3.2:latest", "stream": True, "messages": user("x")}
    )
    await resp.read()
    fake.responder = lambda body: Reply(status=500, error="crash")
    with pytest.raises(openai.InternalServerError):
        await sdk.chat.completions.create(model="m0 llama3.2:latest", messages=user("hi"))
    assert recorder.released == [True, True]


async def test_no_lease_when_gpu_is_not_exclusive(env):
    _, sdk, _, recorder = await env(GPU_EXCLUSIVE=0)
    await sdk.chat.completions.create(model="m0 llama3.2:latest", messages=user("hi"))
    assert recorder.tenants == []


async def test_loaded_models_and_unload_all_cover_every_ollama_in_use(env):
    one, two = FakeOllama(), FakeOllama({"qwen3:8b": ("completion",)})
    _, sdk, adapter, _ = await env(one, two, tags=("llama3.2:latest", "qwen3:8b"))
    assert await adapter.loaded_models() == []
    await sdk.chat.completions.create(model="m0 llama3.2:latest", messages=user("hi"))
    await sdk.chat.completions.create(model="m1 qwen3:8b", messages=user("hi"))
    assert sorted(await adapter.loaded_models()) == ["llama3.2:latest", "qwen3:8b"]
    one.unload_delay_s = 0.3  # Ollama frees the memory a moment after the request
    await adapter.unload_all()
    assert await adapter.loaded_models() == []
    assert one.unloads == ["llama3.2:latest"] and two.unloads == ["qwen3:8b"]


async def test_unload_that_never_finishes_is_a_503_after_the_stop_timeout(env):
    fake = FakeOllama()
    _, sdk, adapter, _ = await env(fake, OLLAMA_STOP_TIMEOUT_S=0.3)
    await sdk.chat.completions.create(model="m0 llama3.2:latest", messages=user("hi"))
    fake.unload_delay_s = None  # stuck
    with pytest.raises(ProxyError) as err:
        await adapter.unload_all()
    assert err.value.status == 503 and err.value.code == "model_start_failed"
    assert "llama3.2:latest" in err.value.message and "CHAT_PROXY_OLLAMA_STOP_TIMEOUT_S" in err.value.message


async def test_unreachable_ollama_holds_nothing(
    aiohttp_client, registry_file, make_config, make_app, unused_tcp_port_factory
):
    registry_file([ollama_entry(f"http://127.0.0.1:{unused_tcp_port_factory()}")])
    client = await aiohttp_client(make_app(make_config()))
    adapter = keys.models(client.app).adapters["ollama"]
    assert await adapter.loaded_models() == []
    await adapter.unload_all()  # nothing to do, no error
