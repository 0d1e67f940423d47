"""The JSON-tool heuristic runs only where the upstream has no tool parser of its own.

OpenWebUI puts its built-in tools on every browser turn, so a heuristic that ran whenever tools were
offered would hold back every reply that starts like JSON until it ended. Here an upstream stalls in the
middle of such a reply until the test has seen what reached the client.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.http import sse

#: A browser turn from OpenWebUI 0.12: a system message, its built-in tools, no tool_choice, streamed.
BUILTIN_TOOLS = [
    {"type": "function", "function": {"name": name, "description": text,
                                      "parameters": {"type": "object", "properties": params}}}
    for name, text, params in [
        ("search_web", "Search the web.", {"query": {"type": "string"}}),
        ("query_knowledge_files", "Search the knowledge bases.", {"query": {"type": "string"}}),
        ("search_chats", "Search earlier chats.", {"query": {"type": "string"}}),
        ("add_memory", "Remember something about the user.", {"content": {"type": "string"}}),
    ]
]
BROWSER_TURN = {
    "stream": True,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Give me the weather in Paris as JSON."},
    ],
    "tools": BUILTIN_TOOLS,
}
RELEASE_AFTER_S = 5.0  # the upstream finishes anyway after this, so a broken proxy fails instead of hanging


class StallingUpstream:
    """An OpenAI-compatible upstream that streams ``before``, waits for :attr:`release` (at most
    ``RELEASE_AFTER_S``), then streams ``after`` and the finish. :attr:`finished`: it got that far."""

    def __init__(self, before: list[str], after: list[str]) -> None:
        self.before, self.after = before, after
        self.release = asyncio.Event()
        self.finished = False
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)

    @staticmethod
    def _event(delta: dict, finish: str | None = None) -> bytes:
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1767225600, "model": "m",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(self._event({"role": "assistant", "content": ""}))
        for piece in self.before:
            await resp.write(self._event({"content": piece}))
        try:
            await asyncio.wait_for(self.release.wait(), RELEASE_AFTER_S)
        except TimeoutError:
            pass
        for piece in self.after:
            await resp.write(self._event({"content": piece}))
        self.finished = True
        await resp.write(self._event({}, "stop") + b"data: [DONE]\n\n")
        return resp


async def _start(aiohttp_server, registry_file, make_config, proxy_client, upstream, backend, metadata=None):
    server = await aiohttp_server(upstream.app)
    base_url = str(server.make_url("/v1"))
    registry_file([{"name": "m", "backend": backend, "backend_config": {"base_url": base_url},
                    "capabilities": ["tools"], "metadata": metadata or {}}])
    return await proxy_client(make_config())


async def _next_event(resp) -> bytes:
    return await resp.content.readuntil(b"\n\n")


def _delta(event: bytes) -> dict:
    return json.loads(event[len(b"data: "):])["choices"][0]["delta"]


@pytest.mark.parametrize("backend", ["openai", "vllm"])
async def test_a_reply_that_looks_like_json_streams_as_it_comes_from_an_upstream_with_a_tool_parser(
    aiohttp_server, registry_file, make_config, proxy_client, backend
):
    upstream = StallingUpstream(before=['{"name": "search_web", ', '"city": "Paris", '],
                                after=['"temperature_c": 18}'])
    client = await _start(aiohttp_server, registry_file, make_config, proxy_client, upstream, backend)
    resp = await client.post("/v1/chat/completions", json={"model": "m", **BROWSER_TURN})
    assert resp.status == 200
    seen = ""
    while len(seen) < len('{"name": "search_web", "city": "Paris", '):
        event = await _next_event(resp)
        if event == b"data: [DONE]\n\n":
            break
        if event.startswith(b"data: "):
            seen += _delta(event).get("content") or ""
    assert not upstream.finished  # the text reached the client while the upstream was still mid-reply
    upstream.release.set()
    rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n") and b"tool_calls" not in rest
    later = [_delta(e).get("content") or "" for e in rest.split(b"\n\n") if e.startswith(b"data: {")]
    text = seen + "".join(later)
    assert text == '{"name": "search_web", "city": "Paris", "temperature_c": 18}'


async def test_keep_alives_flow_while_the_heuristic_holds_a_possible_tool_call_back(
    aiohttp_server, registry_file, make_config, proxy_client, monkeypatch
):
    monkeypatch.setattr(sse.SSEWriter.__init__, "__defaults__", (0.2,))
    upstream = StallingUpstream(before=['{"name": "search_web", '],
                                after=['"arguments": {"query": "Paris"}}'])
    client = await _start(aiohttp_server, registry_file, make_config, proxy_client, upstream, "openai",
                          metadata={"tool_parser": "none"})
    resp = await client.post("/v1/chat/completions", json={"model": "m", **BROWSER_TURN})
    assert resp.status == 200
    first = await _next_event(resp)
    while not first.startswith(b"data: "):
        first = await _next_event(resp)
    assert _delta(first) == {"role": "assistant", "content": ""}  # data has started; the JSON is held back
    assert await _next_event(resp) == b": keep-alive\n\n"
    assert not upstream.finished
    upstream.release.set()
    events = [json.loads(e[6:]) for e in (await resp.read()).split(b"\n\n") if e.startswith(b"data: {")]
    calls = [c for e in events for ch in e["choices"] for c in ch["delta"].get("tool_calls", ())]
    assert [c["function"]["name"] for c in calls] == ["search_web"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"query": "Paris"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    "backend, backend_config, adapter",
    [
        ("openai", {"base_url": "http://h:1/v1"}, "openai-passthrough"),
        ("lmdeploy", {"base_url": "http://h:1/v1"}, "openai-passthrough"),
        ("vllm", {"base_url": "http://h:1/v1"}, "vllm-external"),
        ("vllm", {"model_path": "/w/qwen"}, "vllm-orchestrated"),
        ("ollama", {"model_path": "ollama:/qwen3:8b"}, "ollama"),
    ],
)
async def test_every_built_in_adapter_parses_tool_calls_natively_unless_the_registry_says_none(
    registry_file, make_config, proxy_client, backend, backend_config, adapter
):
    client = await proxy_client(make_config())
    models = keys.models(client.app)
    native = parse_entry({"name": "a", "backend": backend, "backend_config": backend_config})
    declared = parse_entry({"name": "b", "backend": backend, "backend_config": backend_config,
                            "metadata": {"tool_parser": "none"}})
    assert models.adapter_for(native).name == adapter
    assert models.adapter_for(native).native_tool_parser(native) is True
    assert models.adapter_for(declared).native_tool_parser(declared) is False
