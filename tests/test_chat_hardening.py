"""Edge cases of the chat core seen from clients: OpenWebUI-shaped requests, stream endings (finish, usage,
[DONE]), the tool-call content heuristic, line splitting, client disconnects and adapters that fail oddly."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket

import aiohttp
import openai
import pytest
from aiohttp import web

from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.http import sse
from imageworks_proxy.pipeline.stage import Stage
from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes import openai as fake_openai
from imageworks_proxy.testing.fakes.openai import (
    REQUESTS,
    SCRIPTS,
    make_fake_openai,
    registry_for,
    scripted_entry,
)
from tests.openai_schemas import validate_chunk, validate_error

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def ch(delta=None, finish=None, **extra):
    """One scripted upstream chunk with a single choice."""
    return {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}


@pytest.fixture
def env(aiohttp_server, registry_file, make_config, proxy_client, openai_sdk):
    """start(scripts={name: events}, vision=False, backend="openai", tool_parser=None, **config)
    -> (client, fake, sdk); ``tool_parser`` goes into the scripted entries' ``metadata``."""

    async def start(scripts=None, vision=False, backend="openai", tool_parser=None, **overrides):
        fake = make_fake_openai()
        fake[SCRIPTS].update(scripts or {})
        server = await aiohttp_server(fake)
        base = str(server.make_url("/v1"))
        entries = registry_for(base, vision=vision)
        for name in scripts or {}:
            entry = scripted_entry(base, name, vision=vision)
            entry["backend"] = backend
            if tool_parser:
                entry["metadata"] = {"tool_parser": tool_parser}
            entries.append(entry)
        registry_file(entries)
        client = await proxy_client(make_config(**overrides))
        return client, fake, openai_sdk(client)

    return start


async def stream_events(client, model, **body):
    resp = await client.post("/v1/chat/completions", json={"model": model, "stream": True, **body})
    assert resp.status == 200, await resp.text()
    raw = await resp.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        if "error" not in e:
            validate_chunk(e)
    return raw, events[:-1]


def finishes(chunks):
    return [
        (c["index"], c["finish_reason"]) for e in chunks for c in e.get("choices", []) if c["finish_reason"]
    ]


def text_of(chunks, field="content"):
    return "".join(c["delta"].get(field) or "" for e in chunks for c in e.get("choices", []))


# -- OpenWebUI-shaped requests --------------------------------------------------------------------------


async def test_openwebui_shaped_request_goes_through_with_its_extras(env):
    client, fake, _ = await env(vision=True)
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
    pdf = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4").decode()
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "detail": "auto"}},
                {"type": "file", "file": {"file_data": pdf, "filename": "a.pdf"}},
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            ],
            "cache_control": {"type": "ephemeral"},
        },
    ]
    _, chunks = await stream_events(
        client,
        "m-echo",
        messages=messages,
        stream_options={"include_usage": True},
        temperature=0.6,
        top_k=40,
        num_ctx=8192,
        chat_template_kwargs={"enable_thinking": False},
    )
    assert text_of(chunks).strip() == "echo: What is in this picture? Be brief."
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    sent = fake[REQUESTS][-1]["body"]
    assert sent["messages"][1] == messages[1]  # file part, cache_control and the image arrive untouched
    assert (sent["top_k"], sent["num_ctx"], sent["chat_template_kwargs"]) == (
        40,
        8192,
        {"enable_thinking": False},
    )


async def test_stream_options_on_a_non_streamed_request_do_not_make_the_backend_refuse_it(env):
    client, fake, _ = await env()
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "m-echo",
            "messages": user("hi"),
            "stream": False,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"] == "echo: hi"
    assert "stream_options" not in fake[REQUESTS][-1]["body"]


async def test_sdk_streams_a_vision_request(env):
    _, fake, sdk = await env(vision=True)
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 100).decode()
    parts = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    stream = await sdk.chat.completions.create(
        model="m-echo", messages=[{"role": "user", "content": parts}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.strip() == "echo: describe"
    assert fake[REQUESTS][-1]["body"]["messages"][0]["content"][1]["image_url"]["url"].endswith(png)


async def test_generation_defaults_reach_the_backend_only_where_the_request_is_silent(
    aiohttp_server, registry_file, make_config, proxy_client
):
    fake = make_fake_openai()
    server = await aiohttp_server(fake)
    registry_file(
        [
            {
                "name": "tuned",
                "backend": "openai",
                "served_model_id": "echo",
                "backend_config": {"base_url": str(server.make_url("/v1"))},
                "generation_defaults": {
                    "temperature": 0.2,
                    "top_p": 0.8,
                    "max_tokens": 256,
                    "stop_sequences": ["</s>"],
                },
            }
        ]
    )
    client = await proxy_client(make_config())
    resp = await client.post(
        "/v1/chat/completions", json={"model": "tuned", "messages": user("x"), "temperature": 1.0}
    )
    assert resp.status == 200
    sent = fake[REQUESTS][-1]["body"]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"]) == (1.0, 0.8, 256, ["</s>"])


# -- how a stream ends: finish_reason once per choice, usage last, [DONE] ---------------------------------


async def test_usage_is_absent_unless_asked_and_last_before_done_when_asked(env):
    client, _, _ = await env()
    _, plain = await stream_events(client, "m-echo", messages=user("a b"))
    assert all(e["choices"] for e in plain) and not any(e.get("usage") for e in plain)
    _, asked = await stream_events(
        client, "m-echo", messages=user("a b"), stream_options={"include_usage": True}
    )
    assert asked[-1]["choices"] == [] and asked[-1]["usage"] == USAGE
    assert finishes(asked) == [(0, "stop")]


async def test_a_finish_reason_the_upstream_repeats_reaches_the_client_once(env):
    script = [
        ch({"role": "assistant", "content": "Hi"}),
        ch(finish="stop"),
        ch(finish="stop"),
        {"choices": [], "usage": USAGE},
    ]
    client, _, _ = await env({"twice": script})
    _, chunks = await stream_events(
        client, "m-twice", messages=user("x"), stream_options={"include_usage": True}
    )
    assert finishes(chunks) == [(0, "stop")]
    assert chunks[-1] == {**chunks[-1], "choices": [], "usage": USAGE}


async def test_a_missing_finish_reason_is_added_before_the_usage_chunk(env):
    script = [ch({"role": "assistant", "content": "Hi"}), {"choices": [], "usage": USAGE}]
    client, _, _ = await env({"nofinish": script})
    _, chunks = await stream_events(
        client, "m-nofinish", messages=user("x"), stream_options={"include_usage": True}
    )
    assert finishes(chunks) == [(0, "stop")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE


@pytest.mark.parametrize(
    "model, status, code, etype",
    [
        ("m-error400_flat", 400, "backend_rejected", "invalid_request_error"),
        ("m-error404", 404, "model_not_found", "not_found_error"),
        ("m-error500", 502, "backend_error", "server_error"),
        ("nope", 404, "model_not_found", "not_found_error"),
    ],
)
async def test_error_types_follow_openai_whatever_the_backend_called_them(env, model, status, code, etype):
    client, _, sdk = await env()
    for stream in (False, True):
        resp = await client.post(
            "/v1/chat/completions", json={"model": model, "stream": stream, "messages": user("x")}
        )
        body = await resp.json()
        validate_error(body)
        assert (resp.status, body["error"]["code"], body["error"]["type"]) == (status, code, etype)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk.chat.completions.create(model=model, messages=user("x"))
    assert caught.value.status_code == status and caught.value.code == code and caught.value.type == etype


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_the_backend_answers_with_http_200_is_an_error(env, stream):
    client, _, _ = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-error200", "stream": stream, "messages": user("x")}
    )
    assert resp.status == 400 and resp.content_type == "application/json"
    body = await resp.json()
    validate_error(body)
    assert body["error"]["message"] == "prompt is too long" and body["error"]["code"] == "backend_rejected"


async def test_a_json_answer_to_a_streaming_request_is_replayed_as_a_stream(env):
    client, _, sdk = await env()
    _, chunks = await stream_events(
        client, "m-json_for_stream", messages=user("x"), stream_options={"include_usage": True}
    )
    assert text_of(chunks) == "whole answer" and finishes(chunks) == [(0, "stop")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE


# -- the tool-call content heuristic (tools offered to an upstream without a parser) ----------------------


async def test_json_tool_call_whose_last_fragment_carries_the_finish_reason(env):
    script = [
        ch({"role": "assistant", "content": ""}),
        ch({"content": '{"name": "get_weather", '}),
        ch({"content": '"arguments": {"city": "Paris"}}'}, "stop"),
        {"choices": [], "usage": USAGE},
    ]
    client, _, sdk = await env({"jsonlast": script}, tool_parser="none")
    async with sdk.chat.completions.stream(model="m-jsonlast", messages=user("w"), tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"
    _, chunks = await stream_events(
        client, "m-jsonlast", messages=user("w"), tools=TOOLS, stream_options={"include_usage": True}
    )
    assert finishes(chunks) == [(0, "tool_calls")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE


@pytest.mark.parametrize(
    "pieces",
    [
        ["{x} is a placeholder ", "in Python's format strings."],
        ['{"name": "get_weather"', ', "note": "not quite a call"', "} said the model"],
        ["[1] Smith, J. ", "(2020). ", "A paper."],
    ],
)
async def test_a_reply_that_only_starts_like_json_is_delivered_intact(env, pieces):
    script = (
        [ch({"role": "assistant", "content": ""})]
        + [ch({"content": p}) for p in pieces[:-1]]
        + [ch({"content": pieces[-1]}, "stop")]
    )
    client, _, sdk = await env({"brace": script}, tool_parser="none")
    _, chunks = await stream_events(client, "m-brace", messages=user("x"), tools=TOOLS)
    assert text_of(chunks) == "".join(pieces)
    assert finishes(chunks) == [(0, "stop")]
    assert not any("tool_calls" in c["delta"] for e in chunks for c in e["choices"])
    async with sdk.chat.completions.stream(model="m-brace", messages=user("x"), tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "".join(pieces) and not final.choices[0].message.tool_calls


async def test_a_code_block_reply_still_streams_piece_by_piece_when_tools_are_offered(env):
    pieces = ["```python\n", "def f():\n", "    return 1\n", "```\n", "Done."]
    script = (
        [ch({"role": "assistant", "content": ""})]
        + [ch({"content": p}) for p in pieces]
        + [ch(finish="stop")]
    )
    client, _, _ = await env({"code": script}, tool_parser="none")
    _, chunks = await stream_events(client, "m-code", messages=user("x"), tools=TOOLS)
    contents = [c["delta"]["content"] for e in chunks for c in e["choices"] if c["delta"].get("content")]
    assert "".join(contents) == "".join(pieces)
    assert len(contents) >= len(pieces) - 1  # not held back and sent as one piece at the end


# -- streamed tool calls from upstreams that deviate from the convention -------------------------------------


async def test_a_tool_name_sent_after_the_call_id_is_kept(env):
    script = [
        ch({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_x", "type": "function"}]}),
        ch({"tool_calls": [{"index": 0, "function": {"name": "get_weather"}}]}),
        ch({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}),
        ch(finish="tool_calls"),
    ]
    _, _, sdk = await env({"latename": script})
    async with sdk.chat.completions.stream(model="m-latename", messages=user("w"), tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_x",
        "get_weather",
        '{"city": "Paris"}',
    )


async def test_argument_fragments_without_index_or_id_join_the_call_they_follow(env):
    script = [
        ch(
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
                ],
            }
        ),
        ch({"tool_calls": [{"function": {"arguments": '{"city": '}}]}),
        ch({"tool_calls": [{"function": {"arguments": '"Paris"}'}}]}),
        ch(
            {
                "tool_calls": [
                    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}
                ]
            }
        ),
        ch({"tool_calls": [{"function": {"arguments": "{}"}}]}),
        ch(finish="tool_calls"),
    ]
    _, _, sdk = await env({"noindex": script})
    async with sdk.chat.completions.stream(model="m-noindex", messages=user("w"), tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "get_time", "{}"),
    ]


@pytest.mark.parametrize(
    "script",
    [
        [
            ch(
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                }
            )
        ],
        [ch({"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'})],
    ],
    ids=["structured", "json-content"],
)
async def test_tool_calls_without_a_finish_chunk_still_end_with_tool_calls(env, script):
    client, _, sdk = await env({"nofinishcall": script}, tool_parser="none")
    _, chunks = await stream_events(client, "m-nofinishcall", messages=user("w"), tools=TOOLS)
    assert finishes(chunks) == [(0, "tool_calls")]
    async with sdk.chat.completions.stream(model="m-nofinishcall", messages=user("w"), tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert final.choices[0].finish_reason == "tool_calls"


# -- no SSE line over 64 KiB -------------------------------------------------------------------------------


async def test_big_parallel_tool_calls_in_one_delta_are_split_under_64k(env):
    big_a = json.dumps({"text": "a" * 100_000})
    big_b = json.dumps({"text": "é" * 50_000})
    script = [
        ch(
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": big_a},
                    },
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": big_b},
                    },
                ],
            }
        ),
        ch(finish="tool_calls"),
    ]
    client, _, sdk = await env({"bigcalls": script})
    raw, _ = await stream_events(client, "m-bigcalls", messages=user("w"), tools=TOOLS)
    assert max(len(line) for line in raw.split(b"\n")) <= 64 * 1024
    async with sdk.chat.completions.stream(model="m-bigcalls", messages=user("w"), tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "get_weather", big_a),
        ("call_b", "get_time", big_b),
    ]


async def test_big_vllm_reasoning_is_split_under_64k_in_both_fields(env):
    thought = "ü" * 150_000
    script = [ch({"role": "assistant", "reasoning": thought}), ch({"content": "42"}, "stop")]
    client, _, _ = await env({"think": script}, backend="vllm")
    raw, chunks = await stream_events(client, "m-think", messages=user("x"))
    assert max(len(line) for line in raw.split(b"\n")) <= 64 * 1024
    assert text_of(chunks, "reasoning_content") == thought and text_of(chunks, "reasoning") == thought
    assert text_of(chunks) == "42" and finishes(chunks) == [(0, "stop")]


# -- errors and disconnects from adapters --------------------------------------------------------------------


class Events:
    """What the test adapter saw: cancellations and stream closes."""

    def __init__(self) -> None:
        self.seen: list[str] = []


class OddAdapter(Adapter):
    """An adapter plugin that fails the ways third-party adapters can (the served id picks how)."""

    name = "odd"
    backends = ("odd",)
    events: Events

    async def chat(self, call):
        mode = call.body["model"]
        seen = self.events.seen
        if mode == "raise_before":
            raise KeyError("secret detail")
        if mode == "wait_forever":
            await call.waiting()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("wait cancelled")
                raise
        if mode == "slow_wait":
            await asyncio.sleep(0.3)
            try:
                await call.waiting()
            except BaseException as exc:
                seen.append(f"waiting raised {type(exc).__name__}")
                raise
        if mode == "slow_accept":
            try:
                await asyncio.sleep(0.3)
            except asyncio.CancelledError:
                seen.append("accept cancelled")
                raise

        async def chunks():
            try:
                yield {"choices": [{"index": 0, "delta": {"content": "partial"}}]}
                if mode == "reset_mid":
                    raise ConnectionResetError("upstream reset the connection")
                if mode == "raise_mid":
                    raise ValueError("secret detail")
                yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            finally:
                seen.append("stream closed")

        return chunks()


def odd_plugin(events: Events):
    class OddPlugin:
        @hookimpl
        def register_backends(self, register):
            register(type("Odd", (OddAdapter,), {"events": events}))

    return OddPlugin()


ODD_MODES = ("raise_before", "wait_forever", "slow_accept", "slow_wait", "reset_mid", "raise_mid")


@pytest.fixture
async def odd(registry_file, make_config, proxy_client):
    events = Events()
    registry_file([{"name": m, "backend": "odd"} for m in ODD_MODES])
    client = await proxy_client(make_config(), plugins=(odd_plugin(events),))
    return client, events


@pytest.fixture(params=["test-server", "embedded"])
async def odd_served(request, registry_file, make_config, make_app, proxy_client):
    """The test adapter behind the test server (aiohttp cancels a handler whose client left) and behind an
    ``AppRunner`` the way ``web.run_app(parent)`` serves an embedding app (it does not: the proxy must
    notice)."""
    events = Events()
    registry_file([{"name": m, "backend": "odd"} for m in ODD_MODES])
    if request.param == "test-server":
        yield await proxy_client(make_config(), plugins=(odd_plugin(events),)), events
        return
    runner = web.AppRunner(
        make_app(make_config(), plugins=(odd_plugin(events),))
    )  # handler_cancellation=False
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    session = aiohttp.ClientSession(base_url=f"http://{host}:{port}")
    yield session, events
    await session.close()
    await runner.cleanup()


async def wait_for(events: Events) -> list[str]:
    for _ in range(100):
        if events.seen:
            break
        await asyncio.sleep(0.05)
    return events.seen


async def test_an_adapter_stream_dying_with_a_connection_error_ends_with_an_in_band_error(odd):
    client, _ = odd
    _, chunks = await stream_events(client, "reset_mid", messages=user("x"))
    assert chunks[0]["choices"][0]["delta"]["content"] == "partial"
    validate_error(chunks[-1])
    assert chunks[-1]["error"]["type"] == "server_error"


@pytest.mark.parametrize("mode", ["raise_before", "raise_mid"])
async def test_unexpected_adapter_exceptions_are_500_shaped_with_the_request_id(odd, mode):
    client, _ = odd
    resp = await client.post("/v1/chat/completions", json={"model": mode, "messages": user("x")})
    assert resp.status == 500 and resp.content_type == "application/json"
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "internal_error" and "secret" not in json.dumps(body)
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": mode, "stream": True, "messages": user("x")},
        headers={"X-Request-Id": f"trace-{mode}"},
    )
    assert resp.headers["X-Request-Id"] == f"trace-{mode}"
    if mode == "raise_before":  # nothing was streamed yet: a JSON 500
        assert resp.status == 500 and (await resp.json())["error"]["request_id"] == f"trace-{mode}"
        return
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    assert (
        events[-2]["error"]["code"] == "internal_error"
        and events[-2]["error"]["request_id"] == f"trace-{mode}"
    )


async def test_client_leaving_during_the_keep_alive_wait_cancels_the_wait(odd_served, monkeypatch):
    monkeypatch.setattr(sse.SSEWriter.__init__, "__defaults__", (0.1,))
    client, events = odd_served
    resp = await client.post(
        "/v1/chat/completions", json={"model": "wait_forever", "stream": True, "messages": user("x")}
    )
    assert await resp.content.readuntil(b"\n\n") == b": keep-alive\n\n"
    resp.close()
    assert await wait_for(events) == ["wait cancelled"]


async def test_client_leaving_before_the_stream_starts_still_closes_the_adapter_stream(odd_served):
    client, events = odd_served
    task = asyncio.ensure_future(
        client.post(
            "/v1/chat/completions", json={"model": "slow_accept", "stream": True, "messages": user("x")}
        )
    )
    await asyncio.sleep(0.1)
    task.cancel()  # the client gives up while the adapter is still connecting upstream
    with pytest.raises(asyncio.CancelledError):
        await task
    # either the wait is cancelled before the adapter answers, or its stream is closed right after
    assert await wait_for(events) in (["stream closed"], ["accept cancelled"])


class FinishRecorder(Stage):
    """Records what the request log is told when a request ends."""

    name = "finish-recorder"
    order = 1200
    seen: list[tuple[int, str | None]] = []

    def finish(self, ctx):
        self.seen.append((ctx.status, ctx.error_code))


async def test_client_leaving_before_a_model_wait_is_logged_as_a_disconnect_not_a_crash(
    registry_file, make_config, make_app, caplog
):
    events = Events()
    recorder = type("Recorder", (FinishRecorder,), {"seen": []})

    class RecorderPlugin:
        @hookimpl
        def register_stages(self, register):
            register(recorder)

    registry_file([{"name": m, "backend": "odd"} for m in ODD_MODES])
    runner = web.AppRunner(
        make_app(make_config(), plugins=(odd_plugin(events), RecorderPlugin()))
    )  # as when embedded
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as session:
            task = asyncio.ensure_future(
                session.post(
                    f"http://{host}:{port}/v1/chat/completions",
                    json={"model": "slow_wait", "stream": True, "messages": user("x")},
                )
            )
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await wait_for(events) == ["waiting raised ClientGone"]
            for _ in range(50):
                if recorder.seen:
                    break
                await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
    assert recorder.seen == [(499, "client_disconnected")]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_client_leaving_while_sending_its_request_is_logged_as_a_disconnect(
    registry_file, make_config, make_app, caplog
):
    recorder = type("Recorder", (FinishRecorder,), {"seen": []})

    class RecorderPlugin:
        @hookimpl
        def register_stages(self, register):
            register(recorder)

    registry_file([])
    runner = web.AppRunner(make_app(make_config(), plugins=(RecorderPlugin(),)))  # as when embedded
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n" + b'{"model": "m", "messages": [' + b" " * 1000
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        for _ in range(50):
            if recorder.seen:
                break
            await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
    assert recorder.seen == [(499, "client_disconnected")]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


class BrokenFinishStage(Stage):
    """A request-log/metrics stage with a bug: its finish hook raises."""

    name = "broken-finish"
    order = 1100

    def finish(self, ctx):
        raise RuntimeError("log disk full")


class BrokenFinishPlugin:
    @hookimpl
    def register_stages(self, register):
        register(BrokenFinishStage)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_finish_hook_does_not_turn_a_good_answer_into_an_error(
    aiohttp_server, registry_file, make_config, proxy_client, stream
):
    server = await aiohttp_server(make_fake_openai())
    registry_file(registry_for(str(server.make_url("/v1"))))
    client = await proxy_client(make_config(), plugins=(BrokenFinishPlugin(),))
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-echo", "stream": stream, "messages": user("hi")}
    )
    assert resp.status == 200
    if stream:
        events = sse_events(await resp.read())
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    else:
        assert (await resp.json())["choices"][0]["message"]["content"] == "echo: hi"


# -- timeouts: backend timeout until the upstream answers, idle timeout inside the stream -------------------


async def test_a_stream_silent_past_the_idle_timeout_before_its_headers_names_that_timeout(env, monkeypatch):
    # For a stream, the idle timeout bounds upstream silence from the start, headers or not.
    monkeypatch.setattr(fake_openai, "DELAY", 0.6)
    client, _, _ = await env(stream_idle_timeout_ms=200, backend_timeout_ms=5000)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-slow_headers", "stream": True, "messages": user("x")}
    )
    assert resp.status == 504 and resp.content_type == "application/json"
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "backend_timeout"
    assert (
        "200 ms" in body["error"]["message"]
        and "CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS" in body["error"]["message"]
    )


@pytest.fixture
def unanswered_port():
    """A loopback port whose listen backlog is full: connections to it are never accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    yield port
    for c in fillers:
        c.close()
    listener.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_backend_that_never_accepts_the_connection_is_503_unavailable(
    registry_file, make_config, proxy_client, unanswered_port, stream
):
    registry_file(
        [
            {
                "name": "blackhole",
                "backend": "openai",
                "backend_config": {"base_url": f"http://127.0.0.1:{unanswered_port}/v1"},
            }
        ]
    )
    client = await proxy_client(make_config(backend_timeout_ms=600))
    resp = await client.post(
        "/v1/chat/completions", json={"model": "blackhole", "stream": stream, "messages": user("x")}
    )
    assert resp.status == 503 and resp.content_type == "application/json"
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "backend_unavailable" and int(resp.headers["Retry-After"]) > 0


async def test_idle_timeout_before_the_first_chunk_follows_keep_alives_in_band(env, monkeypatch):
    monkeypatch.setattr(fake_openai, "DELAY", 1.0)
    monkeypatch.setattr(sse.SSEWriter.__init__, "__defaults__", (0.1,))
    client, _, _ = await env(stream_idle_timeout_ms=400, backend_timeout_ms=5000)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-slow_first_chunk", "stream": True, "messages": user("x")}
    )
    assert resp.status == 200
    raw = await resp.read()
    assert raw.startswith(b": keep-alive\n\n")
    events = sse_events(raw)
    assert events[-2]["error"]["code"] == "stream_idle_timeout" and events[-1] == "[DONE]"
    validate_error(events[-2])


# -- HTTP surface ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT"])
async def test_other_methods_on_chat_completions_are_a_json_405(env, method):
    client, _, _ = await env()
    resp = await client.request(method, "/v1/chat/completions")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert resp.content_type == "application/json" and resp.headers["X-Request-Id"]
    if method != "HEAD":
        body = await resp.json()
        validate_error(body)
        assert (
            body["error"]["code"] == "method_not_allowed" and body["error"]["type"] == "invalid_request_error"
        )


async def test_streamed_responses_carry_the_request_id(env):
    client, _, _ = await env()
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m-echo", "stream": True, "messages": user("x")},
        headers={"X-Request-Id": "owui-42"},
    )
    assert resp.headers["X-Request-Id"] == "owui-42"
    await resp.read()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-echo", "stream": True, "messages": user("x")}
    )
    assert resp.headers["X-Request-Id"].startswith("req_")
    await resp.read()
