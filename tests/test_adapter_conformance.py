"""The contract every adapter must meet, seen through the proxy (parametrised over adapters).

To add an adapter: write an async ``setup`` that starts its fake backend and returns a ``Backend`` whose
``echo`` model answers "echo: <last user text>", ``tools`` model calls ``get_weather({"city": "Paris"})``,
and ``missing`` model makes the backend say "model not found"; then add it to ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import openai
import pytest

from tests.chat_helpers import sse_events, user
from tests.fakes.fake_ollama import FakeOllama, Reply, echo_responder
from tests.fakes.fake_openai import make_fake_openai
from tests.openai_schemas import validate_chunk, validate_completion, validate_error


@attrs.define
class Backend:
    entries: list[dict[str, Any]]
    echo: str
    tools: str
    missing: str
    adapter: str
    #: make_config overrides the backend needs (e.g. the orchestrator's launcher)
    settings: dict[str, str] = attrs.field(factory=dict)


async def _openai_like(aiohttp_server, backend: str, adapter: str) -> Backend:
    server = await aiohttp_server(make_fake_openai())
    base = str(server.make_url("/v1"))
    entries = [{"name": f"c-{mode}", "backend": backend, "backend_config": {"base_url": base},
                "served_model_id": mode, "capabilities": ["tools"]} for mode in ("echo", "tools", "error404")]
    return Backend(entries, "c-echo", "c-tools", "c-error404", adapter)


async def openai_passthrough(aiohttp_server) -> Backend:
    return await _openai_like(aiohttp_server, "openai", "openai-passthrough")


async def vllm_external(aiohttp_server) -> Backend:
    return await _openai_like(aiohttp_server, "vllm", "vllm-external")


def _ollama_responder(body: dict[str, Any]) -> Reply:
    if body["model"].startswith("tools") and body["messages"][-1]["role"] != "tool":
        return Reply(
            content="", tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
        )
    return echo_responder(body)


async def ollama(aiohttp_server) -> Backend:
    fake = FakeOllama(
        {"echo:latest": ("completion",), "tools:latest": ("completion", "tools")}, responder=_ollama_responder
    )
    server = await aiohttp_server(fake.app())
    base = str(server.make_url("")).rstrip("/")
    entries = [
        {
            "name": f"c-{mode}",
            "backend": "ollama",
            "backend_config": {"base_url": base},
            "served_model_id": f"{mode}:latest",
            "capabilities": ["tools"],
        }
        for mode in ("echo", "tools", "missing")
    ]
    return Backend(entries, "c-echo", "c-tools", "c-missing", "ollama")


async def vllm_orchestrated(aiohttp_server) -> Backend:
    from tests.fakes.orch import free_port, orch_settings

    entries = [
        {
            "name": f"c-{mode}",
            "backend": "vllm",
            "served_model_id": reply,
            "capabilities": ["tools"],
            "backend_config": {"model_path": f"fake/{mode}", "extra_args": ["--fake-reply", reply]},
        }
        for mode, reply in (("echo", "echo"), ("tools", "tools"), ("error404", "missing"))
    ]
    return Backend(
        entries, "c-echo", "c-tools", "c-error404", "vllm-orchestrated", orch_settings(free_port())
    )


BACKENDS: dict[str, Callable[[Any], Awaitable[Backend]]] = {
    "openai-passthrough": openai_passthrough,
    "vllm-external": vllm_external,
    "ollama": ollama,
    "vllm-orchestrated": vllm_orchestrated,
}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request, aiohttp_server, registry_file, make_config, proxy_client):
    spec = await BACKENDS[request.param](aiohttp_server)
    registry_file(spec.entries)
    client = await proxy_client(make_config(**spec.settings))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    yield spec, client, sdk
    await sdk.close()


async def test_models_are_routed_to_the_adapter(backend):
    spec, client, _ = backend
    listing = await (await client.get("/v1/plugins")).json()
    assert any(a["name"] == spec.adapter for p in listing["data"] for a in p["adapters"])
    models = await (await client.get("/v1/models")).json()
    assert spec.echo in {m["extensions"]["logical_id"] for m in models["data"]}


async def test_non_streamed_completion_conforms(backend):
    spec, client, _ = backend
    resp = await client.post("/v1/chat/completions", json={"model": spec.echo, "messages": user("ping")})
    body = await resp.json()
    validate_completion(body)
    assert body["choices"][0]["message"]["content"].strip() == "echo: ping"
    assert body["model"] == spec.echo
    assert body["usage"]["total_tokens"] >= body["usage"]["completion_tokens"]


async def test_stream_conforms(backend):
    spec, client, _ = backend
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": spec.echo,
            "messages": user("ping pong"),
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        validate_chunk(c)
    roles = [ch["delta"].get("role") for c in chunks for ch in c["choices"] if ch["delta"].get("role")]
    assert roles == ["assistant"] and chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text.strip() == "echo: ping pong"
    assert len({c["id"] for c in chunks}) == 1


async def test_streamed_tool_call_round_trip(backend):
    spec, _, sdk = backend
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async with sdk.chat.completions.stream(
        model=spec.tools, messages=user("weather?"), tools=tools
    ) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.id.startswith("call")
    import json

    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"


async def test_backend_model_not_found_is_404(backend):
    spec, client, _ = backend
    resp = await client.post("/v1/chat/completions", json={"model": spec.missing, "messages": user("x")})
    assert resp.status == 404
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "model_not_found"
