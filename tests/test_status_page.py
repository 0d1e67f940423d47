"""The status page over HTTP: ``GET /`` for browsers (a JSON 404 for API clients), its files, and
``GET /v1/status`` — models and their states, the GPU tenant, switches, recent requests, metrics, admin
actions. tests/test_status_browser.py looks at the same page in a real browser."""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from imageworks_proxy.http.views.status import status_json
from imageworks_proxy.observability.recent import RecentActivity, RequestSummary
from imageworks_proxy.testing import check_error
from tests import status_helpers

ROOT = Path(__file__).resolve().parents[1]
#: Every state a model row or an adapter line can show: a model's ``extensions.status``
#: (vllm/supervisor.py status_of, the Ollama adapter's model_status) and the orchestrator's own word for
#: the active model (adapters/vllm_orchestrated.py _active_state), sleep mode's included.
STATES = ("loaded", "loading", "asleep", "sleeping", "waking", "draining", "stopping", "stopped",
          "available", "unavailable")
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
SECRET = "the launch code is 0000 — never on the status page"


@pytest.fixture
async def env(tmp_path, aiohttp_server, registry_file, make_config, proxy_client):
    async def start(**settings):
        return await status_helpers.start(tmp_path, aiohttp_server, registry_file, make_config, proxy_client,
                                          **settings)

    return start


async def test_a_browser_gets_the_page_and_api_clients_keep_a_404_in_the_openai_shape(env):
    e = await env()
    page = await e.client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    assert '<script src="static/status.js"' in html
    assert "http" not in html.split("<body>")[0]  # nothing loaded from elsewhere
    for accept in ("*/*", "application/json", "text/html;q=0", None):
        resp = await e.client.get("/", headers={"Accept": accept} if accept else {"Accept": ""})
        assert resp.status == 404, accept
        body = await resp.json()
        check_error(body)
        assert body["error"]["code"] == "not_found" and "/v1" in body["error"]["message"]


async def test_the_page_files_come_from_the_package_and_nothing_else_is_served(env):
    e = await env()
    js = await e.client.get("/static/status.js")
    assert js.status == 200 and js.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert "textContent" in await js.text()
    css = await e.client.get("/static/status.css")
    assert css.status == 200 and "prefers-color-scheme: dark" in await css.text()
    for path in ("/static/status.html", "/static/registry.schema.json", "/static/..%2Fviews%2Fstatus.py",
                 "/static/nope.js"):
        resp = await e.client.get(path)
        assert resp.status == 404, path
        check_error(await resp.json())


def test_every_state_a_model_can_be_in_has_its_own_style_and_a_row_in_the_docs():
    css = (ROOT / "imageworks_proxy" / "http" / "static" / "status.css").read_text()
    styled = set(re.findall(r"\.pill\.state-([a-z]+)", css))
    docs = (ROOT / "docs" / "status-page.md").read_text()
    rows = {name for line in docs.splitlines() if line.startswith("| `")
            for name in re.findall(r"`([a-z]+)`", line.split("|")[1])}
    assert set(STATES) - styled == set(), "no style: the pill shows grey, like an unknown state"
    assert set(STATES) - rows == set(), "no row in docs/status-page.md's table of states"


async def test_status_lists_every_model_with_its_backend_state_and_the_active_one(env):
    e = await env()
    await e.chat("alpha")  # starts the fake vLLM for alpha
    status = await e.status()
    assert [m["id"] for m in status["models"]] == await e.listed_ids()
    rows = {m["logical_id"]: m for m in status["models"]}
    assert rows["alpha"] | {"activate": None} == {
        "id": "alpha", "logical_id": "alpha", "backend": "vllm", "adapter": "vllm-orchestrated",
        "capabilities": ["vision"], "modalities": ["text", "image"], "state": "loaded", "active": True,
        "activate": None,
    }
    assert (rows["beta"]["state"], rows["beta"]["active"]) == ("stopped", False)
    # backends that load models on their own: the proxy does not claim a state for them
    assert rows["m-echo"]["state"] is None and rows["m-echo"]["backend"] == "openai"
    assert rows["llama3.2-3b"]["backend"] == "ollama" and rows["llama3.2-3b"]["adapter"] == "ollama"
    assert (rows["m-orphan"]["state"], rows["m-orphan"]["adapter"]) == ("unavailable", None)
    assert status["gpu"]["active"]["model"] == "alpha" and status["gpu"]["phase"] == "ready"
    assert status["gpu"]["queue_depth"] == 0
    vllm = next(a for a in status["adapters"] if a["key"] == "vllm")
    assert vllm["state"]["active"] == "alpha" and vllm["state"]["state"] == "loaded"


async def test_admin_actions_are_offered_to_loopback_clients_for_models_an_admin_route_serves(env):
    e = await env()
    status = await e.status()
    assert status["admin"] == {"allowed": True}
    urls = {m["logical_id"]: m["activate"] for m in status["models"]}
    assert urls == {"m-echo": None, "m-hostile": None, "llama3.2-3b": None, "m-orphan": None,
                    "alpha": "/v1/admin/vllm/activate", "beta": "/v1/admin/vllm/activate"}
    assert next(a for a in status["adapters"] if a["key"] == "vllm")["stop"] == "/v1/admin/vllm/stop"


async def test_admin_actions_are_not_offered_to_a_client_elsewhere_without_api_keys(env):
    e = await env()
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("192.0.2.7", 40000) if name == "peername" else default
    )
    request = make_mocked_request("GET", "/v1/status", app=e.client.app, transport=transport)
    status = orjson.loads((await status_json(request)).body)
    assert status["admin"] == {"allowed": False}
    assert all(m["activate"] is None for m in status["models"])
    assert all(a["stop"] is None for a in status["adapters"])


async def test_recent_requests_show_figures_and_never_prompt_text(env):
    e = await env(log_prompts="1", enable_metrics="1")  # even when the request log keeps prompts
    ok = await e.chat("echo 1b", SECRET)
    streamed = await e.chat("echo 1b", SECRET, stream=True)
    missing = await e.chat("no such model", SECRET)
    resp = await e.client.get("/v1/status")
    assert SECRET not in await resp.text()
    requests = (await resp.json())["requests"]
    assert [r["request_id"] for r in requests] == [missing, streamed, ok]  # newest first
    last_ok, first_ok = requests[1], requests[2]
    assert (first_ok["model"], first_ok["status"], first_ok["adapter"], first_ok["stream"]) == (
        "m-echo", 200, "openai-passthrough", False)
    assert first_ok["completion_tokens"] > 0 and first_ok["duration_ms"] > 0
    assert last_ok["stream"] is True and last_ok["ttft_ms"] is not None
    assert (requests[0]["model"], requests[0]["status"], requests[0]["error_code"]) == (
        "no such model", 404, "model_not_found")


def test_the_recent_rings_keep_only_the_newest_requests_and_switches():
    recent = RecentActivity(requests=3, switches=2)
    for i in range(5):
        recent.add_request(RequestSummary(
            ts=float(i), request_id=f"req_{i}", model="m", adapter=None, stream=False, status=200,
            error_code=None, duration_ms=1.0, ttft_ms=None, queue_ms=0.0, prompt_tokens=None,
            completion_tokens=None, tokens_estimated=False,
        ))
    assert [r["request_id"] for r in recent.requests()] == ["req_4", "req_3", "req_2"]
    for event in ({"event": "swap", "to": "a"}, {"event": "stop", "to": None}, {"event": "swap", "to": "b"},
                  {"event": "vacate", "to": None}):
        recent.on_event(event)
    assert [(s["event"], s["to"]) for s in recent.switches()] == [("vacate", None), ("swap", "b")]


async def test_switches_and_stops_show_with_their_durations_newest_first(env):
    e = await env()
    await e.chat("alpha")
    await e.chat("beta")
    stop = await e.client.post("/v1/admin/vllm/stop", json={})
    assert stop.status == 200
    switches = (await e.status())["switches"]
    assert [(s["event"], s["from"], s["to"]) for s in switches] == [
        ("vacate", "vllm:beta", None), ("swap", "vllm:alpha", "vllm:beta"), ("swap", None, "vllm:alpha"),
    ]
    assert all(s["ok"] and s["total_s"] >= s["start_s"] > 0 for s in switches[1:])
    assert switches[0]["at"] >= switches[1]["at"] >= switches[2]["at"]
    status = await e.status()
    assert status["gpu"]["active"] is None
    assert {m["logical_id"]: m["state"] for m in status["models"]}["beta"] == "stopped"


async def test_metrics_charts_have_one_point_per_slot_only_when_metrics_are_on(env):
    e = await env()
    await e.chat("echo 1b")
    assert (await e.status())["metrics"] is None
    e = await env(enable_metrics="1", metrics_window_s="60")
    await e.chat("echo 1b")
    metrics = (await e.status())["metrics"]
    assert metrics["overall"]["requests"] == 1 and metrics["slot_s"] == 1.0
    points = metrics["points"]
    assert len(points) == 60 and points[-1]["age_s"] == 0
    assert sum(1 for p in points if p["latency_ms"] is not None) == 1
    assert [p["age_s"] for p in points] == sorted((p["age_s"] for p in points), reverse=True)


async def test_with_api_keys_the_page_is_public_and_its_data_needs_a_key(env):
    e = await env(api_keys="sk-one")
    assert (await e.client.get("/", headers={"Accept": BROWSER_ACCEPT})).status == 200
    assert (await e.client.get("/static/status.js")).status == 200
    refused = await e.client.get("/v1/status")
    assert refused.status == 401
    check_error(await refused.json())
    status = await e.status(Authorization="Bearer sk-one")
    assert len(status["models"]) == 6 and status["admin"] == {"allowed": True}
