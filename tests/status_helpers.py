"""A proxy with one model of each kind in front of fakes, for the status page tests: an OpenAI-compatible
server, Ollama, and two vLLM models the proxy starts (the fake vLLM) — plus a passthrough entry whose
display name is HTML, to show the page prints it as text, and one whose adapter is not installed."""

from __future__ import annotations

from typing import Any

import attrs
from aiohttp.test_utils import TestClient

from imageworks_proxy.testing import free_port, user
from imageworks_proxy.testing.fakes.ollama import FakeOllama, ollama_entry
from imageworks_proxy.testing.fakes.openai import make_fake_openai
from tests import orch_helpers

#: A registry display name that would run script if it were ever put into the page as HTML.
HOSTILE_NAME = '<img src=x onerror="document.title=\'pwned\'">'


@attrs.define
class StatusEnv:
    client: TestClient
    ollama: FakeOllama

    async def chat(self, model: str, text: str = "hi", **extra: Any) -> str:
        """One chat request; returns its request id (the ``X-Request-Id`` the client saw)."""
        body = {"model": model, "messages": user(text), **extra}
        resp = await self.client.post("/v1/chat/completions", json=body)
        await resp.read()
        return resp.headers["X-Request-Id"]

    async def status(self, **headers: str) -> dict[str, Any]:
        resp = await self.client.get("/v1/status", headers=headers)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def listed_ids(self) -> list[str]:
        return [m["id"] for m in (await (await self.client.get("/v1/models")).json())["data"]]


async def start(
    tmp_path, aiohttp_server, registry_file, make_config, proxy_client, **settings: Any
) -> StatusEnv:
    openai_server = await aiohttp_server(make_fake_openai())
    ollama = FakeOllama()
    ollama_server = await aiohttp_server(ollama.app())
    base = str(openai_server.make_url("/v1"))
    registry_file([
        {"name": "m-echo", "display_name": "echo 1b", "backend": "openai", "served_model_id": "echo",
         "backend_config": {"base_url": base}, "capabilities": ["tools"]},
        {"name": "m-hostile", "display_name": HOSTILE_NAME, "backend": "openai", "served_model_id": "echo",
         "backend_config": {"base_url": base}},
        ollama_entry(str(ollama_server.make_url("")).rstrip("/")),
        orch_helpers.vllm_entry("alpha", tmp_path, capabilities=["vision"]),
        orch_helpers.vllm_entry("beta", tmp_path),
        # routed to an adapter no installed plugin provides
        {"name": "m-orphan", "backend": "gguf", "backend_config": {"adapter": "not-installed"}},
    ])
    config = make_config(**orch_helpers.orch_settings(free_port(), **settings))
    return StatusEnv(await proxy_client(config), ollama)
