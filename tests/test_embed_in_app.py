"""Embedding: the proxy mounted in another aiohttp app, and two proxies in one process."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
from pathlib import Path

from aiohttp import web

from imageworks_proxy import create_app, keys
from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.plugins import make_plugin_manager
from tests.openai_schemas import validate_error, validate_models

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = {"base_url": "http://127.0.0.1:9/v1"}


def _load_example():
    spec = importlib.util.spec_from_file_location("embed_app_example", ROOT / "examples" / "embed_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entries(*names: str) -> list[dict]:
    return [{"name": n, "backend": "openai", "backend_config": EXTERNAL} for n in names]


def _watchers() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "registry-watcher" and not t.done()]


async def _logical_ids(client, prefix: str = "") -> list[str]:
    resp = await client.get(f"{prefix}/v1/models")
    assert resp.status == 200
    body = await resp.json()
    validate_models(body)
    return sorted(m["extensions"]["logical_id"] for m in body["data"])


async def test_example_app_serves_the_proxy_under_llm(make_config, registry_file, aiohttp_client):
    registry_file(_entries("a", "b"))
    example = _load_example()
    parent = example.build_app(make_config())
    client = await aiohttp_client(parent)

    resp = await client.get("/")
    assert resp.status == 200 and (await resp.json())["app"] == "my-app"
    assert await _logical_ids(client, "/llm") == ["a", "b"]
    health = await client.get("/llm/v1/health")
    assert health.status == 200
    assert (await health.json())["registry"]["models"] == 2
    assert health.headers["X-Request-Id"]

    # an unknown route under the proxy's prefix gets the proxy's JSON error shape
    missing = await client.get("/llm/v1/nope")
    assert missing.status == 404
    body = await missing.json()
    validate_error(body)
    assert missing.headers["X-Request-Id"] == body["error"]["request_id"]
    assert parent._client_max_size == make_config().max_body_bytes


class Recorder(Adapter):
    name = "recorder"
    backends = ("recorded",)
    events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")

    async def close(self) -> None:
        self.events.append("close")


class RecorderPlugin:
    @hookimpl
    def register_backends(self, register):
        register(Recorder)


async def test_mounted_proxy_starts_and_cleans_up_with_the_parent(make_config, registry_file, aiohttp_client):
    Recorder.events = []
    registry_file(_entries("a"))
    sub = create_app(
        make_config(), plugin_manager=make_plugin_manager(load_entrypoints=False, plugins=[RecorderPlugin()])
    )
    parent = web.Application()
    parent.add_subapp("/llm", sub)
    client = await aiohttp_client(parent)
    assert await _logical_ids(client, "/llm") == ["a"]
    assert Recorder.events == ["start"]
    assert len(_watchers()) == 1
    session = keys.http(sub)
    assert not session.closed

    await client.close()
    assert Recorder.events == ["start", "close"]
    assert session.closed
    assert _watchers() == []


async def test_mounted_proxy_hot_reloads(make_config, registry_file, aiohttp_client):
    path = registry_file(_entries("a"))
    parent = web.Application()
    parent.add_subapp(
        "/llm", create_app(make_config(), plugin_manager=make_plugin_manager(load_entrypoints=False))
    )
    client = await aiohttp_client(parent)
    assert await _logical_ids(client, "/llm") == ["a"]
    path.write_text(json.dumps(_entries("a", "b")))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    deadline = time.monotonic() + 3
    while await _logical_ids(client, "/llm") != ["a", "b"]:
        assert time.monotonic() < deadline, "the mounted proxy did not pick up the registry edit"
        await asyncio.sleep(0.05)


async def test_two_proxies_with_different_configs_do_not_interfere(make_config, tmp_path, aiohttp_client):
    reg_one = tmp_path / "one.json"
    reg_two = tmp_path / "two.json"
    reg_one.write_text(
        json.dumps(
            _entries("only-in-one")
            + [
                {
                    "name": "hidden",
                    "backend": "openai",
                    "backend_config": EXTERNAL,
                    "metadata": {"testing": True},
                }
            ]
        )
    )
    reg_two.write_text(
        json.dumps(
            _entries("only-in-two")
            + [
                {
                    "name": "hidden",
                    "backend": "openai",
                    "backend_config": EXTERNAL,
                    "metadata": {"testing": True},
                }
            ]
        )
    )
    one = create_app(
        make_config(REGISTRY=str(reg_one), SCHEMA_VERSION="1"),
        plugin_manager=make_plugin_manager(load_entrypoints=False),
    )
    two = create_app(
        make_config(
            REGISTRY=str(reg_two),
            SCHEMA_VERSION="2",
            INCLUDE_TEST_MODELS="1",
            SUPPRESS_DECORATIONS="0",
            API_KEYS="sk-two",
        ),
        plugin_manager=make_plugin_manager(load_entrypoints=False),
    )
    parent = web.Application()
    parent.add_subapp("/one", one)
    parent.add_subapp("/two", two)
    client = await aiohttp_client(parent)
    auth = {"Authorization": "Bearer sk-two"}

    assert await _logical_ids(client, "/one") == ["only-in-one"]
    assert (await client.get("/two/v1/models")).status == 401  # keys of one proxy are not the other's
    resp = await client.get("/two/v1/models", headers=auth)
    data = (await resp.json())["data"]
    assert sorted(m["extensions"]["logical_id"] for m in data) == ["hidden", "only-in-two"]
    assert {m["extensions"]["schema_version"] for m in data} == {2}
    assert all("backend" in m["extensions"] for m in data)

    one_models = (await (await client.get("/one/v1/models")).json())["data"]
    assert {m["extensions"]["schema_version"] for m in one_models} == {1}
    assert all("backend" not in m["extensions"] for m in one_models)

    # a registry edit reaches only the proxy that reads that file
    reg_one.write_text("broken")
    st = reg_one.stat()
    os.utime(reg_one, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    deadline = time.monotonic() + 3
    while (await (await client.get("/one/v1/health")).json())["registry"]["error"] is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert (await (await client.get("/two/v1/health")).json())["registry"]["error"] is None
    assert keys.config(one) is not keys.config(two)
    assert keys.models(one) is not keys.models(two)
