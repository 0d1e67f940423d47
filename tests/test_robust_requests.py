"""Requests a careless or hostile client sends: each gets a 400-class answer in the OpenAI error shape
and costs nothing else (no 500, no lost keep-alive request, no giant echo)."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import pytest
from aiohttp import web

from imageworks_proxy.testing import user
from imageworks_proxy.testing.fakes.openai import REQUESTS, make_fake_openai, registry_for
from tests.openai_schemas import validate_error
from tests.proxy_helpers import error_of


@pytest.fixture
def env(fake_openai_proxy):
    return fake_openai_proxy


# -- compressed bodies ------------------------------------------------------------------------------


@pytest.fixture
async def served(registry_file, make_config, make_app, aiohttp_server):
    """The proxy on a real loopback socket (raw HTTP/1.1 can be written to it), with the fake behind it."""
    upstream = await aiohttp_server(make_fake_openai())
    registry_file(registry_for(str(upstream.make_url("/v1"))))
    runner = web.AppRunner(make_app(make_config()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][:2]
    await runner.cleanup()


async def read_response(reader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def raw_post(body: bytes, encoding: str | None = None) -> bytes:
    extra = f"Content-Encoding: {encoding}\r\n" if encoding else ""
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


GOOD = json.dumps({"model": "m-echo", "messages": user("after")}).encode()


@pytest.mark.parametrize(
    "encoding, body",
    [
        ("gzip", b"\x1f\x8b\x08\x00" + b"not really gzip at all"),
        ("gzip", gzip.compress(GOOD)[:-12]),  # cut short
        ("deflate", b"\x78\x9c" + b"garbage deflate data"),
    ],
    ids=["gzip-garbage", "gzip-truncated", "deflate-garbage"],
)
async def test_a_corrupt_compressed_body_is_400_and_the_next_request_on_the_connection_is_answered(
    served, encoding, body
):
    host, port = served
    reader, writer = await asyncio.open_connection(host, port)
    try:
        # both requests go out at once, as a pipelining or keep-alive client may send them
        writer.write(raw_post(body, encoding) + raw_post(GOOD))
        await writer.drain()
        async with asyncio.timeout(10):
            status, headers, payload = await read_response(reader)
            assert status == 400, payload
            err = json.loads(payload)
            validate_error(err)
            assert err["error"]["code"] == "invalid_request" and encoding in err["error"]["message"]
            status, _, payload = await read_response(reader)
        assert status == 200, payload
        assert json.loads(payload)["choices"][0]["message"]["content"] == "echo: after"
    finally:
        writer.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "x-gzip"])
async def test_compressed_request_bodies_are_accepted(env, encoding):
    client, _ = await env()
    packed = zlib.compress(GOOD) if encoding == "deflate" else gzip.compress(GOOD)
    resp = await client.post(
        "/v1/chat/completions",
        data=packed,
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"] == "echo: after"


async def test_a_compressed_body_that_inflates_past_the_body_cap_is_413(env):
    client, _ = await env(max_body_bytes=100_000)
    bomb = gzip.compress(b'{"model": "m-echo", "messages": [' + b" " * 5_000_000 + b"]}")
    assert len(bomb) < 100_000
    resp = await client.post("/v1/chat/completions", data=bomb, headers={"Content-Encoding": "gzip"})
    body = await error_of(resp, 413, "payload_too_large")
    assert "CHAT_PROXY_MAX_BODY_BYTES" in body["error"]["message"]


async def test_an_unsupported_content_encoding_is_415_in_the_error_shape(env):
    client, _ = await env()
    resp = await client.post(
        "/v1/chat/completions", data=b"\x28\xb5\x2f\xfd" + b"zstd?", headers={"Content-Encoding": "zstd"}
    )
    body = await error_of(resp, 415, "unsupported_content_encoding")
    assert "zstd" in body["error"]["message"]


# -- tools, functions, tool_calls of the wrong shape -------------------------------------------------


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": 5}, "tools"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": ["get_weather"]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": "get_weather"}]}, "tools[0].function"),
        ({"functions": 5}, "functions"),
        ({"functions": [7]}, "functions[0]"),
        ({"tool_choice": 5}, "tool_choice"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": 5}]},
            "messages[1].tool_calls",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": ["call"]}]},
            "messages[0].tool_calls[0]",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": 5}]}]},
            "messages[0].tool_calls[0].function",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_tools_and_tool_calls_of_the_wrong_shape_are_400_naming_the_field(env, extra, param, stream):
    client, fake = await env()
    body = {"model": "m-echo", "messages": user("x"), "stream": stream, **extra}
    err = await error_of(await client.post("/v1/chat/completions", json=body), 400, "invalid_request")
    assert err["error"]["param"] == param and param.split("[")[0] in err["error"]["message"]
    assert fake[REQUESTS] == []  # refused before anything went upstream


async def test_well_formed_tools_and_tool_calls_still_go_through(env):
    client, fake = await env()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m-echo", "messages": messages, "tools": tools, "tool_choice": "auto"},
    )
    assert resp.status == 200, await resp.text()
    assert fake[REQUESTS][0]["body"]["tools"] == tools


# -- max_tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [-1, 0, "100", True, 12.5])
async def test_a_max_tokens_that_is_not_a_positive_integer_is_400(env, field, value):
    client, fake = await env()
    body = {"model": "m-echo", "messages": user("x"), field: value}
    err = await error_of(await client.post("/v1/chat/completions", json=body), 400, "invalid_request")
    assert err["error"]["param"] == field
    assert fake[REQUESTS] == []


@pytest.mark.parametrize("value", [1, 4096, None])
async def test_positive_or_null_max_tokens_go_through(env, value):
    client, fake = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-echo", "messages": user("x"), "max_tokens": value}
    )
    assert resp.status == 200, await resp.text()
    assert fake[REQUESTS][0]["body"].get("max_tokens") == value


# -- giant strings are neither echoed nor logged whole ----------------------------------------------


@pytest.mark.parametrize(
    "route, body",
    [
        ("/v1/chat/completions", {"messages": user("x")}),
        ("/v1/embeddings", {"input": "x"}),
        ("/v1/completions", {"prompt": "x"}),
    ],
)
async def test_a_megabyte_model_name_is_refused_without_echoing_it(env, route, body):
    client, _ = await env()
    name = "m" * 1_000_000
    resp = await client.post(route, json={"model": name, **body})
    assert resp.status == 400
    raw = await resp.read()
    assert len(raw) < 2_000
    err = json.loads(raw)
    validate_error(err)
    assert err["error"]["param"] == "model"


async def test_an_unknown_model_is_echoed_in_the_404(env):
    client, _ = await env()
    err = await error_of(
        await client.post("/v1/chat/completions", json={"model": "x" * 200, "messages": user("x")}),
        404,
        "model_not_found",
    )
    assert "x" * 200 in err["error"]["message"]


async def test_an_odd_role_is_named_in_a_bounded_message(env):
    client, _ = await env()
    messages = [{"role": "r" * 500_000, "content": "x"}]
    resp = await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": messages})
    raw = await resp.read()
    assert resp.status == 400 and len(raw) < 2_000
    assert json.loads(raw)["error"]["param"] == "messages[0].role"


async def test_the_admin_api_does_not_echo_a_megabyte_model_name_either(env):
    client, _ = await env()
    resp = await client.post("/v1/admin/vllm/activate", json={"model": "q" * 1_000_000})
    raw = await resp.read()
    assert resp.status == 404 and len(raw) < 2_000
    validate_error(json.loads(raw))


async def test_a_gzip_body_works_when_the_proxy_is_mounted_in_an_app_whose_server_inflates_bodies(
    aiohttp_server, aiohttp_client, registry_file, make_config, make_app
):
    upstream = await aiohttp_server(make_fake_openai())
    registry_file(registry_for(str(upstream.make_url("/v1"))))
    parent = web.Application()  # the parent's server keeps aiohttp's own decoding on
    parent.add_subapp("/llm", make_app(make_config()))
    client = await aiohttp_client(parent)
    resp = await client.post(
        "/llm/v1/chat/completions", data=gzip.compress(GOOD), headers={"Content-Encoding": "gzip"}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"] == "echo: after"


async def test_the_command_line_server_also_answers_the_request_after_a_corrupt_gzip_body(
    aiohttp_server, registry_file, make_config, make_app
):
    from imageworks_proxy.http.server import make_runner

    upstream = await aiohttp_server(make_fake_openai())
    registry_file(registry_for(str(upstream.make_url("/v1"))))
    config = make_config()
    runner = make_runner(make_app(config), config)  # what imageworks-chat-proxy serves with
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw_post(b"\x1f\x8b\x08\x00 not gzip", "gzip") + raw_post(GOOD))
        await writer.drain()
        async with asyncio.timeout(10):
            status, _, payload = await read_response(reader)
            error = json.loads(payload)["error"]
            assert status == 400 and error["code"] == "invalid_request" and "gzip" in error["message"]
            status, _, payload = await read_response(reader)
        assert status == 200, payload
    finally:
        writer.close()
        await runner.cleanup()
