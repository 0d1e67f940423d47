"""A chat started from OpenWebUI 0.12's browser UI works on every kind of model.

OpenWebUI puts its built-in tools on every browser turn (no ``tool_choice``). vLLM without a tool parser
refuses such a request, Ollama refuses tools for a model without the ``tools`` capability and thinking for
a model that cannot think; the proxy knows each model's capabilities before it sends anything (registry,
Ollama's tag list, vLLM's launch flags) and, for a server it knows nothing about, learns from the refusal.
Every case runs streamed and not, against the strict fakes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import pytest

from imageworks_proxy.testing import free_port, openwebui_turn, sse_events
from imageworks_proxy.testing.fakes import vllm as fake_vllm
from imageworks_proxy.testing.fakes.ollama import FakeOllama, Reply, echo_responder
from tests.openai_schemas import validate_chunk, validate_completion
from tests.orch_helpers import orch_settings
from tests.proxy_helpers import log_records

QUESTION = "What time is it?"


def ollama_responder(body: dict[str, Any]) -> Reply:
    """qwen3 calls OpenWebUI's get_current_timestamp when offered tools (the call in the done line, as
    Ollama's built-in parsers send it); otherwise the fake echoes."""
    if body.get("tools") and body["messages"][-1]["role"] == "user":
        call = {"function": {"name": "get_current_timestamp", "arguments": {}}}
        return Reply(content="", tool_calls=[call], calls_in_done=True)
    return echo_responder(body)


def ollama_entry(name: str, tag: str, base: str, **fields: Any) -> dict[str, Any]:
    backend_config = {"base_url": base, "model_path": f"ollama:/{tag}"}
    return {"name": name, "backend": "ollama", "backend_config": backend_config, **fields}


def vllm_entry(name: str, tmp_path, reply: str, **backend_config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": name,
        "backend_config": {
            "model_path": f"/models/{name}",
            "extra_args": ["--fake-reply", reply, "--fake-events", str(tmp_path / "events.jsonl")],
            **backend_config,
        },
    }


@pytest.fixture
async def proxy(aiohttp_server, registry_file, make_config, proxy_client, tmp_path):
    """One proxy in front of: orchestrated vLLM with and without a tool parser, an Ollama with
    llama3.2-vision (no tools, no thinking) and qwen3 (tools, thinking), and an external vLLM without a
    tool parser whose registry entry says nothing about tools."""
    ollama = FakeOllama(
        {
            "llama3.2-vision:latest": ("completion", "vision"),
            "qwen3:latest": ("completion", "tools", "thinking"),
        },
        responder=ollama_responder,
    )
    base = str((await aiohttp_server(ollama.app())).make_url("")).rstrip("/")
    external_events = tmp_path / "external.jsonl"
    async with contextlib.AsyncExitStack() as stack:
        external = await stack.enter_async_context(
            fake_vllm.started(
                "/models/ext",
                "--served-model-name",
                "ext",
                "--fake-reply",
                "echo",
                "--fake-events",
                str(external_events),
                port=free_port(),
            )
        )
        registry_file(
            [
                vllm_entry("vllm-plain", tmp_path, "echo"),
                vllm_entry("vllm-tools", tmp_path, "tools", tool_call_parser="hermes"),
                ollama_entry("llama-vision", "llama3.2-vision", base),
                ollama_entry("qwen3", "qwen3", base),
                {
                    "name": "external",
                    "backend": "vllm",
                    "served_model_id": "ext",
                    "backend_config": {"base_url": external},
                },
            ]
        )
        client = await proxy_client(make_config(**orch_settings(free_port())))
        client.ollama = ollama
        client.external_events = external_events
        yield client


async def turn(client, model: str, stream: bool, **extra: Any) -> dict[str, Any]:
    """Send a browser turn; returns the reply as one message (``content``, ``tool_calls``,
    ``finish_reason``), checked against the OpenAI schemas."""
    body = openwebui_turn(model, QUESTION, stream=stream, **extra)
    resp = await client.post("/v1/chat/completions", json=body)
    if not stream:
        body = await resp.json()
        assert resp.status == 200, body
        validate_completion(body)
        choice = body["choices"][0]
        return {**choice["message"], "finish_reason": choice["finish_reason"]}
    assert resp.status == 200, await resp.text()
    chunks = sse_events(await resp.read())
    assert chunks[-1] == "[DONE]"
    message: dict[str, Any] = {"content": "", "tool_calls": {}, "finish_reason": None}
    for chunk in chunks[:-1]:
        validate_chunk(chunk)
        for choice in chunk["choices"]:
            delta = choice["delta"]
            message["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                got = message["tool_calls"].setdefault(call["index"], {"function": {"arguments": ""}})
                got["function"]["name"] = call.get("function", {}).get("name") or got["function"].get("name")
                got["function"]["arguments"] += call.get("function", {}).get("arguments") or ""
            message["finish_reason"] = choice["finish_reason"] or message["finish_reason"]
    message["tool_calls"] = [message["tool_calls"][i] for i in sorted(message["tool_calls"])] or None
    return message


def refusals(path) -> list[dict[str, Any]]:
    """The requests a fake vLLM refused, from its event log."""
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == "refused"]


@pytest.mark.parametrize("stream", [False, True])
async def test_orchestrated_vllm_without_a_tool_parser_answers_without_the_tools(proxy, stream, tmp_path):
    reply = await turn(proxy, "vllm-plain", stream)
    assert reply["content"] == f"echo: {QUESTION}" and not reply.get("tool_calls")
    assert refusals(tmp_path / "events.jsonl") == []  # the tools never reached vLLM


@pytest.mark.parametrize("stream", [False, True])
async def test_orchestrated_vllm_with_a_tool_parser_gets_the_tools_and_calls_one(proxy, stream):
    reply = await turn(proxy, "vllm-tools", stream)
    assert reply["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply["tool_calls"]] == [
        ("get_current_timestamp", {})
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_ollama_model_without_tools_answers_without_them(proxy, stream):
    reply = await turn(proxy, "llama-vision", stream)
    assert reply["content"] == f"echo: {QUESTION}"
    assert "tools" not in proxy.ollama.chats[-1]


@pytest.mark.parametrize("stream", [False, True])
async def test_ollama_model_with_tools_gets_them_and_its_call_comes_back(proxy, stream):
    reply = await turn(proxy, "qwen3", stream)
    assert reply["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in reply["tool_calls"]] == ["get_current_timestamp"]
    sent = proxy.ollama.chats[-1]["tools"]
    assert len(sent) == 8 and sent[0]["function"]["name"] == "get_current_timestamp"


@pytest.mark.parametrize("stream", [False, True])
async def test_external_vllm_the_registry_says_nothing_about_is_asked_once_then_known(proxy, stream):
    first = await turn(proxy, "external", stream)
    second = await turn(proxy, "external", stream)
    assert first["content"] == second["content"] == f"echo: {QUESTION}"
    [refused] = refusals(proxy.external_events)  # the second turn went without tools at once
    assert refused["status"] == 400 and "--enable-auto-tool-choice" in refused["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_effort_is_dropped_for_a_model_that_cannot_think_and_reaches_one_that_can(
    proxy, stream
):
    reply = await turn(proxy, "llama-vision", stream, reasoning_effort="high")
    assert reply["content"] == f"echo: {QUESTION}"
    assert "think" not in proxy.ollama.chats[-1]
    await turn(proxy, "qwen3", stream, reasoning_effort="high")
    assert proxy.ollama.chats[-1]["think"] == "high"
    await turn(proxy, "qwen3", stream, reasoning_effort="xhigh")
    assert proxy.ollama.chats[-1]["think"] == "max"


async def test_what_was_dropped_is_logged_once_per_model_and_in_the_request_log(proxy, caplog):
    with caplog.at_level(logging.INFO, logger="imageworks_proxy.capabilities"):
        for _ in range(2):
            await turn(proxy, "llama-vision", False, reasoning_effort="high")
    lines = [r.getMessage() for r in caplog.records if r.name == "imageworks_proxy.capabilities"]
    assert len(lines) == 2, lines  # tools once, reasoning once
    assert "llama-vision has no tools capability (Ollama /api/tags for llama3.2-vision:latest)" in lines[0]
    assert "dropping tools" in lines[0] and "dropping reasoning_effort" in lines[1]
    record = (await log_records(proxy))[-1]
    assert record["capabilities"] == ["vision"]
    assert record["adapted"] == ["tools", "reasoning_effort"]


async def test_models_show_what_each_model_can_take(proxy, make_config):
    listing = await (await proxy.get("/v1/models")).json()
    caps = {m["extensions"]["logical_id"]: m["extensions"]["capabilities"] for m in listing["data"]}
    assert caps == {
        "vllm-plain": [],
        "vllm-tools": ["tools"],
        "llama-vision": ["vision"],
        "qwen3": ["reasoning", "tools"],
        "external": [],
    }


async def test_a_request_that_insists_on_a_tool_call_is_refused_for_a_model_without_tools(proxy):
    body = openwebui_turn("llama-vision", QUESTION, stream=False, tool_choice="required")
    resp = await proxy.post("/v1/chat/completions", json=body)
    assert resp.status == 409
    error = (await resp.json())["error"]
    assert error["code"] == "capability_mismatch" and error["param"] == "tool_choice"
    assert "cannot call tools" in error["message"]
