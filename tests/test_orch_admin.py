"""The orchestrator admin API: state, activate, stop; loopback only unless API keys are set."""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from imageworks_proxy.adapters import vllm_admin as admin
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.testing import free_port
from imageworks_proxy.upstream import process
from tests.openai_schemas import validate_error
from tests.orch_helpers import orch_settings, started, vllm_entry


@pytest.fixture
def orch(tmp_path, make_config, registry_file, proxy_client):
    async def start(entries, **overrides):
        registry_file(entries)
        return await proxy_client(make_config(**orch_settings(free_port(), **overrides)))

    return start


async def test_activate_state_and_stop(orch, tmp_path):
    client = await orch(
        [
            vllm_entry("alpha", tmp_path),
            vllm_entry("beta", tmp_path),
            {"name": "llama", "backend": "ollama", "backend_config": {"model_path": "ollama:/llama3"}},
        ]
    )
    state = await (await client.get("/v1/admin/vllm")).json()
    assert state["vllm"]["active"] is None and state["vllm"]["state"] == "stopped"
    assert state["stats"]["swaps"] == 0

    resp = await client.post("/v1/admin/vllm/activate", json={"model": "alpha"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["vllm"]["active"] == "alpha" and body["vllm"]["state"] == "loaded"
    pid = body["vllm"]["pid"]
    assert process.pid_alive(pid)

    # the listed id works as well as the logical name; activating the active model is a no-op
    models = await (await client.get("/v1/models")).json()
    alpha_id = next(m["id"] for m in models["data"] if m["extensions"]["logical_id"] == "alpha")
    again = await (await client.post("/v1/admin/vllm/activate", json={"model": alpha_id})).json()
    assert again["vllm"]["pid"] == pid

    switched = await (await client.post("/v1/admin/vllm/activate", json={"model": "beta"})).json()
    assert switched["vllm"]["active"] == "beta" and not process.pid_alive(pid)

    stopped = await (await client.post("/v1/admin/vllm/stop")).json()
    assert stopped["vllm"]["active"] is None and stopped["vllm"]["state"] == "stopped"
    assert [e["model"] for e in started(tmp_path)] == ["served-alpha", "served-beta"]
    state = await (await client.get("/v1/admin/vllm")).json()
    assert state["stats"]["swaps"] == 2 and state["stats"]["vllm_launches"] == 2

    for payload, status, code in [
        ({"model": "llama"}, 400, "invalid_request"),
        ({"model": "nope"}, 404, "model_not_found"),
        ({}, 400, "invalid_request"),
    ]:
        resp = await client.post("/v1/admin/vllm/activate", json=payload)
        assert resp.status == status
        body = await resp.json()
        validate_error(body)
        assert body["error"]["code"] == code


async def test_activation_retries_a_model_that_failed_moments_ago(orch, tmp_path):
    client = await orch(
        [vllm_entry("broken", tmp_path, "--fake-fail", "ValueError: bad quantization config")]
    )
    for _ in range(2):  # an explicit activation ignores the failure backoff
        resp = await client.post("/v1/admin/vllm/activate", json={"model": "broken"})
        assert resp.status == 503
        assert "bad quantization config" in (await resp.json())["error"]["message"]
    assert len(started(tmp_path)) == 2


def _request(app, peer, headers=None):
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: peer if name == "peername" else default
    return make_mocked_request("GET", "/v1/admin/vllm", app=app, transport=transport, headers=headers or {})


async def test_admin_answers_loopback_clients_only_unless_api_keys_are_set(
    make_config, make_app, registry_file, tmp_path
):
    registry_file([])
    app = make_app(make_config(**orch_settings(free_port())))
    with pytest.raises(ProxyError) as exc:
        admin._guard(_request(app, ("192.168.1.20", 5000)))
    assert exc.value.status == 403
    assert admin._guard(_request(app, ("127.0.0.1", 5000))) is not None
    assert admin._guard(_request(app, ("::1", 5000, 0, 0))) is not None
    keyed = make_app(make_config(**orch_settings(free_port(), API_KEYS="k1")))
    assert admin._guard(_request(keyed, ("192.168.1.20", 5000))) is not None  # the key was checked by auth


async def test_with_api_keys_the_admin_api_needs_a_key(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path)], API_KEYS="secret")
    assert (await client.get("/v1/admin/vllm")).status == 401
    resp = await client.get("/v1/admin/vllm", headers={"Authorization": "Bearer secret"})
    assert resp.status == 200


async def test_admin_says_so_when_orchestration_is_off(orch, tmp_path):
    client = await orch([], VLLM_SINGLE_PORT="0")
    resp = await client.get("/v1/admin/vllm")
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "orchestration_disabled"


async def test_with_sleep_mode_the_admin_api_puts_models_to_sleep_and_stops_them(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)], VLLM_SLEEP_LEVEL="1")
    alpha = (await (await client.post("/v1/admin/vllm/activate", json={"model": "alpha"})).json())["vllm"]
    resp = await client.post("/v1/admin/vllm/sleep")
    assert resp.status == 200, await resp.text()
    state = (await resp.json())["vllm"]
    assert state["active"] is None and state["state"] == "stopped"
    assert [(s["model"], s["pid"]) for s in state["sleeping"]] == [("alpha", alpha["pid"])]
    again = await client.post("/v1/admin/vllm/sleep", json={"model": "alpha"})  # already asleep: no-op
    assert again.status == 200
    beta = (await (await client.post("/v1/admin/vllm/activate", json={"model": "beta"})).json())["vllm"]
    resp = await client.post("/v1/admin/vllm/sleep", json={"model": "alpha"})
    assert resp.status == 200 and (await resp.json())["vllm"]["active"] == "beta"  # alpha sleeps already
    state = (await (await client.post("/v1/admin/vllm/stop", json={"model": "alpha"})).json())["vllm"]
    assert state["active"] == "beta" and state["sleeping"] == [] and not process.pid_alive(alpha["pid"])
    state = (await (await client.post("/v1/admin/vllm/stop")).json())["vllm"]
    assert state["active"] is None and not process.pid_alive(beta["pid"])
    admin = (await (await client.get("/v1/admin/vllm")).json())["stats"]
    assert admin["vllm_launches"] == 2 and admin["vllm_sleeps"] == 1 and admin["vllm_wakes"] == 0


async def test_without_sleep_mode_sleep_is_refused(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path)])
    resp = await client.post("/v1/admin/vllm/sleep", json={"model": "alpha"})
    assert resp.status == 409
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "sleep_disabled"
