"""Image URLs the proxy fetches itself (for Ollama): public addresses only unless allowed, every redirect
checked, only image bytes, and errors that say nothing about what answered (docs/security.md)."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from aiohttp import web

from imageworks_proxy.adapters.ollama.images import address_allowed, parse_allow_list
from imageworks_proxy.testing import free_port
from imageworks_proxy.testing.fakes.ollama import FakeOllama, ollama_entry
from tests.openai_schemas import validate_error

MODEL = "llama3.2 3b"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
SECRET_PAGE = b'{"vllm": {"active": "secret-model", "pid": 4242}}'


@pytest.fixture
async def local(aiohttp_server):
    """A loopback "image host" and, on the same server, a local "admin page" and redirects to it."""
    seen: list[str] = []

    async def image(request):
        seen.append(request.path)
        return web.Response(body=PNG, content_type="image/png")

    async def admin_page(request):
        seen.append(request.path)
        return web.Response(body=SECRET_PAGE, content_type="application/json")

    async def lying_image(request):
        seen.append(request.path)
        return web.Response(body=b"<html>not an image</html>", content_type="image/png")

    async def redirect(request):
        seen.append(request.path)
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/img/cat.png", image)
    app.router.add_get("/admin", admin_page)
    app.router.add_get("/lie.png", lying_image)
    app.router.add_get("/redirect", redirect)
    server = await aiohttp_server(app)
    server.seen = seen
    return server


@pytest.fixture
async def env(aiohttp_server, registry_file, make_config, proxy_client):
    async def start(**overrides):
        fake = FakeOllama()
        server = await aiohttp_server(fake.app())
        registry_file([ollama_entry(str(server.make_url("")).rstrip("/"))])
        client = await proxy_client(make_config(**overrides))
        return client, fake

    return start


async def ask(client, url: str):
    content = [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": url}}]
    resp = await client.post("/v1/chat/completions",
                             json={"model": MODEL, "messages": [{"role": "user", "content": content}]})
    body = await resp.json()
    if resp.status != 200:
        validate_error(body)
    return resp.status, body


def generic(body: dict, url: str) -> str:
    """The error message with the URL the client sent taken out (the client knows its own URL)."""
    return body["error"]["message"].replace(url.split("?")[0], "<url>")


async def test_loopback_image_urls_are_refused_without_a_connection(env, local):
    client, fake = await env()
    for url in (str(local.make_url("/img/cat.png")), str(local.make_url("/admin")),
                f"http://localhost:{local.port}/admin", f"http://[::1]:{local.port}/admin",
                f"http://127.1:{local.port}/admin", f"http://0.0.0.0:{local.port}/admin",
                f"http://2130706433:{local.port}/admin", f"http://[::ffff:127.0.0.1]:{local.port}/admin",
                "http://169.254.169.254/latest/meta-data/", "http://10.255.255.1/x.png",
                "http://[fd00:ec2::254]/latest/meta-data/"):
        status, body = await ask(client, url)
        assert (status, body["error"]["code"]) == (400, "invalid_image"), url
        assert "CHAT_PROXY_IMAGE_FETCH_ALLOW" in body["error"]["message"]
    assert local.seen == []  # nothing on this machine was asked
    assert fake.chats == []


async def test_the_proxys_own_admin_page_never_reaches_the_model(env):
    client, fake = await env()
    status, body = await ask(client, str(client.make_url("/v1/admin/vllm")))
    assert (status, body["error"]["code"]) == (400, "invalid_image")
    assert fake.chats == []


async def test_open_and_closed_local_ports_get_the_same_answer(env, local):
    """Refused or allowed, a client cannot tell a listening port from a closed one by the message."""
    closed = f"http://127.0.0.1:{free_port()}/admin"
    for settings in ({}, {"IMAGE_FETCH_ALLOW": "127.0.0.1"}):
        client, fake = await env(**settings)
        answers = set()
        for url in (str(local.make_url("/admin")), closed, str(local.make_url("/missing.png")),
                    str(local.make_url("/lie.png"))):
            status, body = await ask(client, url)
            answers.add((status, body["error"]["code"], generic(body, url)))
        assert len(answers) == 1, answers
        assert fake.chats == []
        text = next(iter(answers))[2]
        for leak in ("Connect", "refused", "Errno", "404", "HTTP", "secret-model"):
            assert leak not in text


async def test_an_allowed_local_image_host_works(env, local):
    for allow, host in (("127.0.0.1", "127.0.0.1"), ("127.0.0.0/8, 192.168.0.0/16", "127.0.0.1"),
                        ("localhost", "localhost")):
        client, fake = await env(IMAGE_FETCH_ALLOW=allow)
        status, body = await ask(client, f"http://{host}:{local.port}/img/cat.png")
        assert status == 200, body
        assert fake.chats[-1]["messages"][-1]["images"] == [base64.b64encode(PNG).decode()]


async def test_every_redirect_is_checked_again(env, local):
    """An allowed host that redirects to an address that is not allowed gets nothing fetched from it."""
    client, fake = await env(IMAGE_FETCH_ALLOW="localhost")
    target = f"http://127.0.0.1:{local.port}/admin"
    status, body = await ask(client, f"http://localhost:{local.port}/redirect?to={target}")
    assert (status, body["error"]["code"]) == (400, "invalid_image")
    assert local.seen == ["/redirect"]
    # a redirect to an allowed place is followed
    ok = f"http://localhost:{local.port}/img/cat.png"
    status, body = await ask(client, f"http://localhost:{local.port}/redirect?to={ok}")
    assert status == 200, body
    assert local.seen[-2:] == ["/redirect", "/img/cat.png"]


async def test_bytes_that_are_not_an_image_are_refused(env, local):
    client, fake = await env(IMAGE_FETCH_ALLOW="127.0.0.1")
    for path in ("/lie.png", "/admin"):
        status, body = await ask(client, str(local.make_url(path)))
        assert (status, body["error"]["code"]) == (400, "invalid_image")
        assert "secret-model" not in str(body)
    assert fake.chats == []


@pytest.mark.parametrize("address, allowed", [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True), ("8.8.8.8", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("0.0.0.0", False), ("::", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("fe80::1", False), ("fd00:ec2::254", False), ("fc00::1", False), ("100.100.100.200", False),
    ("224.0.0.251", False), ("239.255.255.250", False), ("ff02::1", False), ("255.255.255.255", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:7f00:1::1", False),
    ("64:ff9b::a00:1", False), ("192.0.0.170", False), ("198.18.0.1", False),
])
def test_address_policy(address, allowed):
    assert address_allowed(ipaddress.ip_address(address), parse_allow_list("")) is allowed


def test_the_allow_list_opens_hosts_and_networks():
    allow = parse_allow_list("nas.lan, 192.168.1.0/24, fd12::/16, 10.0.0.5")
    assert address_allowed(ipaddress.ip_address("192.168.1.40"), allow)
    assert address_allowed(ipaddress.ip_address("10.0.0.5"), allow)
    assert address_allowed(ipaddress.ip_address("fd12::9"), allow)
    assert not address_allowed(ipaddress.ip_address("192.168.2.40"), allow)
    assert "nas.lan" in allow.hosts
