"""Failures a client of the proxy can see: every one in the OpenAI error shape with its documented status
and code."""

from __future__ import annotations

import asyncio
import base64
import socket

import openai
import pytest

from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes import openai as fake_openai
from imageworks_proxy.testing.fakes.openai import CANCELLED, make_fake_openai
from tests.openai_schemas import validate_chunk
from tests.proxy_helpers import error_of


@pytest.fixture
def env(fake_openai_proxy, monkeypatch):
    monkeypatch.setattr(fake_openai, "DELAY", 1.0)
    return fake_openai_proxy


@pytest.mark.parametrize(
    "payload, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "m-echo"}', "messages"),
        (b'{"model": "m-echo", "messages": []}', "messages"),
        (b'{"model": 3, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m-echo", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "m-echo", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}', "stream"),
    ],
)
async def test_bad_requests_are_400_invalid_request(env, payload, param):
    client, _ = await env()
    body = await error_of(await client.post("/v1/chat/completions", data=payload), 400, "invalid_request")
    assert body["error"]["param"] == param


async def test_unknown_model_is_404(env):
    client, _ = await env()
    body = await error_of(
        await client.post("/v1/chat/completions", json={"model": "nope", "messages": user("x")}),
        404,
        "model_not_found",
    )
    assert "nope" in body["error"]["message"]


async def test_upstream_4xx_keeps_status_and_message_vllm_flat_shape(env):
    client, _ = await env()
    body = await error_of(
        await client.post("/v1/chat/completions", json={"model": "m-error400_flat", "messages": user("x")}),
        400,
        "backend_rejected",
    )
    assert body["error"]["message"] == "max_tokens is too large"


async def test_upstream_404_is_passed_through(env):
    client, _ = await env()
    body = await error_of(
        await client.post("/v1/chat/completions", json={"model": "m-error404", "messages": user("x")}),
        404,
        "model_not_found",
    )
    assert "does not exist" in body["error"]["message"]


async def test_upstream_5xx_and_garbage_are_502(env):
    client, _ = await env()
    body = await error_of(
        await client.post("/v1/chat/completions", json={"model": "m-error500", "messages": user("x")}),
        502,
        "backend_error",
    )
    assert "CUDA out of memory" in body["error"]["message"]
    await error_of(
        await client.post("/v1/chat/completions", json={"model": "m-not_json", "messages": user("x")}),
        502,
        "backend_error",
    )


async def test_streaming_error_before_first_byte_is_json_not_sse(env):
    client, _ = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-error500", "stream": True, "messages": user("x")}
    )
    await error_of(resp, 502, "backend_error")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_unreachable_backend_is_503_with_retry_after(env):
    dead = {
        "name": "dead",
        "backend": "openai",
        "backend_config": {"host": "127.0.0.1", "port": _closed_port()},
    }
    client, _ = await env(extra_entries=[dead])
    resp = await client.post(
        "/v1/chat/completions", json={"model": "dead", "stream": True, "messages": user("x")}
    )
    await error_of(resp, 503, "backend_unavailable")
    assert int(resp.headers["Retry-After"]) > 0


async def test_slow_backend_is_504_within_the_configured_time(env):
    client, _ = await env(backend_timeout_ms=200)
    await error_of(
        await client.post("/v1/chat/completions", json={"model": "m-slow_headers", "messages": user("x")}),
        504,
        "backend_timeout",
    )


async def test_stalled_stream_ends_with_in_band_error_and_done(env):
    client, _ = await env(stream_idle_timeout_ms=300)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-hang", "stream": True, "messages": user("x")}
    )
    assert resp.status == 200
    events = sse_events(await resp.read())
    assert events[0]["choices"][0]["delta"]["content"] == "partial"
    assert events[-2]["error"]["code"] == "stream_idle_timeout"
    assert events[-1] == "[DONE]"


async def test_upstream_dropping_mid_stream_gives_in_band_error(env):
    client, _ = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-drop", "stream": True, "messages": user("x")}
    )
    events = sse_events(await resp.read())
    assert events[-2]["error"]["code"] == "backend_error" and events[-1] == "[DONE]"


async def test_upstream_error_event_mid_stream_is_forwarded_in_band(env):
    client, _ = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-midstream_error", "stream": True, "messages": user("x")}
    )
    events = sse_events(await resp.read())
    validate_chunk(events[0])
    assert "engine died" in events[-2]["error"]["message"] and events[-1] == "[DONE]"


async def test_sdk_raises_on_in_band_stream_error(env):
    client, _ = await env()
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(model="m-midstream_error", messages=user("x"), stream=True)
        with pytest.raises(openai.APIError, match="engine died"):
            async for _ in stream:
                pass
    finally:
        await sdk.close()


async def test_keep_alive_comments_flow_while_waiting_for_the_first_chunk(env, monkeypatch):
    from imageworks_proxy.http import sse

    monkeypatch.setattr(sse.SSEWriter.__init__, "__defaults__", (0.2,))
    client, _ = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-slow_first_chunk", "stream": True, "messages": user("x")}
    )
    raw = await resp.read()
    assert raw.count(b": keep-alive\n\n") >= 2
    assert sse_events(raw)[-1] == "[DONE]"


async def test_client_disconnect_cancels_the_upstream_request(env):
    client, fake = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-slow_stream", "stream": True, "messages": user("x")}
    )
    await resp.content.readuntil(b"w2 ")
    resp.close()
    for _ in range(100):
        if fake[CANCELLED]:
            break
        await asyncio.sleep(0.05)
    assert fake[CANCELLED] == ["slow_stream"]


async def test_text_model_replaces_images_with_alt_text_placeholder(env):
    client, fake = await env()
    png = base64.b64encode(b"abc").decode()
    parts = [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}, "alt": "a cat"},
    ]
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-echo", "messages": [{"role": "user", "content": parts}]}
    )
    assert resp.status == 200
    sent = fake[fake_openai.REQUESTS][-1]["body"]["messages"][0]["content"]
    assert sent[1] == {"type": "text", "text": "[image omitted: model does not support images] (alt: a cat)"}


async def test_text_model_refuses_images_without_alt_text(env):
    client, _ = await env()
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,YWJj"}}]
    await error_of(
        await client.post(
            "/v1/chat/completions", json={"model": "m-echo", "messages": [{"role": "user", "content": parts}]}
        ),
        409,
        "capability_mismatch",
    )


async def test_image_over_the_limit_is_413_naming_the_limit(env):
    client, _ = await env(vision=True, max_image_bytes=1000)
    data = base64.b64encode(b"\0" * 1001).decode()
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]
    body = await error_of(
        await client.post(
            "/v1/chat/completions", json={"model": "m-echo", "messages": [{"role": "user", "content": parts}]}
        ),
        413,
        "payload_too_large",
    )
    assert "1000" in body["error"]["message"]


async def test_undecodable_image_is_400_invalid_image(env):
    client, _ = await env(vision=True)
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"}}]
    await error_of(
        await client.post(
            "/v1/chat/completions", json={"model": "m-echo", "messages": [{"role": "user", "content": parts}]}
        ),
        400,
        "invalid_image",
    )


async def test_input_image_parts_obey_the_same_image_rules(env):
    """Responses-style ``input_image`` parts (a bare URL string) get the same limits, vision check and
    placeholder as ``image_url`` parts."""
    client, fake = await env(vision=True, max_image_bytes=1000)
    big = base64.b64encode(b"\0" * 1001).decode()

    def ask(model: str, part: dict) -> dict:
        return {
            "model": model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, part]}],
        }

    over = {"type": "input_image", "image_url": f"data:image/png;base64,{big}"}
    await error_of(
        await client.post("/v1/chat/completions", json=ask("m-echo", over)), 413, "payload_too_large"
    )
    bad = {"type": "input_image", "image_url": "data:image/png;base64,@@@"}
    await error_of(await client.post("/v1/chat/completions", json=ask("m-echo", bad)), 400, "invalid_image")
    client, fake = await env()  # a model without vision
    plain = {"type": "input_image", "image_url": "data:image/png;base64,YWJj"}
    await error_of(
        await client.post("/v1/chat/completions", json=ask("m-echo", plain)), 409, "capability_mismatch"
    )
    resp = await client.post("/v1/chat/completions", json=ask("m-echo", {**plain, "alt": "a cat"}))
    assert resp.status == 200
    sent = fake[fake_openai.REQUESTS][-1]["body"]["messages"][0]["content"]
    assert sent[1] == {"type": "text", "text": "[image omitted: model does not support images] (alt: a cat)"}


async def test_body_over_the_cap_is_413(env):
    client, _ = await env(max_body_bytes=2000)
    resp = await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": user("x" * 5000)})
    await error_of(resp, 413, "payload_too_large")


async def test_api_keys_guard_every_route_but_health(env):
    client, _ = await env(api_keys="k1,k2")
    assert (await client.get("/v1/health")).status == 200
    await error_of(await client.get("/v1/models"), 401, "invalid_api_key")
    await error_of(
        await client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key"
    )
    await error_of(
        await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": user("x")}),
        401,
        "invalid_api_key",
    )
    ok = await client.post(
        "/v1/chat/completions",
        json={"model": "m-echo", "messages": user("x")},
        headers={"Authorization": "Bearer k2"},
    )
    assert ok.status == 200
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer k1"})).status == 200


async def test_no_authorization_goes_upstream_without_api_key_env(env):
    client, fake = await env(api_keys="client-key")
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m-echo", "messages": user("x")},
        headers={"Authorization": "Bearer client-key"},
    )
    assert resp.status == 200
    assert "Authorization" not in fake[fake_openai.REQUESTS][-1]["headers"]  # the client's key stays here


async def test_upstream_key_from_api_key_env(
    aiohttp_server, registry_file, make_config, proxy_client, monkeypatch
):
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sekrit-123")
    fake = make_fake_openai()
    server = await aiohttp_server(fake)
    registry_file(
        [
            {
                "name": "keyed",
                "backend": "openai",
                "served_model_id": "echo",
                "backend_config": {
                    "base_url": str(server.make_url("/v1")),
                    "api_key_env": "FAKE_UPSTREAM_KEY",
                },
            }
        ]
    )
    client = await proxy_client(make_config())
    resp = await client.post("/v1/chat/completions", json={"model": "keyed", "messages": user("x")})
    assert resp.status == 200
    assert fake[fake_openai.REQUESTS][-1]["headers"]["Authorization"] == "Bearer sekrit-123"
    assert "sekrit" not in await resp.text()


def test_exposure_warning_only_beyond_loopback_without_keys():
    from imageworks_proxy.cli.server import exposure_warning

    assert exposure_warning("127.0.0.1", ()) is None
    assert exposure_warning("::1", ()) is None
    assert exposure_warning("0.0.0.0", ("k",)) is None
    assert "without API keys" in exposure_warning("0.0.0.0", ())
