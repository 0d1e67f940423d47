"""Who may drive the proxy over HTTP: Host and Origin checks, CORS for allowed origins, API and admin
keys, and the clients that must keep working (OpenWebUI, the openai SDK, curl, the loader)
(docs/security.md)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from imageworks_proxy import keys
from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes import openai as fake_openai
from tests.proxy_helpers import error_of, log_records

CHAT = {"model": "m-echo", "messages": user("hello")}
EVIL = "https://evil.example"


@pytest.fixture
def env(fake_openai_proxy):
    return fake_openai_proxy


async def raw_request(client, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes a high-level client would refuse to send; return the status and the body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.split(b"\r\n\r\n", 1)[1]


# -- Host: DNS rebinding ---------------------------------------------------------------------------
async def test_a_host_name_the_proxy_does_not_go_by_is_refused(env):
    """A DNS-rebinding page reaches the proxy with its own name in Host; nothing may answer it."""
    client, fake = await env()
    for path in ("/v1/models", "/v1/health"):
        body = await error_of(await client.get(path, headers={"Host": "rebind.evil.example:8100"}), 403,
                              "host_not_allowed")
        assert "CHAT_PROXY_ALLOWED_HOSTS" in body["error"]["message"]
    await error_of(await client.post("/v1/chat/completions", json=CHAT, headers={"Host": "evil.example"}),
                   403, "host_not_allowed")
    assert fake[fake_openai.REQUESTS] == []


@pytest.mark.parametrize("host", ["127.0.0.1:8100", "localhost:8100", "LOCALHOST", "[::1]:8100", "10.1.2.3",
                                  "app.localhost:8100", socket.gethostname(), "localhost.:8100",
                                  "host.docker.internal:8100"])
async def test_loopback_names_ip_addresses_and_the_machines_own_name_are_accepted(env, host):
    """host.docker.internal: OpenWebUI in a container calling a proxy that runs on the host."""
    client, _ = await env()
    assert (await client.get("/v1/models", headers={"Host": host})).status == 200


async def test_allowed_hosts_and_the_bind_name_open_more_names(env):
    client, _ = await env(ALLOWED_HOSTS="chat-proxy, *.example.org", HOST="proxy.lan")
    for host in ("chat-proxy:8100", "a.example.org", "proxy.lan:8100"):
        assert (await client.get("/v1/models", headers={"Host": host})).status == 200, host
    await error_of(await client.get("/v1/models", headers={"Host": "example.org"}), 403, "host_not_allowed")
    star, _ = await env(ALLOWED_HOSTS="*")
    assert (await star.get("/v1/models", headers={"Host": "anything.example"})).status == 200


# -- Origin: pages in the user's browser -----------------------------------------------------------
async def test_a_cross_site_simple_post_from_a_web_page_is_refused(env):
    """What a page can send without a preflight: text/plain, no custom headers."""
    client, fake = await env()
    resp = await client.post("/v1/chat/completions", data=json.dumps(CHAT),
                             headers={"Origin": EVIL, "Content-Type": "text/plain;charset=UTF-8"})
    body = await error_of(resp, 403, "origin_not_allowed")
    assert "CHAT_PROXY_ALLOWED_ORIGINS" in body["error"]["message"]
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert fake[fake_openai.REQUESTS] == []  # no GPU time spent
    for path in ("/v1/admin/vllm/stop", "/v1/admin/vllm/activate"):
        resp = await client.post(path, data='{"model": "x"}', headers={"Origin": EVIL,
                                                                        "Content-Type": "text/plain"})
        await error_of(resp, 403, "origin_not_allowed")
    await error_of(await client.get("/v1/models", headers={"Origin": "null"}), 403, "origin_not_allowed")


async def test_a_preflight_from_an_origin_not_allowed_gets_no_cors_answer(env):
    client, _ = await env()
    resp = await client.options("/v1/chat/completions", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    await error_of(resp, 403, "origin_not_allowed")
    assert not any(h.lower().startswith("access-control-") for h in resp.headers)


async def test_openwebui_direct_connections_work_from_an_allowed_origin(env):
    """OpenWebUI's browser code: GET {url}/models and POST {url}/chat/completions with Accept,
    Content-Type: application/json and Authorization, each after a preflight."""
    origin = "http://localhost:3000"
    client, _ = await env(ALLOWED_ORIGINS=f"{origin}, https://chat.example.org", API_KEYS="browser-key")
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        pre = await client.options(path, headers={
            "Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "accept,authorization,content-type"})
        assert pre.status == 204, await pre.text()
        assert pre.headers["Access-Control-Allow-Origin"] == origin
        assert method in pre.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert "Origin" in pre.headers["Vary"]
    # OpenWebUI opened at a LAN address calling a loopback proxy: Chrome's Private Network Access preflight
    pna = await client.options("/v1/models", headers={
        "Origin": "https://chat.example.org", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Private-Network": "true"})
    assert pna.status == 204 and pna.headers["Access-Control-Allow-Private-Network"] == "true"
    headers = {"Origin": origin, "Accept": "application/json", "Content-Type": "application/json",
               "authorization": "Bearer browser-key"}
    models = await client.get("/v1/models", headers=headers)
    assert models.status == 200
    assert models.headers["Access-Control-Allow-Origin"] == origin
    assert "X-Request-Id" in models.headers["Access-Control-Expose-Headers"]
    stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    assert stream.status == 200
    assert stream.headers["Access-Control-Allow-Origin"] == origin
    assert sse_events(await stream.read())[-1] == "[DONE]"
    # errors carry the CORS headers too, so the page can read the message
    denied = await client.get("/v1/models", headers={**headers, "authorization": "Bearer wrong"})
    await error_of(denied, 401, "invalid_api_key")
    assert denied.headers["Access-Control-Allow-Origin"] == origin
    # an origin that is not listed still gets nothing
    await error_of(await client.get("/v1/models", headers={**headers, "Origin": EVIL}), 403,
                   "origin_not_allowed")


async def test_an_origin_that_is_the_proxy_itself_is_same_origin(env):
    client, _ = await env(ALLOWED_HOSTS="ai.example.org")
    resp = await client.get("/v1/models", headers={"Host": "ai.example.org", "Origin": "https://ai.example.org"})
    assert resp.status == 200


# -- the clients that must keep working ------------------------------------------------------------
async def test_openwebui_server_side_calls_from_its_container_work(env):
    """OpenWebUI's backend (aiohttp) in the compose file: Host chat-proxy:8100, a key, JSON, no Origin."""
    client, fake = await env(ALLOWED_HOSTS="chat-proxy", API_KEYS="owui")
    headers = {"Host": "chat-proxy:8100", "Authorization": "Bearer owui", "Content-Type": "application/json",
               "User-Agent": "Python/3.11 aiohttp/3.12.15", "Accept": "*/*",
               "Accept-Encoding": "gzip, deflate"}
    assert (await client.get("/v1/models", headers=headers)).status == 200
    resp = await client.post("/v1/chat/completions", data=json.dumps({**CHAT, "stream": True,
                             "stream_options": {"include_usage": True}}), headers=headers)
    assert resp.status == 200
    assert sse_events(await resp.read())[-1] == "[DONE]"
    assert len(fake[fake_openai.REQUESTS]) == 1


async def test_curl_dash_d_with_its_form_content_type_still_works(env):
    """`curl -d '{...}'` labels JSON as a form; the proxy reads the body as JSON whatever the label."""
    client, _ = await env()
    resp = await client.post("/v1/chat/completions", data=json.dumps(CHAT).encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded", "User-Agent": "curl/8.5.0", "Accept": "*/*"})
    assert resp.status == 200, await resp.text()


async def test_the_openai_sdk_works_with_keys_set(env, openai_sdk):
    client, _ = await env(API_KEYS="sdk-key")
    sdk = openai_sdk(client)
    sdk.api_key = "sdk-key"
    completion = await sdk.chat.completions.create(model="m-echo", messages=user("hi"))
    assert completion.choices[0].message.content
    assert [m.id async for m in sdk.models.list()]


# -- API keys and admin keys -----------------------------------------------------------------------
async def test_a_refused_key_is_one_request_log_line_with_no_key_in_it(env):
    client, _ = await env(API_KEYS="right-key")
    for headers in ({"Authorization": "Bearer sk-WRONG-ATTEMPT-123"}, {}):
        await error_of(await client.post("/v1/chat/completions", json=CHAT, headers=headers), 401,
                       "invalid_api_key")
    assert (await client.post("/v1/chat/completions", json=CHAT,
                              headers={"Authorization": "Bearer right-key"})).status == 200
    records = await log_records(client)
    assert [(r["status"], r["error_code"]) for r in records] == [
        (401, "invalid_api_key"), (401, "invalid_api_key"), (200, None)]
    text = Path(keys.config(client.app).log_path).read_text()
    assert "WRONG-ATTEMPT" not in text and "right-key" not in text


async def test_a_non_ascii_authorization_header_is_401_not_500(env):
    client, _ = await env(API_KEYS="k1", ADMIN_KEYS="a1")
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/admin/vllm")):
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                "Content-Type: application/json\r\n").encode() + b"Authorization: Bearer k\xc3\xa9\xff1\r\n"
        body = json.dumps(CHAT).encode() if method == "POST" else b""
        status, payload = await raw_request(client, head + f"Content-Length: {len(body)}\r\n".encode(), body)
        assert status == 401, payload
        assert json.loads(payload)["error"]["code"] == "invalid_api_key"


async def test_admin_keys_guard_the_admin_routes_apart_from_api_keys(env):
    """OpenWebUI holds an API key; only an admin key may start or stop models."""
    client, _ = await env(API_KEYS="owui-key", ADMIN_KEYS="admin-key")
    stop = await client.post("/v1/admin/vllm/stop", headers={"Authorization": "Bearer owui-key"})
    body = await error_of(stop, 403, "admin_key_required")
    assert "CHAT_PROXY_ADMIN_KEYS" in body["error"]["message"]
    await error_of(await client.get("/v1/admin/vllm"), 401, "invalid_api_key")
    admin = {"Authorization": "Bearer admin-key"}
    assert (await client.get("/v1/admin/vllm", headers=admin)).status != 401
    assert (await client.get("/v1/admin/vllm", headers=admin)).status != 403
    # the admin key works on the other routes too, the API key still does
    assert (await client.get("/v1/models", headers=admin)).status == 200
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer owui-key"})).status == 200


async def test_admin_keys_alone_leave_the_other_routes_open(env):
    client, _ = await env(ADMIN_KEYS="admin-key")
    assert (await client.get("/v1/models")).status == 200
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    await error_of(await client.get("/v1/admin/vllm"), 401, "invalid_api_key")


# -- imageworks-loader with keys -------------------------------------------------------------------
async def run_loader(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from imageworks_proxy.cli.loader import main; sys.exit(main())",
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_the_loader_sends_the_admin_key_from_its_option_or_the_environment(env, tmp_path):
    """From the host into Docker the loader is not a loopback client: it needs the admin key."""
    client, _ = await env(ADMIN_KEYS="admin-key", API_KEYS="owui-key")
    url = str(client.make_url("")).rstrip("/")
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    base["CHAT_PROXY_REGISTRY"] = keys.config(client.app).registry
    code, out, err = await run_loader(base, "--url", url, "current-model")
    assert code == 1 and "CHAT_PROXY_ADMIN_KEYS" in err
    code, out, err = await run_loader({**base, "CHAT_PROXY_API_KEYS": "owui-key"}, "--url", url,
                                      "current-model")
    assert code == 1 and "admin_key_required" in err
    code, out, err = await run_loader(base, "--url", url, "--api-key", "admin-key", "current-model")
    assert (code, json.loads(out)) == (0, None), err
    code, out, err = await run_loader({**base, "CHAT_PROXY_ADMIN_KEYS": "admin-key"}, "--url", url,
                                      "current-model")
    assert (code, json.loads(out)) == (0, None), err
