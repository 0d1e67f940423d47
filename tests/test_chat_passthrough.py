"""Chat completions through an OpenAI-compatible upstream, seen from real clients (SDK and raw HTTP)."""

from __future__ import annotations

import base64
import io

import orjson
import pytest

from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes.openai import REQUESTS, make_fake_openai, registry_for
from tests.openai_schemas import validate_chunk, validate_completion


@pytest.fixture
def env(aiohttp_server, registry_file, make_config, proxy_client, openai_sdk):
    async def start(**overrides):
        fake = make_fake_openai()
        server = await aiohttp_server(fake)
        entries = registry_for(str(server.make_url("/v1")), vision=overrides.pop("vision", False))
        tool_parser = overrides.pop("tool_parser", None)
        for entry in entries if tool_parser else ():
            entry["metadata"] = {"tool_parser": tool_parser}
        registry_file(entries)
        client = await proxy_client(make_config(**overrides))
        return client, fake, openai_sdk(client)

    return start


async def test_sdk_non_streaming_completion_is_valid_and_names_the_requested_model(env):
    client, fake, sdk = await env()
    completion = await sdk.chat.completions.create(model="m-echo", messages=user("hello there"))
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.model == "m-echo"
    assert completion.usage.total_tokens == 8
    assert fake[REQUESTS][-1]["body"]["model"] == "echo"  # the served id went upstream
    resp = await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": user("x")})
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Request-Id"]
    validate_completion(await resp.json())


async def test_sdk_stream_arrives_word_by_word_with_role_first_and_usage(env):
    client, _, sdk = await env()
    stream = await sdk.chat.completions.create(model="m-echo", messages=user("one two three"), stream=True,
                                               stream_options={"include_usage": True})
    deltas, roles, finishes, usage = [], [], [], None
    async for chunk in stream:
        validate_chunk(chunk.model_dump(exclude_unset=True))
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            if c.delta.content:
                deltas.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert "".join(deltas).split() == ["echo:", "one", "two", "three"]
    assert len(deltas) >= 4  # not buffered into one piece
    assert roles[0] == "assistant" and roles.count("assistant") == 1
    assert finishes == ["stop"]
    assert usage is not None and usage.total_tokens == 8


async def test_stream_wire_format_headers_framing_and_done(env):
    client, _, _ = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-echo", "stream": True, "messages": user("hi")}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in resp.headers
    raw = await resp.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        validate_chunk(e)
    assert len({e["id"] for e in events[:-1]}) == 1
    assert all(line.startswith((b"data: ", b": ")) for line in raw.split(b"\n") if line)


async def test_streamed_tool_calls_are_assembled_whole_by_the_sdk(env):
    _, _, sdk = await env()
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    async with sdk.chat.completions.stream(model="m-tools", messages=user("weather?"), tools=tools) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].function.arguments == '{"city": "Paris"}'
    assert calls[0].id == "call_a" and calls[1].id == "call_b"
    assert final.choices[0].finish_reason == "tool_calls"


async def test_non_streamed_tool_call_object_arguments_become_a_json_string(env):
    _, _, sdk = await env()
    completion = await sdk.chat.completions.create(model="m-tools_object_args", messages=user("w"))
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.arguments == '{"city":"Paris"}'
    assert completion.choices[0].finish_reason == "tool_calls"


async def test_legacy_function_call_becomes_tool_calls(env):
    client, _, sdk = await env()
    completion = await sdk.chat.completions.create(model="m-legacy", messages=user("w"))
    msg = completion.choices[0].message
    assert msg.function_call is None
    assert msg.tool_calls[0].function.name == "get_weather"
    assert msg.tool_calls[0].id.startswith("call_")
    assert completion.choices[0].finish_reason == "tool_calls"
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-legacy", "stream": True, "messages": user("w")}
    )
    events = [e for e in sse_events(await resp.read()) if e != "[DONE]"]
    calls = [tc for e in events for c in e["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert (
        calls[0]["index"] == 0
        and calls[0]["function"]["name"] == "get_weather"
        and calls[0]["id"].startswith("call_")
    )
    assert "id" not in calls[1] and calls[1]["function"] == {"arguments": '{"city": "Paris"}'}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    for e in events:
        validate_chunk(e)


async def test_json_content_becomes_a_tool_call_when_tools_were_offered_to_a_model_without_a_parser(env):
    _, _, sdk = await env(tool_parser="none")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = await sdk.chat.completions.create(model="m-json_tool", messages=user("w"), tools=tools)
    assert with_tools.choices[0].message.tool_calls[0].function.arguments == '{"city":"Paris"}'
    assert with_tools.choices[0].message.content is None
    without = await sdk.chat.completions.create(model="m-json_tool", messages=user("w"))
    assert without.choices[0].message.tool_calls is None
    assert "get_weather" in without.choices[0].message.content
    async with sdk.chat.completions.stream(model="m-json_tool", messages=user("w"), tools=tools) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert final.choices[0].finish_reason == "tool_calls"


async def test_json_content_stays_text_where_the_upstream_parses_its_own_tool_calls(env):
    _, _, sdk = await env()  # an OpenAI-compatible upstream parses its own calls unless the registry says not
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = await sdk.chat.completions.create(model="m-json_tool", messages=user("w"), tools=tools)
    assert reply.choices[0].message.tool_calls is None
    assert "get_weather" in reply.choices[0].message.content
    async with sdk.chat.completions.stream(model="m-json_tool", messages=user("w"), tools=tools) as stream:
        final = await stream.get_final_completion()
    assert "get_weather" in final.choices[0].message.content and not final.choices[0].message.tool_calls


async def test_tool_normalization_can_be_disabled(env):
    client, _, _ = await env(disable_tool_normalization=True)
    resp = await client.post("/v1/chat/completions", json={"model": "m-legacy", "messages": user("w")})
    body = await resp.json()
    assert body["choices"][0]["message"]["function_call"]["name"] == "get_weather"
    assert "tool_calls" not in body["choices"][0]["message"]


async def test_missing_required_fields_are_filled_in(env):
    client, _, _ = await env()
    resp = await client.post("/v1/chat/completions", json={"model": "m-minimal", "messages": user("x")})
    body = await resp.json()
    validate_completion(body)
    assert body["id"].startswith("chatcmpl-") and body["model"] == "m-minimal"


async def test_vllm_reasoning_is_also_reasoning_content(env):
    client, _, _ = await env()
    body = await (
        await client.post("/v1/chat/completions", json={"model": "m-reasoning", "messages": user("x")})
    ).json()
    assert body["choices"][0]["message"]["reasoning_content"] == "think hard"
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-reasoning", "stream": True, "messages": user("x")}
    )
    events = sse_events(await resp.read())
    assert events[0]["choices"][0]["delta"]["reasoning_content"] == "think"


async def test_oversized_content_is_split_into_lines_under_64k(env):
    client, _, _ = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-huge", "stream": True, "messages": user("x")}
    )
    raw = await resp.read()
    assert max(len(line) for line in raw.split(b"\n")) <= 64 * 1024
    events = [e for e in sse_events(raw) if e != "[DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "x" * 200_000
    for e in events:
        validate_chunk(e)


async def test_unknown_request_fields_are_forwarded(env):
    client, fake, _ = await env()
    await client.post(
        "/v1/chat/completions",
        json={
            "model": "m-echo",
            "messages": user("x"),
            "top_k": 40,
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    sent = fake[REQUESTS][-1]["body"]
    assert sent["top_k"] == 40 and sent["chat_template_kwargs"] == {"enable_thinking": False}


async def test_developer_role_is_sent_as_system(env):
    client, fake, _ = await env()
    await client.post(
        "/v1/chat/completions",
        json={
            "model": "m-echo",
            "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"}],
        },
    )
    assert fake[REQUESTS][-1]["body"]["messages"][0]["role"] == "system"


async def test_image_reaches_a_vision_model_through_the_sdk(env):
    _, fake, sdk = await env(vision=True)
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 100).decode()
    parts = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    completion = await sdk.chat.completions.create(
        model="m-echo", messages=[{"role": "user", "content": parts}]
    )
    assert completion.choices[0].message.content == "echo: what is this"
    sent = fake[REQUESTS][-1]["body"]["messages"][-1]["content"]
    assert sent[1]["image_url"]["url"] == f"data:image/png;base64,{png}"


async def test_a_5mb_image_gets_through_the_body_cap(env):
    client, fake, _ = await env(vision=True)
    png = base64.b64encode(b"\0" * 5_000_000).decode()
    parts = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "text", "text": "hi"},
    ]
    body = orjson.dumps({"model": "m-echo", "messages": [{"role": "user", "content": parts}]})
    resp = await client.post(
        "/v1/chat/completions", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200, await resp.text()
    assert len(fake[REQUESTS][-1]["body"]["messages"][0]["content"][0]["image_url"]["url"]) > 6_000_000
