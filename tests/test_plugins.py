"""The plugin system: entry points, the manager factory, failures, clashes, third-party adapters.

Each hookspec in ``hookspecs.HOOKSPECS`` has a ``test_hook_<name>_...`` test here (a guard test checks it).
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from imageworks_proxy import create_app, hookspecs
from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.pipeline.stage import Stage
from imageworks_proxy.plugins import PluginError, builtin_adapters, make_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {"ollama", "vllm-orchestrated", "vllm-external", "openai-passthrough", "demo"}
EXTERNAL = {"base_url": "http://127.0.0.1:9/v1"}


# -- third-party test plugins --------------------------------------------------------------------------------

class MyAdapter(Adapter):
    name = "my-adapter"
    backends = ("mybackend",)
    description = "a third-party adapter"
    events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")

    async def close(self) -> None:
        self.events.append("close")

    def installed(self, entry):
        return entry.metadata.get("installed_here", True)

    def model_status(self, entry):
        return "loaded"


class MyAdapterPlugin:
    @hookimpl
    def register_backends(self, register):
        register(MyAdapter)


class BetterOpenAI(Adapter):
    name = "better-openai"
    backends = ("openai",)


class BetterOpenAIPlugin:
    @hookimpl
    def register_backends(self, register):
        register(BetterOpenAI)


class FakeOllama(Adapter):
    name = "ollama"
    backends = ("ollama",)


class ClashingPlugin:
    @hookimpl
    def register_backends(self, register):
        register(FakeOllama)


class BrokenHookPlugin:
    @hookimpl
    def register_backends(self, register):
        raise RuntimeError("adapter registry exploded")


async def _plugins(client) -> dict:
    resp = await client.get("/v1/plugins")
    assert resp.status == 200
    return await resp.json()


async def _models(client) -> dict[str, dict]:
    resp = await client.get("/v1/models")
    assert resp.status == 200
    return {m["extensions"]["logical_id"]: m for m in (await resp.json())["data"]}


# -- entry points and the manager factory -------------------------------------------------------------------

def test_installed_distribution_registers_the_builtin_adapters_as_entry_points():
    eps = {ep.name: ep for ep in md.entry_points(group="imageworks_proxy")}
    assert set(eps) >= BUILTINS
    for name in BUILTINS:
        assert eps[name].value == builtin_adapters()[name]
        assert eps[name].dist.name == "imageworks-proxy"
        module = eps[name].load()
        assert hasattr(module, "register_backends")


@pytest.mark.parametrize("load_entrypoints", [True, False])
def test_manager_has_the_builtins_with_or_without_entry_points(load_entrypoints):
    pm = make_plugin_manager(load_entrypoints=load_entrypoints)
    assert set(pm.infos) >= BUILTINS
    for name in BUILTINS:
        info = pm.infos[name]
        assert info.builtin and info.distribution == "imageworks-proxy"
        assert info.version == md.version("imageworks-proxy")
    assert pm.failures == []


def test_manager_registers_extra_plugins_by_name():
    pm = make_plugin_manager(load_entrypoints=False, plugins=[MyAdapterPlugin()])
    assert pm.has_plugin("MyAdapterPlugin")
    assert pm.infos["MyAdapterPlugin"].builtin is False


def _patch_entry_points(monkeypatch, *extra: md.EntryPoint) -> None:
    real = md.entry_points

    def fake(**kwargs):
        found = list(real(**kwargs))
        if kwargs.get("group") == hookspecs.PROJECT:
            found += list(extra)
        return found

    monkeypatch.setattr(md, "entry_points", fake)


async def test_broken_entry_point_is_reported_by_name_and_the_app_still_serves(
    monkeypatch, make_config, registry_file, aiohttp_client, caplog
):
    _patch_entry_points(
        monkeypatch, md.EntryPoint("exploding-plugin", "no_such_module_for_imageworks", "imageworks_proxy")
    )
    registry_file([{"name": "ext", "backend": "openai", "backend_config": EXTERNAL}])
    client = await aiohttp_client(create_app(make_config()))  # real entry-point scan

    listing = await _plugins(client)
    assert [f["name"] for f in listing["errors"]] == ["exploding-plugin"]
    assert "ModuleNotFoundError" in listing["errors"][0]["error"]
    assert {p["name"] for p in listing["data"]} >= BUILTINS
    health = await (await client.get("/v1/health")).json()
    assert health["plugins"]["errors"] == listing["errors"]
    assert set(await _models(client)) == {"ext"}
    assert any("exploding-plugin" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_two_distributions_with_one_entry_point_name_is_reported(monkeypatch):
    dist = md.distribution("pluggy")  # any other installed distribution
    ep = md.EntryPoint("ollama", "imageworks_proxy.adapters.ollama.adapter", "imageworks_proxy")
    ep = ep._for(dist) if hasattr(ep, "_for") else ep
    _patch_entry_points(monkeypatch, ep)
    pm = make_plugin_manager()
    assert len(pm.failures) == 1 and pm.failures[0].name.startswith("ollama (")
    assert "already used by imageworks-proxy" in pm.failures[0].error


async def test_hook_register_backends_raising_is_reported_and_the_app_still_serves(
    make_config, registry_file, proxy_client
):
    registry_file([{"name": "ext", "backend": "openai", "backend_config": EXTERNAL}])
    client = await proxy_client(make_config(), plugins=(BrokenHookPlugin(),))
    listing = await _plugins(client)
    assert listing["errors"] == [
        {"name": "BrokenHookPlugin", "error": "RuntimeError: adapter registry exploded"}
    ]
    assert set(await _models(client)) == {"ext"}


def test_duplicate_adapter_names_stop_startup_naming_both_plugins(make_app, make_config, registry_file):
    registry_file([])
    with pytest.raises(PluginError) as info:
        make_app(make_config(), plugins=(ClashingPlugin(),))
    message = str(info.value)
    assert "'ollama'" in message and "plugin 'ollama'" in message and "plugin 'ClashingPlugin'" in message


def test_registering_something_that_is_not_an_adapter_is_an_error(make_app, make_config, registry_file):
    class NotAnAdapter:
        name = "nope"

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(NotAnAdapter)

    registry_file([])
    with pytest.raises(PluginError, match="not an Adapter subclass"):
        make_app(make_config(), plugins=(Plugin(),))


# -- register_backends: routing to third-party adapters ------------------------------------------------------


async def test_hook_register_backends_third_party_adapter_claims_a_new_backend(
    make_config, registry_file, proxy_client
):
    MyAdapter.events = []
    registry_file(
        [
            {"name": "mine", "backend": "mybackend", "backend_config": {"host": "127.0.0.1", "port": 9}},
            {"name": "mine-missing", "backend": "mybackend", "metadata": {"installed_here": False}},
            {"name": "other", "backend": "sglang", "backend_config": EXTERNAL},
        ]
    )
    client = await proxy_client(make_config(SUPPRESS_DECORATIONS="0"), plugins=(MyAdapterPlugin(),))
    assert MyAdapter.events == ["start"]
    models = await _models(client)
    assert set(models) == {"mine", "other"}  # the adapter's installed() hides mine-missing
    assert models["mine"]["extensions"]["adapter"] == "my-adapter"
    assert models["mine"]["extensions"]["status"] == "loaded"
    assert models["other"]["extensions"]["adapter"] == "openai-passthrough"  # unclaimed backend: fallback

    listing = await _plugins(client)
    mine = next(p for p in listing["data"] if p["name"] == "MyAdapterPlugin")
    assert mine["adapters"] == [
        {"name": "my-adapter", "backends": ["mybackend"], "description": "a third-party adapter"}
    ]
    assert mine["builtin"] is False
    await client.close()
    assert MyAdapter.events == ["start", "close"]


class ChatOnlyAdapter(Adapter):
    name = "chat-only"
    backends = ("chatonly",)

    async def chat(self, call):
        return {"choices": [{"message": {"content": "hi"}}]}


class ChatOnlyPlugin:
    @hookimpl
    def register_backends(self, register):
        register(ChatOnlyAdapter)


async def test_an_adapter_without_the_other_routes_answers_501_in_the_openai_shape(
    make_config, registry_file, proxy_client
):
    registry_file([{"name": "talker", "backend": "chatonly"}])
    client = await proxy_client(make_config(), plugins=(ChatOnlyPlugin(),))
    chat = {"model": "talker", "messages": [{"role": "user", "content": "x"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    for path, body in (("/v1/embeddings", {"input": "x"}), ("/v1/completions", {"prompt": "x"})):
        resp = await client.post(path, json={"model": "talker", **body})
        assert resp.status == 501
        error = (await resp.json())["error"]
        assert error["code"] == "not_implemented" and error["param"] == "model"
        assert "'talker' does not serve" in error["message"]


async def test_third_party_adapter_wins_over_the_builtin_for_a_backend(
    make_config, registry_file, proxy_client
):
    registry_file(
        [
            {"name": "o", "backend": "openai", "backend_config": EXTERNAL},
            {
                "name": "pinned",
                "backend": "openai",
                "backend_config": {**EXTERNAL, "adapter": "openai-passthrough"},
            },
        ]
    )
    client = await proxy_client(make_config(SUPPRESS_DECORATIONS="0"), plugins=(BetterOpenAIPlugin(),))
    models = await _models(client)
    assert models["o"]["extensions"]["adapter"] == "better-openai"
    assert models["pinned"]["extensions"]["adapter"] == "openai-passthrough"


@pytest.mark.parametrize(("single_port", "expected"), [("1", "vllm-orchestrated"), ("0", "vllm-external")])
async def test_builtin_vllm_routing(make_config, registry_file, proxy_client, single_port, expected):
    registry_file(
        [
            {"name": "local", "backend": "vllm", "backend_config": {"model_path": "org/model"}},
            {"name": "remote", "backend": "vllm", "backend_config": EXTERNAL},
            {"name": "ollama-one", "backend": "ollama", "served_model_id": "x:1b"},
        ]
    )
    client = await proxy_client(
        make_config(SUPPRESS_DECORATIONS="0", INCLUDE_NON_INSTALLED="1", VLLM_SINGLE_PORT=single_port)
    )
    models = await _models(client)
    assert models["local"]["extensions"]["adapter"] == expected
    assert models["remote"]["extensions"]["adapter"] == "vllm-external"
    assert models["ollama-one"]["extensions"]["adapter"] == "ollama"


# -- register_stages -----------------------------------------------------------------------------------------


class ShoutStage(Stage):
    name = "shout"
    order = 150


class StagePlugin:
    @hookimpl
    def register_stages(self, register):
        register(ShoutStage)


async def test_hook_register_stages_adds_a_stage_in_order(make_config, registry_file, proxy_client):
    registry_file([])
    client = await proxy_client(make_config(), plugins=(StagePlugin(),))
    listing = await _plugins(client)
    mine = next(p for p in listing["data"] if p["name"] == "StagePlugin")
    assert mine["stages"] == ["shout"]
    from imageworks_proxy import keys

    stages = keys.pipeline(client.app).stages
    assert "shout" in [s.name for s in stages]
    assert [s.order for s in stages] == sorted(s.order for s in stages)


class ChatBodyStage(Stage):
    """Written for chat bodies only: it would fail on any other route's body."""

    name = "needs-messages"
    order = 250
    seen: list[str] = []

    async def request(self, ctx):
        self.seen.append(ctx.body["messages"][-1]["content"])


class EveryRouteStage(Stage):
    name = "every-route"
    order = 250
    endpoints = frozenset({"chat/completions", "embeddings", "completions"})
    seen: list[str] = []

    async def request(self, ctx):
        self.seen.append(ctx.endpoint)


class RouteStagesPlugin:
    @hookimpl
    def register_stages(self, register):
        register(ChatBodyStage)
        register(EveryRouteStage)


async def test_a_stage_sees_only_the_routes_it_names(
    make_config, registry_file, proxy_client, aiohttp_server
):
    from imageworks_proxy.testing.fakes.openai import make_fake_openai

    server = await aiohttp_server(make_fake_openai())
    registry_file([{"name": "m", "backend": "openai", "served_model_id": "echo",
                    "backend_config": {"base_url": str(server.make_url("/v1"))}}])
    ChatBodyStage.seen, EveryRouteStage.seen = [], []
    client = await proxy_client(make_config(), plugins=(RouteStagesPlugin(),))
    assert (await client.post("/v1/embeddings", json={"model": "m", "input": "x"})).status == 200
    assert (await client.post("/v1/completions", json={"model": "m", "prompt": "x"})).status == 200
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    assert ChatBodyStage.seen == ["hello"]  # stages are chat-only unless they say otherwise
    assert EveryRouteStage.seen == ["embeddings", "completions", "chat/completions"]


def test_hook_register_stages_duplicate_names_stop_startup(make_app, make_config, registry_file):
    class Other:
        @hookimpl
        def register_stages(self, register):
            register(type("Shout2", (Stage,), {"name": "shout", "order": 160}))

    registry_file([])
    with pytest.raises(
        PluginError, match="stage 'shout' is registered by both plugin 'StagePlugin' and plugin 'Other'"
    ):
        make_app(make_config(), plugins=(StagePlugin(), Other()))


# -- startup -------------------------------------------------------------------------------------------------


class RoutePlugin:
    @hookimpl
    def startup(self, app):
        async def hello(request):
            return web.json_response({"hello": "plugin"})

        app.router.add_get("/v1/hello", hello)


class BrokenStartupPlugin:
    @hookimpl
    def startup(self, app):
        raise ValueError("cannot start")


async def test_hook_startup_can_add_routes(make_config, registry_file, proxy_client):
    registry_file([])
    client = await proxy_client(make_config(), plugins=(RoutePlugin(),))
    resp = await client.get("/v1/hello")
    assert resp.status == 200 and await resp.json() == {"hello": "plugin"}
    assert resp.headers["X-Request-Id"]  # the proxy's middlewares wrap plugin routes too


async def test_hook_startup_failure_is_reported_and_others_still_run(
    make_config, registry_file, proxy_client
):
    registry_file([])
    client = await proxy_client(make_config(), plugins=(BrokenStartupPlugin(), RoutePlugin()))
    listing = await _plugins(client)
    assert listing["errors"] == [{"name": "BrokenStartupPlugin", "error": "ValueError: cannot start"}]
    assert (await client.get("/v1/hello")).status == 200


# -- the command line ----------------------------------------------------------------------------------------


def test_list_plugins_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env["CHAT_PROXY_REGISTRY"] = str(ROOT / "examples" / "registry.json")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "imageworks-chat-proxy"), "--list-plugins"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    version = md.version("imageworks-proxy")
    for name, backend in [
        ("ollama", "ollama"),
        ("vllm-orchestrated", "vllm"),
        ("vllm-external", "vllm"),
        ("openai-passthrough", "openai/*"),  # "*": the fallback for backends nobody claims
    ]:
        assert re.search(rf"^{re.escape(name)}\s+imageworks-proxy {re.escape(version)}$", out, re.M), out
        assert f"adapters: {name} ({backend})" in out
    assert "FAILED" not in out


# -- guard: every hookspec is tested here and documented in docs/plugins.md --------------------------------


def test_every_hookspec_has_a_test_and_a_docs_entry():
    source = Path(__file__).read_text()
    doc = (ROOT / "docs" / "plugins.md").read_text()
    hooks_section = doc.split("\n## Hooks\n", 1)[1].split("\n## ", 1)[0]
    for spec in hookspecs.HOOKSPECS:
        name = spec.__name__
        assert re.search(rf"^(async )?def test_hook_{name}_", source, re.M), f"no test_hook_{name}_* test"
        params = ", ".join(inspect.signature(spec).parameters)
        assert f"`{name}({params})`" in hooks_section, f"docs/plugins.md's Hooks section lacks {name}"
        assert spec.__doc__ and spec.__doc__.strip(), f"{name} has no docstring"
    declared = {n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "imageworks_proxy_spec")}
    assert declared == {s.__name__ for s in hookspecs.HOOKSPECS}, "HOOKSPECS must list every hookspec"
