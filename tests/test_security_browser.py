"""What a web page in the user's own browser can do with the proxy, seen from a real headless Chromium:
pages on other sites cannot chat or stop models, a DNS-rebinding page reads nothing, and an origin the
user allowed gets working CORS (OpenWebUI's "direct connections"). Skipped without ``chromium``, except
in CI (docs/security.md)."""

from __future__ import annotations

import json
import os

import pytest
from aiohttp import web

from imageworks_proxy.testing.fakes import openai as fake_openai
from tests.chromium import Chromium, find_chromium
from tests.proxy_helpers import log_records

CHROMIUM = find_chromium()
#: The name a rebinding attacker's DNS points at 127.0.0.1, after the victim loaded the page from it.
REBOUND = "rebind.test"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)",
)

ATTACK = """<!doctype html><title>a page on another site</title><script>
const proxy = %s;
const chat = {model: "m-echo", messages: [{role: "user", content: "spend the GPU"}]};
window.done = Promise.all([
  fetch(proxy + "/v1/chat/completions", {method: "POST", mode: "no-cors",
        headers: {"Content-Type": "text/plain"}, body: JSON.stringify(chat)})
        .then(() => "sent", () => "failed"),
  fetch(proxy + "/v1/admin/vllm/stop", {method: "POST", mode: "no-cors", body: "{}"})
        .then(() => "sent", () => "failed"),
  fetch(proxy + "/v1/models").then((r) => r.text(), () => "unreadable"),
]);
</script>"""

DIRECT = """<!doctype html><title>OpenWebUI, direct connection</title><script>
const proxy = new URLSearchParams(location.search).get("proxy");
const headers = {Accept: "application/json", "Content-Type": "application/json",
                 authorization: "Bearer browser-key"};
window.done = (async () => {
  const models = await (await fetch(proxy + "/v1/models", {method: "GET", headers})).json();
  const resp = await fetch(proxy + "/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(
    {model: "m-echo", stream: true, messages: [{role: "user", content: "hello"}]})});
  return {models: models.data.map((m) => m.id), stream: await resp.text(),
          requestId: resp.headers.get("X-Request-Id")};
})();
</script>"""


@pytest.fixture
async def browser(tmp_path):
    if CHROMIUM is None:
        pytest.fail("CI is set but chromium is not installed: .ci/run installs it with apt-get")
    rules = f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"
    chromium = await Chromium.launch(CHROMIUM, tmp_path, flags=(rules,))
    yield chromium
    await chromium.close()


@pytest.fixture
def env(fake_openai_proxy):
    return fake_openai_proxy


async def page_server(aiohttp_server, html: str) -> str:
    """Another site: a server of its own (another port, so another origin) serving one page."""
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app.router.add_get("/", page)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


async def test_a_page_on_another_site_cannot_chat_stop_models_or_read_answers(env, browser, aiohttp_server):
    client, fake = await env()
    proxy = str(client.make_url("")).rstrip("/")
    tab = await browser.open(await page_server(aiohttp_server, ATTACK % json.dumps(proxy)))
    chat, stop, models = await tab.evaluate("window.done")
    assert models == "unreadable"
    assert fake[fake_openai.REQUESTS] == []  # no chat reached a model
    records = await log_records(client)
    assert [(r["status"], r["error_code"]) for r in records] == [(403, "origin_not_allowed")]
    assert (chat, stop) == ("sent", "sent")  # the browser did send them: the proxy refused them


async def test_a_dns_rebinding_page_reads_nothing(env, browser):
    """The attacker's name now resolves to 127.0.0.1: the page is same-origin with the proxy's port."""
    client, _ = await env()
    tab = await browser.open(f"http://{REBOUND}:{client.port}/v1/models")
    text = await tab.evaluate("document.body.innerText")
    assert "host_not_allowed" in text and "m-echo" not in text
    assert await tab.evaluate("fetch('/v1/health').then((r) => r.status)") == 403


async def test_openwebui_direct_connections_work_from_an_allowed_origin_in_a_browser(
    env, browser, aiohttp_server
):
    page = await page_server(aiohttp_server, DIRECT)
    client, _ = await env(API_KEYS="browser-key", ALLOWED_ORIGINS=page.rstrip("/"))
    tab = await browser.open(f"{page}?proxy={client.make_url('')}".rstrip("/"))
    result = await tab.evaluate("window.done")
    assert "m-echo" in result["models"]
    assert result["stream"].rstrip().endswith("data: [DONE]")
    assert result["requestId"]  # exposed to the page
