"""The four built-in adapters pass the conformance suite every adapter must pass
(``imageworks_proxy.testing.AdapterConformance``), and their output validates against the OpenAI schemas.

To add a built-in adapter: write an async ``setup`` that starts its fake backend and returns a
``ConformanceBackend`` whose ``echo`` model answers "echo: <last user text>", ``tools`` model calls
``get_weather({"city": "Paris"})``, and ``missing`` model makes the backend say "model not found"; then
add it to ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from imageworks_proxy.testing import AdapterConformance, ConformanceBackend, free_port
from imageworks_proxy.testing.fakes.ollama import FakeOllama, Reply, echo_responder
from imageworks_proxy.testing.fakes.openai import make_fake_openai
from tests.openai_schemas import validate_chunk, validate_completion, validate_error
from tests.orch_helpers import orch_settings


async def _openai_like(aiohttp_server, backend: str, adapter: str) -> ConformanceBackend:
    server = await aiohttp_server(make_fake_openai())
    base = str(server.make_url("/v1"))
    entries = [
        {
            "name": f"c-{mode}",
            "backend": backend,
            "backend_config": {"base_url": base},
            "served_model_id": mode,
            "capabilities": ["tools"],
        }
        for mode in ("echo", "tools", "error404")
    ]
    return ConformanceBackend(entries, "c-echo", "c-tools", "c-error404", adapter)


async def openai_passthrough(aiohttp_server) -> ConformanceBackend:
    return await _openai_like(aiohttp_server, "openai", "openai-passthrough")


async def vllm_external(aiohttp_server) -> ConformanceBackend:
    return await _openai_like(aiohttp_server, "vllm", "vllm-external")


def _ollama_responder(body: dict[str, Any]) -> Reply:
    if body["model"].startswith("tools") and body["messages"][-1]["role"] != "tool":
        return Reply(
            content="", tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
        )
    return echo_responder(body)


async def ollama(aiohttp_server) -> ConformanceBackend:
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
    return ConformanceBackend(entries, "c-echo", "c-tools", "c-missing", "ollama")


async def vllm_orchestrated(aiohttp_server) -> ConformanceBackend:
    entries = [
        {
            "name": f"c-{mode}",
            "backend": "vllm",
            "served_model_id": reply,
            "capabilities": ["tools"],
            "backend_config": {
                "model_path": f"fake/{mode}",
                "extra_args": ["--fake-reply", reply],
                "tool_call_parser": "hermes",  # vLLM refuses tools without a tool-call parser
            },
        }
        for mode, reply in (("echo", "echo"), ("tools", "tools"), ("error404", "missing"))
    ]
    return ConformanceBackend(
        entries, "c-echo", "c-tools", "c-error404", "vllm-orchestrated", orch_settings(free_port())
    )


BACKENDS: dict[str, Callable[[Any], Awaitable[ConformanceBackend]]] = {
    "openai-passthrough": openai_passthrough,
    "vllm-external": vllm_external,
    "ollama": ollama,
    "vllm-orchestrated": vllm_orchestrated,
}


class TestBuiltinAdapterConformance(AdapterConformance):
    @pytest.fixture(params=sorted(BACKENDS))
    async def conformance_backend(self, request, aiohttp_server) -> ConformanceBackend:
        return await BACKENDS[request.param](aiohttp_server)

    def check_completion(self, body: Any) -> None:
        super().check_completion(body)
        validate_completion(body)

    def check_chunk(self, chunk: Any) -> None:
        super().check_chunk(chunk)
        validate_chunk(chunk)

    def check_error(self, body: Any) -> None:
        super().check_error(body)
        validate_error(body)
