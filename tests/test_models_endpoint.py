"""/v1/models, /v1/health and the HTTP envelope: what a client of the running proxy sees."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from imageworks_proxy import __version__, keys
from imageworks_proxy.hookspecs import hookimpl
from tests.openai_schemas import validate_error, validate_models

EXTERNAL = {"base_url": "http://127.0.0.1:9/v1"}


async def _models(client) -> list[dict]:
    resp = await client.get("/v1/models")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    validate_models(body)
    return body["data"]


async def _logical_ids(client) -> set[str]:
    return {m["extensions"]["logical_id"] for m in await _models(client)}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- shape -----------------------------------------------------------------------------------------------

async def test_model_list_shape_and_extensions(make_config, registry_file, proxy_client, tmp_path):
    weights = tmp_path / "weights" / "qwen"
    weights.mkdir(parents=True)
    (weights / "chat_template.jinja").write_text("{{ messages }}")
    registry_file([
        {"name": "qwen-vl", "backend": "vllm", "family": "Qwen2.5-VL-7B-Instruct-AWQ", "quantization": "awq",
         "download_path": str(weights), "download_size_bytes": 123456, "download_format": "safetensors",
         "capabilities": {"vision": True, "tools": True, "thinking": True, "audio": True}},
        {"name": "ext", "backend": "openai", "backend_config": EXTERNAL, "display_name": "External One"},
    ])
    client = await proxy_client(make_config(SCHEMA_VERSION="7"))
    models = {m["id"]: m for m in await _models(client)}
    assert set(models) == {"qwen2.5-vl-7b-instruct (AWQ)", "External One"}

    qwen = models["qwen2.5-vl-7b-instruct (AWQ)"]
    assert qwen["object"] == "model" and qwen["owned_by"] == "imageworks"
    assert isinstance(qwen["created"], int) and qwen["created"] > 0
    assert qwen["name"] == qwen["id"]
    assert qwen["extensions"] == {
        "logical_id": "qwen-vl",
        "display_name": "qwen2.5-vl-7b-instruct (AWQ)",
        "size_bytes": 123456,
        "capabilities": ["audio", "reasoning", "tools", "vision"],
        "modalities": ["text", "image", "audio"],
        "has_chat_template": True,
        "kind": "chat",
        "endpoints": ["chat/completions", "completions"],
        "status": "stopped",  # orchestrated vLLM, not started
        "schema_version": 7,
    }
    ext = models["External One"]["extensions"]
    assert ext["logical_id"] == "ext" and ext["status"] is None and ext["modalities"] == ["text"]
    assert ext["schema_version"] == 7


async def test_empty_registry_is_a_valid_empty_list(make_config, registry_file, proxy_client):
    registry_file([])
    client = await proxy_client(make_config())
    assert await _models(client) == []


async def test_models_are_listed_in_logical_name_order(make_config, registry_file, proxy_client):
    registry_file([{"name": n, "backend": "openai", "backend_config": EXTERNAL} for n in ("c", "a", "b")])
    client = await proxy_client(make_config())
    assert [m["extensions"]["logical_id"] for m in await _models(client)] == ["a", "b", "c"]


# -- installed-only rules ------------------------------------------------------------------------------------


async def test_installed_only_follows_download_path(make_config, registry_file, proxy_client, tmp_path):
    present = tmp_path / "present"
    present.mkdir()
    registry_file(
        [
            {"name": "here", "backend": "vllm", "download_path": str(present)},
            {"name": "gone", "backend": "vllm", "download_path": str(tmp_path / "missing")},
            {
                "name": "gone-external",
                "backend": "openai",
                "backend_config": EXTERNAL,
                "download_path": str(tmp_path / "missing"),
            },
            {
                "name": "external-no-path",
                "backend": "lmdeploy",
                "backend_config": {"host": "127.0.0.1", "port": 9},
            },
            {"name": "hub-id", "backend": "vllm", "backend_config": {"model_path": "org/model"}},
            {
                "name": "local-path-missing",
                "backend": "vllm",
                "backend_config": {"model_path": str(tmp_path / "nope")},
            },
        ]
    )
    client = await proxy_client(make_config())
    assert await _logical_ids(client) == {"here", "external-no-path", "hub-id"}

    client_all = await proxy_client(make_config(INCLUDE_NON_INSTALLED="1"))
    assert await _logical_ids(client_all) == {
        "here",
        "gone",
        "gone-external",
        "external-no-path",
        "hub-id",
        "local-path-missing",
    }


async def test_download_path_appearing_later_is_noticed(make_config, registry_file, proxy_client, tmp_path):
    target = tmp_path / "later"
    registry_file([{"name": "later", "backend": "vllm", "download_path": str(target)}])
    client = await proxy_client(make_config())
    assert await _logical_ids(client) == set()
    target.mkdir()
    deadline = asyncio.get_running_loop().time() + 5
    while await _logical_ids(client) != {"later"}:
        assert asyncio.get_running_loop().time() < deadline, "a newly downloaded model never appeared"
        await asyncio.sleep(0.1)


async def test_deprecated_is_hidden_but_still_resolvable(make_config, registry_file, proxy_client):
    registry_file(
        [
            {"name": "old", "backend": "openai", "backend_config": EXTERNAL, "deprecated": True},
            {"name": "new", "backend": "openai", "backend_config": EXTERNAL},
        ]
    )
    for flags in ({}, {"INCLUDE_NON_INSTALLED": "1"}):
        client = await proxy_client(make_config(**flags))
        assert await _logical_ids(client) == {"new"}
        assert keys.models(client.app).resolve("old").name == "old"


async def test_testing_models_hidden_unless_asked(make_config, registry_file, proxy_client):
    registry_file(
        [
            {"name": "t", "backend": "openai", "backend_config": EXTERNAL, "metadata": {"testing": True}},
            {"name": "n", "backend": "openai", "backend_config": EXTERNAL},
        ]
    )
    assert await _logical_ids(await proxy_client(make_config())) == {"n"}
    assert await _logical_ids(await proxy_client(make_config(INCLUDE_TEST_MODELS="1"))) == {"n", "t"}


# -- Ollama's /api/tags --------------------------------------------------------------------------------------


def _fake_ollama(
    tags: list[str], calls: list[str] | None = None, hang: asyncio.Event | None = None
) -> web.Application:
    async def api_tags(request: web.Request) -> web.Response:
        if calls is not None:
            calls.append(request.path)
        if hang is not None:
            await hang.wait()
        return web.json_response({"models": [{"name": t, "model": t, "size": 1} for t in tags]})

    app = web.Application()
    app.router.add_get("/api/tags", api_tags)
    return app


def _ollama_entries(tmp_path, host=None, port=None):
    bc = {} if host is None else {"host": host, "port": port}
    visible = tmp_path / "ollama-blob"
    visible.mkdir(exist_ok=True)
    return [
        {
            "name": "present",
            "backend": "ollama",
            "served_model_id": "llama3.2:3b",
            "backend_config": dict(bc),
        },
        {"name": "latest", "backend": "ollama", "backend_config": {**bc, "model_path": "ollama:/qwen3"}},
        {"name": "absent", "backend": "ollama", "served_model_id": "mistral:7b", "backend_config": dict(bc)},
        {
            "name": "absent-with-files",
            "backend": "ollama",
            "served_model_id": "phi3:mini",
            "download_path": str(visible),
            "backend_config": dict(bc),
        },
    ]


async def test_ollama_entries_listed_when_their_tag_is_pulled(
    make_config, registry_file, proxy_client, aiohttp_server, tmp_path
):
    calls: list[str] = []
    ollama = await aiohttp_server(_fake_ollama(["llama3.2:3b", "qwen3:latest"], calls))
    registry_file(_ollama_entries(tmp_path, "127.0.0.1", ollama.port))
    client = await proxy_client(make_config())
    assert await _logical_ids(client) == {"present", "latest"}
    assert await _logical_ids(client) == {"present", "latest"}
    assert calls == ["/api/tags"], "tags are cached between listings"


async def test_ollama_default_base_url_is_used_for_entries_without_a_host(
    make_config, registry_file, proxy_client, aiohttp_server, tmp_path
):
    ollama = await aiohttp_server(_fake_ollama(["mistral:7b"]))
    registry_file(_ollama_entries(tmp_path))
    client = await proxy_client(make_config(OLLAMA_BASE_URL=f"http://127.0.0.1:{ollama.port}"))
    assert await _logical_ids(client) == {"absent"}


async def test_ollama_down_keeps_its_entries_listed_as_unavailable(
    make_config, registry_file, proxy_client, tmp_path
):
    registry_file(_ollama_entries(tmp_path, "127.0.0.1", _closed_port()))
    client = await proxy_client(make_config())
    body = await (await client.get("/v1/models")).json()
    validate_models(body)
    statuses = {m["extensions"]["logical_id"]: m["extensions"]["status"] for m in body["data"]}
    assert statuses == dict.fromkeys(["present", "latest", "absent", "absent-with-files"], "unavailable")
    health = await (await client.get("/v1/health")).json()
    assert health["status"] == "ok"
    resp = await client.post(
        "/v1/chat/completions", json={"model": "present", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "backend_unavailable" and "ollama serve" in error["hint"]


async def test_ollama_hanging_does_not_hang_the_list(
    make_config, registry_file, proxy_client, aiohttp_server, tmp_path
):
    release = asyncio.Event()
    ollama = await aiohttp_server(_fake_ollama(["llama3.2:3b"], hang=release))
    registry_file(_ollama_entries(tmp_path, "127.0.0.1", ollama.port))
    client = await proxy_client(make_config())
    try:
        # Completes (a hung listing would hit this client timeout and fail the test).
        resp = await client.get("/v1/models", timeout=aiohttp.ClientTimeout(total=10))
        assert resp.status == 200
        body = await resp.json()
        validate_models(body)
        # Not answered yet: whether the tags are pulled is unknown, so every entry stays, status unknown.
        statuses = {m["extensions"]["logical_id"]: m["extensions"]["status"] for m in body["data"]}
        assert statuses == dict.fromkeys(["present", "latest", "absent", "absent-with-files"])
    finally:
        release.set()


async def test_ollama_installed_rule_ignored_with_include_non_installed(
    make_config, registry_file, proxy_client, tmp_path
):
    registry_file(_ollama_entries(tmp_path, "127.0.0.1", _closed_port()))
    client = await proxy_client(make_config(INCLUDE_NON_INSTALLED="1"))
    assert await _logical_ids(client) == {"present", "latest", "absent", "absent-with-files"}


# -- health --------------------------------------------------------------------------------------------------


async def test_health_shape(make_config, registry_file, proxy_client):
    registry_file(
        [
            {"name": "a", "backend": "openai", "backend_config": EXTERNAL},
            {"name": "b", "backend": "openai", "backend_config": EXTERNAL, "deprecated": True},
        ]
    )
    client = await proxy_client(make_config())
    resp = await client.get("/v1/health")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert resp.headers["X-Request-Id"]
    body = await resp.json()
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert isinstance(body["uptime_s"], (int, float)) and body["uptime_s"] >= 0
    assert body["registry"]["models"] == 2
    assert body["registry"]["error"] is None
    assert isinstance(body["registry"]["loaded_at"], (int, float))
    assert {k: body["vllm"][k] for k in ("active", "state")} == {"active": None, "state": "stopped"}
    assert isinstance(body["gpu"], list)
    assert body["plugins"] == {"errors": []}


async def test_health_is_open_when_api_keys_are_set_and_models_is_not(
    make_config, registry_file, proxy_client
):
    registry_file([])
    client = await proxy_client(make_config(API_KEYS="sk-1,sk-2"))
    assert (await client.get("/v1/health")).status == 200
    resp = await client.get("/v1/models")
    assert resp.status == 401
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "invalid_api_key"
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer sk-2"})).status == 200
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer sk-3"})).status == 401


# -- HTTP envelope -------------------------------------------------------------------------------------------


async def test_unknown_route_is_a_json_404_in_the_error_shape(make_config, registry_file, proxy_client):
    registry_file([])
    client = await proxy_client(make_config())
    resp = await client.get("/v1/nope")
    assert resp.status == 404
    assert resp.content_type == "application/json"
    rid = resp.headers["X-Request-Id"]
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "not_found"
    assert body["error"]["request_id"] == rid


async def test_wrong_method_is_a_json_405(make_config, registry_file, proxy_client):
    registry_file([])
    client = await proxy_client(make_config())
    resp = await client.post("/v1/models", json={})
    assert resp.status == 405
    assert resp.content_type == "application/json"
    assert "GET" in resp.headers["Allow"]
    assert resp.headers["X-Request-Id"]
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/health", "/v1/plugins", "/nowhere"])
async def test_every_response_has_a_request_id(make_config, registry_file, proxy_client, path):
    registry_file([])
    client = await proxy_client(make_config())
    a = (await client.get(path)).headers["X-Request-Id"]
    b = (await client.get(path)).headers["X-Request-Id"]
    assert a and b and a != b


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("trace-123_abc.def:9", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("bad id", False),
        ("<script>", False),
        ("", False),
    ],
)
async def test_incoming_request_id_kept_only_when_sane(
    make_config, registry_file, proxy_client, incoming, kept
):
    registry_file([])
    client = await proxy_client(make_config())
    resp = await client.get("/v1/nope", headers={"X-Request-Id": incoming})
    rid = resp.headers["X-Request-Id"]
    body = await resp.json()
    assert body["error"]["request_id"] == rid
    if kept:
        assert rid == incoming
    else:
        assert rid != incoming and rid.startswith("req_")


class RoutesPlugin:
    """Adds routes through the startup hook that fail the way real handlers can."""

    @hookimpl
    def startup(self, app):
        async def crash(request):
            raise RuntimeError("secret internal detail")

        async def echo(request):
            return web.json_response({"bytes": len(await request.read())})

        app.router.add_get("/v1/crash", crash)
        app.router.add_post("/v1/echo", echo)


async def test_unexpected_exception_is_a_json_500_without_a_traceback(
    make_config, registry_file, proxy_client, caplog
):
    registry_file([])
    client = await proxy_client(make_config(), plugins=(RoutesPlugin(),))
    resp = await client.get("/v1/crash")
    assert resp.status == 500 and resp.content_type == "application/json"
    body = await resp.json()
    validate_error(body)
    rid = resp.headers["X-Request-Id"]
    assert body["error"]["code"] == "internal_error" and rid in body["error"]["message"]
    assert "secret internal detail" not in await resp.text() and "Traceback" not in await resp.text()
    assert any(r.exc_info and rid in r.getMessage() for r in caplog.records), "logged with its traceback"


async def test_body_over_the_cap_is_a_json_413(make_config, registry_file, proxy_client):
    registry_file([])
    client = await proxy_client(make_config(MAX_BODY_BYTES="1000"), plugins=(RoutesPlugin(),))
    assert await (await client.post("/v1/echo", data=b"x" * 1000)).json() == {"bytes": 1000}
    resp = await client.post("/v1/echo", data=b"x" * 1001)
    assert resp.status == 413 and resp.content_type == "application/json"
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "payload_too_large"
    assert resp.headers["X-Request-Id"]
