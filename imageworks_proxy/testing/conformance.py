"""The contract every adapter meets, seen through the proxy: a class of tests that an adapter's test module
subclasses once per adapter.

The subclass (its name starts with ``Test``) defines a ``conformance_backend`` fixture that starts the
adapter's fake upstream and returns a :class:`ConformanceBackend`; the kit's pytest plugin
(``imageworks_proxy.testing.pytest_plugin``) then starts the proxy with those registry entries, settings
and plugins, and every test here runs against it. A subclass may override a ``check_*`` method to check
more (the built-in adapters also validate against the OpenAI JSON schemas), or override one test to mark
it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs

from imageworks_proxy.testing import shapes
from imageworks_proxy.testing.chat import openwebui_turn, sse_events, user

if TYPE_CHECKING:
    import openai
    from aiohttp.test_utils import TestClient


@attrs.define
class ConformanceBackend:
    """One adapter in front of its fake upstream, as the conformance tests need to know it."""

    #: Registry entries (JSON objects) served by the adapter under test.
    entries: list[dict[str, Any]]
    #: Logical name of a model that answers "echo: <last user text>".
    echo: str
    #: Logical name of a model that, offered tools, calls ``get_weather({"city": "Paris"})``.
    tools: str
    #: Logical name of a model the backend does not have; the proxy answers 404 ``model_not_found``.
    missing: str
    #: The adapter's ``name``, as ``/v1/plugins`` lists it.
    adapter: str
    #: ``make_config`` overrides: ``CHAT_PROXY_*`` names without the prefix, e.g. ``{"vllm_port": "24001"}``.
    settings: dict[str, str] = attrs.field(factory=dict)
    #: Plugins registered besides the built-ins (modules or objects with hook implementations), e.g. the
    #: module holding the adapter's ``register_backends``.
    plugins: tuple[Any, ...] = ()


@attrs.frozen
class Conformance:
    """What each conformance test gets: the backend, a test client of the started proxy, and an
    ``openai.AsyncOpenAI`` pointed at it."""

    backend: ConformanceBackend
    client: TestClient
    sdk: openai.AsyncOpenAI


class AdapterConformance:
    """Tests every adapter passes. Subclass as ``Test<Adapter>Conformance`` and define the
    ``conformance_backend`` fixture (see the module docstring); the tests take the ``conformance`` fixture."""

    def check_completion(self, body: Any) -> None:
        """Called with every non-streamed completion; raises ``AssertionError`` when it is malformed."""
        shapes.check_completion(body)

    def check_chunk(self, chunk: Any) -> None:
        """Called with every streamed chunk; raises ``AssertionError`` when it is malformed."""
        shapes.check_chunk(chunk)

    def check_error(self, body: Any) -> None:
        """Called with every error body; raises ``AssertionError`` when it is malformed."""
        shapes.check_error(body)

    async def test_models_are_routed_to_the_adapter(self, conformance: Conformance) -> None:
        spec, client = conformance.backend, conformance.client
        listing = await (await client.get("/v1/plugins")).json()
        assert any(a["name"] == spec.adapter for p in listing["data"] for a in p["adapters"])
        models = await (await client.get("/v1/models")).json()
        assert spec.echo in {m["extensions"]["logical_id"] for m in models["data"]}

    async def test_non_streamed_completion_conforms(self, conformance: Conformance) -> None:
        spec, client = conformance.backend, conformance.client
        resp = await client.post("/v1/chat/completions", json={"model": spec.echo, "messages": user("ping")})
        body = await resp.json()
        self.check_completion(body)
        assert body["choices"][0]["message"]["content"].strip() == "echo: ping"
        assert body["model"] == spec.echo
        assert body["usage"]["total_tokens"] >= body["usage"]["completion_tokens"]

    async def test_stream_conforms(self, conformance: Conformance) -> None:
        spec, client = conformance.backend, conformance.client
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
            self.check_chunk(c)
        roles = [ch["delta"].get("role") for c in chunks for ch in c["choices"] if ch["delta"].get("role")]
        assert roles == ["assistant"] and chunks[0]["choices"][0]["delta"].get("role") == "assistant"
        finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
        assert finishes == ["stop"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
        assert text.strip() == "echo: ping pong"
        assert len({c["id"] for c in chunks}) == 1

    async def test_an_openwebui_browser_turn_is_answered(self, conformance: Conformance) -> None:
        """OpenWebUI's browser UI offers its built-in tools on every turn; the ``echo`` model answers
        whether or not it can take tools (a model that cannot gets the request without them)."""
        spec, client = conformance.backend, conformance.client
        resp = await client.post("/v1/chat/completions", json=openwebui_turn(spec.echo, "ping", stream=False))
        body = await resp.json()
        assert resp.status == 200, body
        self.check_completion(body)
        assert body["choices"][0]["message"]["content"].strip() == "echo: ping"

    async def test_a_streamed_openwebui_browser_turn_is_answered(self, conformance: Conformance) -> None:
        spec, client = conformance.backend, conformance.client
        resp = await client.post("/v1/chat/completions", json=openwebui_turn(spec.echo, "ping pong"))
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.read())
        assert events[-1] == "[DONE]"
        for c in events[:-1]:
            self.check_chunk(c)
        text = "".join(ch["delta"].get("content") or "" for c in events[:-1] for ch in c["choices"])
        assert text.strip() == "echo: ping pong"

    async def test_streamed_tool_call_round_trip(self, conformance: Conformance) -> None:
        final = await _streamed_tool_call(conformance)
        call = final.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert final.choices[0].finish_reason == "tool_calls"

    async def test_tool_call_ids_have_the_openai_form(self, conformance: Conformance) -> None:
        final = await _streamed_tool_call(conformance)
        assert final.choices[0].message.tool_calls[0].id.startswith("call_")

    async def test_backend_model_not_found_is_404(self, conformance: Conformance) -> None:
        spec, client = conformance.backend, conformance.client
        resp = await client.post("/v1/chat/completions", json={"model": spec.missing, "messages": user("x")})
        assert resp.status == 404
        body = await resp.json()
        self.check_error(body)
        assert body["error"]["code"] == "model_not_found"


async def _streamed_tool_call(conformance: Conformance) -> Any:
    """Ask the ``tools`` model about the weather, streamed through the SDK; the SDK's final completion."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async with conformance.sdk.chat.completions.stream(
        model=conformance.backend.tools, messages=user("weather?"), tools=tools
    ) as stream:
        return await stream.get_final_completion()
