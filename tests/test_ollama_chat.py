"""Chat through the proxy to a fake Ollama (native /api/chat), seen from the openai SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import json

import attrs
import openai
import pytest
from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes.ollama import FakeOllama, Reply, ollama_entry
from tests.openai_schemas import validate_chunk, validate_completion, validate_error

MODEL = "llama3.2 3b"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
TOOLS = [{"type": "function", "function": {
    "name": "get_time", "description": "Current time in a zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]


@attrs.define
class Env:
    client: object
    fake: FakeOllama
    sdk: openai.AsyncOpenAI
    base: str


@pytest.fixture
async def env(aiohttp_server, registry_file, make_config, proxy_client):
    sdks = []

    async def start(*, fake: FakeOllama | None = None, entry: dict | None = None, **overrides):
        fake = fake or FakeOllama()
        server = await aiohttp_server(fake.app())
        base = str(server.make_url("")).rstrip("/")
        registry_file([entry if entry is not None else ollama_entry(base)])
        client = await proxy_client(make_config(**overrides))
        sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
        sdks.append(sdk)
        return Env(client, fake, sdk, base)

    yield start
    for sdk in sdks:
        await sdk.close()


async def collect(stream):
    """Validate every chunk and gather what a client shows."""
    out = {"content": "", "reasoning": "", "roles": [], "finish": [], "usage": None, "calls": {}, "chunks": 0}
    async for chunk in stream:
        out["chunks"] += 1
        validate_chunk(chunk.model_dump(exclude_unset=True))
        if chunk.usage:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            out["roles"].append(delta.role)
            out["content"] += delta.content or ""
            out["reasoning"] += (delta.model_extra or {}).get("reasoning_content") or ""
            for tc in delta.tool_calls or ():
                slot = out["calls"].setdefault(tc.index, {"id": "", "name": "", "arguments": "", "deltas": 0})
                slot["deltas"] += 1
                slot["id"] += tc.id or ""
                slot["name"] += (tc.function.name if tc.function else None) or ""
                slot["arguments"] += (tc.function.arguments if tc.function else None) or ""
            if choice.finish_reason:
                out["finish"].append(choice.finish_reason)
    return out


# -- plain chat ------------------------------------------------------------------------------------
async def test_completion_names_requested_model_and_reports_usage(env):
    e = await env(OLLAMA_KEEP_ALIVE="10m")
    completion = await e.sdk.chat.completions.create(model=MODEL, messages=user("hello there"))
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL
    assert (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (11, 5, 16)
    sent = e.fake.chats[-1]
    assert sent["model"] == "llama3.2:latest" and sent["stream"] is False and sent["keep_alive"] == "10m"
    resp = await e.client.post("/v1/chat/completions", json={"model": MODEL, "messages": user("x")})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
    validate_completion(await resp.json())


async def test_sampling_settings_context_size_and_registry_defaults_reach_ollama(env, aiohttp_server):
    fake = FakeOllama()
    server = await aiohttp_server(fake.app())
    base = str(server.make_url("")).rstrip("/")
    entry = ollama_entry(
        base,
        backend_config={"extra_args": ["--num-ctx", "16384"]},
        generation_defaults={"temperature": 0.3, "top_k": 20, "max_tokens": 256},
    )
    e = await env(fake=fake, entry=entry)
    await e.sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Be terse."}, *user("hi")],
        top_p=0.8,
        seed=42,
        stop=["\n\n"],
        max_completion_tokens=64,
        frequency_penalty=0.1,
        presence_penalty=0.2,
        response_format={"type": "json_object"},
    )
    sent = fake.chats[-1]
    assert sent["options"] == {
        "num_ctx": 16384,
        "temperature": 0.3,
        "top_k": 20,
        "top_p": 0.8,
        "seed": 42,
        "stop": ["\n\n"],
        "num_predict": 64,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
    }
    assert sent["format"] == "json"
    assert sent["messages"][0] == {"role": "system", "content": "Be terse."}
    assert "keep_alive" not in sent


async def test_entry_without_host_uses_the_configured_ollama_base_url(env, aiohttp_server):
    fake = FakeOllama()
    server = await aiohttp_server(fake.app())
    e = await env(
        fake=FakeOllama(), entry=ollama_entry(None), OLLAMA_BASE_URL=str(server.make_url("")).rstrip("/")
    )
    completion = await e.sdk.chat.completions.create(model=MODEL, messages=user("where?"))
    assert completion.choices[0].message.content == "echo: where?"
    assert len(fake.chats) == 1  # the configured server answered


async def test_stream_has_role_first_many_deltas_finish_usage_and_done(env):
    e = await env()
    stream = await e.sdk.chat.completions.create(
        model=MODEL, messages=user("one two three"), stream=True, stream_options={"include_usage": True}
    )
    got = await collect(stream)
    assert got["content"] == "echo: one two three"
    assert got["chunks"] >= 6  # streamed in pieces, not buffered
    assert got["roles"][0] == "assistant" and got["roles"].count("assistant") == 1
    assert got["finish"] == ["stop"]
    assert got["usage"].total_tokens == 16
    assert e.fake.chats[-1]["stream"] is True
    resp = await e.client.post(
        "/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("hi")}
    )
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    for ev in events[:-1]:
        validate_chunk(ev)
    assert all(ev["choices"] for ev in events[:-1])  # no usage chunk when not asked


async def test_reasoning_shows_up_as_reasoning_content(env):
    e = await env(fake=FakeOllama(responder=lambda body: Reply(content="42", thinking="Six times seven.")))
    completion = await e.sdk.chat.completions.create(
        model=MODEL, messages=user("answer?"), reasoning_effort="high"
    )
    assert completion.choices[0].message.content == "42"
    assert completion.choices[0].message.model_extra["reasoning_content"] == "Six times seven."
    assert e.fake.chats[-1]["think"] == "high"
    got = await collect(
        await e.sdk.chat.completions.create(model=MODEL, messages=user("answer?"), stream=True)
    )
    assert got["reasoning"] == "Six times seven." and got["content"] == "42"


# -- tools -----------------------------------------------------------------------------------------
def tool_responder(body):
    last = body["messages"][-1]
    if last["role"] == "tool":
        return Reply(content=f"It is {last['content']} in Paris.")
    return Reply(
        content="", tool_calls=[{"function": {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}}]
    )


async def test_tools_round_trip_call_result_answer(env):
    e = await env(fake=FakeOllama(responder=tool_responder))
    messages = user("What time is it in Paris?")
    completion = await e.sdk.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    validate_completion(completion.model_dump(exclude_unset=True))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"tz": "Europe/Paris"}
    assert e.fake.chats[-1]["tools"] == TOOLS

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
    ]
    answer = await e.sdk.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == "It is 12:00 in Paris."
    sent = e.fake.chats[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"tz": "Europe/Paris"}  # an object again
    assert sent[2] == {"role": "tool", "content": "12:00", "tool_call_id": call.id, "tool_name": "get_time"}


async def test_streamed_tool_calls_have_index_and_name_once(env):
    calls = [
        {"function": {"name": "get_time", "arguments": {"tz": "UTC"}}},
        {"function": {"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}},
    ]
    e = await env(fake=FakeOllama(responder=lambda body: Reply(content="", tool_calls=calls)))
    got = await collect(
        await e.sdk.chat.completions.create(model=MODEL, messages=user("times?"), tools=TOOLS, stream=True)
    )
    assert got["finish"] == ["tool_calls"]
    assert sorted(got["calls"]) == [0, 1]
    for index, tz in ((0, "UTC"), (1, "Asia/Tokyo")):
        slot = got["calls"][index]
        assert slot["name"] == "get_time"  # not concatenated: the name came once
        assert slot["id"].startswith("call_")
        assert json.loads(slot["arguments"]) == {"tz": tz}
    assert got["calls"][0]["id"] != got["calls"][1]["id"]
    # the SDK's own accumulator agrees
    async with e.sdk.chat.completions.stream(model=MODEL, messages=user("times?"), tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    assert [json.loads(tc.function.arguments) for tc in final.choices[0].message.tool_calls] == [
        {"tz": "UTC"},
        {"tz": "Asia/Tokyo"},
    ]


# -- images ----------------------------------------------------------------------------------------
async def test_image_reaches_ollama_as_raw_base64_while_streaming(env):
    e = await env()
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": PNG_URL}}]
    got = await collect(
        await e.sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], stream=True
        )
    )
    assert got["content"] == "echo: what is this [1 image(s)]"
    assert got["chunks"] >= 5
    sent = e.fake.chats[-1]["messages"][-1]
    assert sent == {"role": "user", "content": "what is this", "images": [base64.b64encode(PNG).decode()]}


async def _image_server(aiohttp_server, body: bytes):
    async def serve(request):
        if request.match_info["name"] == "missing.png":
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="image/png")

    app = web.Application()
    app.router.add_get("/img/{name}", serve)
    return await aiohttp_server(app)


async def test_http_image_url_is_fetched_by_the_proxy(env, aiohttp_server):
    images = await _image_server(aiohttp_server, PNG)
    e = await env(IMAGE_FETCH_ALLOW="127.0.0.1")  # a local image host must be allowed
    content = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": str(images.make_url("/img/a.png"))}},
    ]
    completion = await e.sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}]
    )
    assert completion.choices[0].message.content == "echo: describe [1 image(s)]"
    assert e.fake.chats[-1]["messages"][-1]["images"] == [base64.b64encode(PNG).decode()]


async def test_http_image_over_the_cap_is_413_and_missing_image_is_400(env, aiohttp_server):
    images = await _image_server(aiohttp_server, b"\x89PNG" + b"0" * 5000)
    e = await env(MAX_IMAGE_BYTES=1000, IMAGE_FETCH_ALLOW="127.0.0.1")
    for name, status, code in (("big.png", 413, "payload_too_large"), ("missing.png", 400, "invalid_image")):
        content = [{"type": "image_url", "image_url": {"url": str(images.make_url(f"/img/{name}"))}}]
        resp = await e.client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": content}]}
        )
        assert resp.status == status
        body = await resp.json()
        validate_error(body)
        assert body["error"]["code"] == code
    assert e.fake.chats == []  # nothing reached Ollama


# -- errors ----------------------------------------------------------------------------------------
async def test_model_missing_in_ollama_is_a_clean_404(env, aiohttp_server):
    fake = FakeOllama()
    server = await aiohttp_server(fake.app())
    entry = ollama_entry(str(server.make_url("")).rstrip("/"), tag="qwen3:8b")
    e = await env(fake=fake, entry=entry, INCLUDE_NON_INSTALLED=1)
    with pytest.raises(openai.NotFoundError) as err:
        await e.sdk.chat.completions.create(model=MODEL, messages=user("hi"))
    assert err.value.body["code"] == "model_not_found"
    assert "qwen3:8b" in err.value.body["message"]
    resp = await e.client.post(
        "/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("hi")}
    )
    assert resp.status == 404 and resp.headers["Content-Type"].startswith("application/json")
    validate_error(await resp.json())


async def test_ollama_down_is_503_with_retry_after(env, unused_tcp_port_factory):
    e = await env(entry=ollama_entry(f"http://127.0.0.1:{unused_tcp_port_factory()}"))
    for stream in (False, True):
        resp = await e.client.post(
            "/v1/chat/completions", json={"model": MODEL, "stream": stream, "messages": user("hi")}
        )
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        body = await resp.json()
        validate_error(body)
        assert body["error"]["code"] == "backend_unavailable"


@pytest.mark.parametrize(
    ("status", "message", "want_status", "want_code"),
    [
        (500, "llama runner process has terminated", 502, "backend_error"),
        (400, "registry.ollama.ai/library/x does not support tools", 400, "backend_rejected"),
    ],
)
async def test_ollama_http_errors_map_to_the_spec(env, status, message, want_status, want_code):
    e = await env(fake=FakeOllama(responder=lambda body: Reply(status=status, error=message)))
    for stream in (False, True):
        resp = await e.client.post(
            "/v1/chat/completions", json={"model": MODEL, "stream": stream, "messages": user("hi")}
        )
        assert resp.status == want_status
        body = await resp.json()
        validate_error(body)
        assert body["error"]["code"] == want_code
        assert message in body["error"]["message"]


async def test_error_in_the_first_line_is_a_json_error_not_a_stream(env):
    e = await env(
        fake=FakeOllama(
            responder=lambda body: Reply(error="input length exceeds context length", error_after=0)
        )
    )
    resp = await e.client.post(
        "/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("hi")}
    )
    assert resp.status == 502 and resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    validate_error(body)
    assert "context length" in body["error"]["message"]


async def test_mid_stream_error_is_an_in_band_event_then_done(env):
    e = await env(
        fake=FakeOllama(
            responder=lambda body: Reply(content="partial answer", error="out of memory", error_after=2)
        )
    )
    with pytest.raises(openai.APIError) as err:
        await collect(await e.sdk.chat.completions.create(model=MODEL, messages=user("hi"), stream=True))
    assert "out of memory" in err.value.message
    resp = await e.client.post(
        "/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("hi")}
    )
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "backend_error"
    validate_error(events[-2])
    assert "".join(ev["choices"][0]["delta"].get("content", "") for ev in events[:-2]) == "partial "


async def test_stream_cut_short_is_an_in_band_error(env):
    e = await env(fake=FakeOllama(responder=lambda body: Reply(content="abcdefgh", cut_after=1)))
    resp = await e.client.post(
        "/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("hi")}
    )
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "backend_error"


async def test_stream_idle_timeout_is_an_in_band_error(env):
    e = await env(
        fake=FakeOllama(responder=lambda body: Reply(content="abcdefgh", stall_after=1)),
        STREAM_IDLE_TIMEOUT_MS=200,
    )
    resp = await e.client.post(
        "/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("hi")}
    )
    assert resp.status == 200
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "stream_idle_timeout"
    assert events[1]["choices"][0]["delta"]["content"] == "abcd"  # what arrived before the stall was sent


async def test_backend_timeout_is_504(env):
    e = await env(fake=FakeOllama(responder=lambda body: Reply(delay_s=5)), BACKEND_TIMEOUT_MS=200)
    for stream in (False, True):
        resp = await e.client.post(
            "/v1/chat/completions", json={"model": MODEL, "stream": stream, "messages": user("hi")}
        )
        assert resp.status == 504
        body = await resp.json()
        validate_error(body)
        assert body["error"]["code"] == "backend_timeout"


async def test_client_disconnect_stops_the_ollama_stream(env):
    e = await env(
        fake=FakeOllama(responder=lambda body: Reply(content="x" * 400, piece=1, line_delay_s=0.01))
    )
    resp = await e.client.post(
        "/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("hi")}
    )
    await resp.content.readline()  # the stream is flowing
    resp.close()
    for _ in range(200):  # wait (bounded) until the fake notices its client went away
        if e.fake.disconnects:
            break
        await asyncio.sleep(0.02)
    assert e.fake.disconnects == 1


async def test_slow_model_load_gets_keep_alives_before_the_first_token(env):
    e = await env(fake=FakeOllama(responder=lambda body: Reply(content="ready", delay_s=0.6)))
    keys.models(e.client.app).adapters["ollama"].stream_commit_after_s = 0.1
    resp = await e.client.post(
        "/v1/chat/completions", json={"model": MODEL, "stream": True, "messages": user("hi")}
    )
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    raw = await resp.read()
    assert raw.startswith(b": keep-alive\n\n")  # sent while Ollama was still loading
    events = sse_events(raw)
    assert (
        "".join(ev["choices"][0]["delta"].get("content", "") for ev in events[:-1] if ev["choices"])
        == "ready"
    )
    assert events[-1] == "[DONE]"
