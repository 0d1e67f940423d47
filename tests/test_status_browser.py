"""The status page in a real browser: headless Chromium loads ``/`` from the running proxy and the tests
read what it shows. ``.ci/run`` installs Debian's ``chromium``; without it these tests are skipped, except
in CI (``CI`` set), where they fail instead.

``UPDATE_DOCS_SCREENSHOT=1`` also writes the desktop screenshot to docs/status-page.png.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from tests import status_helpers
from tests.chromium import Chromium, find_chromium

CHROMIUM = find_chromium()
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "status-page.png"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)",
)

#: What the page shows, read from the DOM.
MODEL_ROWS = """[...document.querySelectorAll('#models tbody tr')].map(tr => ({
  id: tr.querySelector('.model-id').textContent, state: tr.dataset.state,
  active: tr.dataset.active === 'true',
  button: tr.querySelector('button') ? tr.querySelector('button').textContent : null}))"""
REQUEST_IDS = "[...document.querySelectorAll('#requests tbody tr')].map(tr => tr.dataset.requestId)"


@pytest.fixture
async def browser(tmp_path):
    if CHROMIUM is None:
        pytest.fail("CI is set but chromium is not installed: .ci/run installs it with apt-get")
    chromium = await Chromium.launch(CHROMIUM, tmp_path)
    yield chromium
    await chromium.close()


@pytest.fixture
async def env(tmp_path, aiohttp_server, registry_file, make_config, proxy_client):
    async def start(**settings):
        return await status_helpers.start(tmp_path, aiohttp_server, registry_file, make_config, proxy_client,
                                          **settings)

    return start


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


async def test_the_page_shows_every_model_the_active_one_and_a_request_just_made(env, browser, tmp_path):
    e = await env(enable_metrics="1", metrics_window_s="12")  # 0.2 s slots: a few seconds fill the charts
    first = await e.chat("alpha", "describe the secret picture")
    for i in range(12):
        await e.chat(("echo 1b", "alpha", "llama3.2 3b")[i % 3])
        await asyncio.sleep(0.2)
    tab = await browser.open(str(e.client.make_url("/")))
    await tab.wait_for(f"({REQUEST_IDS}).includes({first!r})")

    rows = await tab.evaluate(MODEL_ROWS)
    assert [r["id"] for r in rows] == await e.listed_ids()
    assert [r["id"] for r in rows if r["active"]] == ["alpha"]
    states = {r["id"]: r["state"] for r in rows}
    assert (states["alpha"], states["beta"], states["m-orphan"]) == ("loaded", "stopped", "unavailable")
    assert await tab.evaluate("document.getElementById('gpu-active').textContent") == "alpha"
    # the registry's HTML display name is shown as text, never run or parsed
    assert status_helpers.HOSTILE_NAME in [r["id"] for r in rows]
    assert await tab.evaluate("document.querySelectorAll('img').length") == 0
    assert await tab.evaluate("document.title") == "imageworks-proxy status"
    assert "secret picture" not in await tab.evaluate("document.body.innerText")
    assert await tab.evaluate("document.querySelectorAll('#charts svg path').length") >= 2

    # live: a request made while the page is open shows up without a reload
    later = await e.chat("llama3.2 3b")
    await tab.wait_for(f"({REQUEST_IDS})[0] === {later!r}")
    assert tab.errors == []

    data = await tab.screenshot(tmp_path / "status-page.png")
    width, height = png_size(data)
    assert width == 1280 and height >= 900
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.write_bytes(data)


async def test_the_page_counts_down_to_the_idle_unload_of_the_active_model(env, browser):
    e = await env(vllm_idle_unload_s="120")
    await e.chat("alpha")
    tab = await browser.open(str(e.client.make_url("/")))
    await tab.wait_for("document.getElementById('gpu-idle').textContent.startsWith('in ')")
    seconds = int((await tab.evaluate("document.getElementById('gpu-idle').textContent")).split()[1])
    assert 0 < seconds <= 120


async def test_activate_and_stop_from_the_page_switch_the_gpu(env, browser):
    e = await env()
    await e.chat("alpha")
    tab = await browser.open(str(e.client.make_url("/")))
    await tab.wait_for("document.documentElement.dataset.state === 'ready'")
    rows = {r["id"]: r for r in await tab.evaluate(MODEL_ROWS)}
    assert rows["beta"]["button"] == "Activate" and rows["alpha"]["button"] is None
    assert rows["echo 1b"]["button"] is None  # only models an admin route can start

    await tab.evaluate("document.querySelector('tr[data-model=\"beta\"] button').click()")
    await tab.wait_for("document.querySelector('tr[data-model=\"beta\"]').dataset.active === 'true' && "
                       "document.querySelector('tr[data-model=\"beta\"]').dataset.state === 'loaded'", 60)
    assert (await e.status())["gpu"]["active"]["model"] == "beta"

    await tab.evaluate("document.querySelector('[data-adapter=\"vllm-orchestrated\"] button').click()")
    await tab.wait_for("document.getElementById('gpu-active').textContent === 'none'", 60)
    assert {m["logical_id"]: m["state"] for m in (await e.status())["models"]}["beta"] == "stopped"
    message = await tab.evaluate("document.getElementById('message').textContent")
    assert message == "Stopping vllm-orchestrated: done."
    assert tab.errors == []


async def test_on_a_phone_in_dark_mode_the_page_fits_the_screen(env, browser, tmp_path):
    e = await env()
    await e.chat("echo 1b")
    tab = await browser.open(str(e.client.make_url("/")), width=390, height=844, mobile=True, dark=True)
    await tab.wait_for("document.documentElement.dataset.state === 'ready'")
    # nothing sticks out sideways: wide tables scroll inside their card
    assert await tab.evaluate("document.documentElement.scrollWidth") <= 390
    background = await tab.evaluate("getComputedStyle(document.body).backgroundColor")
    red, green, blue = (int(x) for x in background[background.index("(") + 1:-1].split(",")[:3])
    assert max(red, green, blue) < 64, background  # dark
    assert await tab.evaluate("getComputedStyle(document.querySelector('th.wide')).display") == "none"
    width, _ = png_size(await tab.screenshot(tmp_path / "phone.png"))
    assert width == 780  # 390 CSS pixels at a device scale of 2
    assert tab.errors == []


async def test_with_api_keys_the_page_asks_for_a_key_then_shows_the_models(env, browser):
    e = await env(api_keys="sk-page")
    tab = await browser.open(str(e.client.make_url("/")))
    await tab.wait_for("!document.getElementById('key-card').hidden")
    assert "API key" in await tab.evaluate("document.getElementById('key-why').textContent")
    assert await tab.evaluate("document.querySelectorAll('#models tbody tr').length") == 0
    await tab.evaluate("document.getElementById('key-input').value = 'sk-page'; "
                       "document.getElementById('key-form').requestSubmit()")
    await tab.wait_for("document.documentElement.dataset.state === 'ready'")
    listed = await e.client.get("/v1/models", headers={"Authorization": "Bearer sk-page"})
    shown = [r["id"] for r in await tab.evaluate(MODEL_ROWS)]
    assert shown == [m["id"] for m in (await listed.json())["data"]]
    # the 401 the page got first is a console error of the browser's own; nothing else went wrong
    assert all("401" in err for err in tab.errors), tab.errors
