"""Fuzzing every route: random JSON, chat-shaped bodies with random field values, and raw or compressed
bytes go to every route the app serves (found on its router, so new routes are covered too), with fake
OpenAI-compatible and Ollama upstreams behind it. Whatever arrives, the answer is never a 500, every error
is in the OpenAI error shape, and a stream's in-band errors are never ``internal_error``.

Hypothesis drives a synchronous test; the proxy and the fakes run on an event loop in a thread.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageworks_proxy.testing import sse_events
from imageworks_proxy.testing.fakes.ollama import FakeOllama, ollama_entry
from imageworks_proxy.testing.fakes.openai import make_fake_openai, registry_for
from tests.openai_schemas import validate_chunk, validate_completion, validate_error

#: Fake upstream behaviours that answer at once (the slow and hanging ones would only make this slower).
MODELS = [
    "m-echo",
    "m-tools",
    "m-tools_object_args",
    "m-legacy",
    "m-json_tool",
    "m-reasoning",
    "m-minimal",
    "m-error400_flat",
    "m-error404",
    "m-error500",
    "m-error200",
    "m-midstream_error",
    "m-drop",
    "m-not_json",
    "m-json_for_stream",
    "llama3.2-3b",
]
FAST_MODES = [m.removeprefix("m-") for m in MODELS if m.startswith("m-")]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=12)
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def often(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(good, good, anything)


png = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": often(st.text(max_size=20))}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": often(st.fixed_dictionaries({"url": often(st.just(png))})),
        }
    ),
    anything,
)
tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": often(st.fixed_dictionaries({"name": often(st.text(max_size=8))})),
    }
)
message = st.fixed_dictionaries(
    {"role": often(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))},
    optional={
        "content": often(st.text(max_size=30) | st.lists(part, max_size=3)),
        "tool_calls": often(st.lists(anything, max_size=2)),
        "tool_call_id": often(st.text(max_size=6)),
        "name": often(st.text(max_size=6)),
    },
)
chat_body = st.fixed_dictionaries(
    {"model": often(st.sampled_from(MODELS)), "messages": often(st.lists(message, min_size=1, max_size=4))},
    optional={
        "stream": often(st.booleans()),
        "stream_options": often(st.fixed_dictionaries({"include_usage": often(st.booleans())})),
        "tools": often(st.lists(tool, max_size=2)),
        "tool_choice": often(st.sampled_from(["auto", "none", "required"])),
        "functions": anything,
        "max_tokens": often(st.integers(-2, 5000)),
        "max_completion_tokens": anything,
        "temperature": anything,
        "n": anything,
        "logprobs": anything,
        "response_format": anything,
        "think": anything,
        "num_ctx": anything,
    },
)


@st.composite
def request_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """(body bytes, headers): JSON of any shape, chat-shaped JSON, raw bytes, and compressed variants."""
    kind = draw(st.sampled_from(["chat", "chat", "chat", "json", "bytes"]))
    if kind == "bytes":
        raw = draw(st.binary(max_size=64))
    else:
        raw = json.dumps(draw(chat_body if kind == "chat" else anything)).encode()
    headers = {
        "Content-Type": draw(
            st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"])
        )
    }
    encoding = draw(st.sampled_from([None, None, None, "gzip", "gzip-broken", "deflate", "br"]))
    if encoding == "gzip":
        raw = gzip.compress(raw)
    elif encoding == "gzip-broken":
        raw, encoding = gzip.compress(raw)[: max(1, len(raw) // 2)], "gzip"
    if encoding:
        headers["Content-Encoding"] = encoding
    return raw, headers


class Served:
    """The proxy and its fake upstreams on a private event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.session: aiohttp.ClientSession | None = None
        self.base = ""
        self.routes: list[tuple[str, str]] = []

    def run(self, coro: Awaitable[Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    async def serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        for runner in reversed(self.runners):
            await runner.cleanup()

    def close(self) -> None:
        self.run(self.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served(registry_file, make_config, make_app):
    box = Served()

    async def start() -> None:
        openai_base = await box.serve(make_fake_openai())
        ollama_base = await box.serve(FakeOllama().app())
        registry = [e for e in registry_for(openai_base + "/v1") if e["served_model_id"] in FAST_MODES]
        registry_file(registry + [ollama_entry(ollama_base)])
        app = make_app(
            make_config(enable_metrics="1", stream_idle_timeout_ms="3000", backend_timeout_ms="5000")
        )
        box.base = await box.serve(app)
        box.routes = sorted(
            {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
            | {("GET", "/v1/no-such-route"), ("DELETE", "/v1/chat/completions")}
        )
        box.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    try:
        box.run(start())
        yield box
    finally:
        box.close()


async def _call(box: Served, method: str, path: str, raw: bytes, headers: dict[str, str]):
    assert box.session is not None
    data = raw if method not in ("GET", "HEAD") else None
    async with box.session.request(method, box.base + path, data=data, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


def check_answer(route: tuple[str, str], status: int, content_type: str, raw: bytes) -> None:
    assert status != 500 and status < 600, (route, status, raw[:300])
    if status >= 400:
        body = json.loads(raw)
        validate_error(body)
        assert body["error"]["code"] != "internal_error", body
    elif content_type.startswith("text/event-stream"):
        events = sse_events(raw)
        assert events and events[-1] == "[DONE]", raw[-300:]
        for event in events[:-1]:
            if "error" in event:
                validate_error(event)
                assert event["error"]["code"] != "internal_error", event
            else:
                validate_chunk(event)
    elif route == ("POST", "/v1/chat/completions"):
        validate_completion(json.loads(raw))
    elif content_type.startswith("application/json"):
        json.loads(raw)


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), body=request_bodies())
def test_no_route_answers_500_or_an_error_outside_the_openai_shape(served, data, body):
    route = data.draw(
        st.one_of(st.just(("POST", "/v1/chat/completions")), st.sampled_from(served.routes)), label="route"
    )
    raw, headers = body
    status, content_type, answer = served.run(_call(served, *route, raw, headers))
    check_answer(route, status, content_type, answer)
