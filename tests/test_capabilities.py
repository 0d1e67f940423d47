"""Model capabilities: where they come from, how requests are shaped by them, and what is learned from an
upstream's refusal (catalogue/capabilities.py, pipeline/capabilities.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from imageworks_proxy import keys
from imageworks_proxy.catalogue.capabilities import (
    Capabilities,
    drop_empty_tools,
    drop_fields,
    from_registry,
    refused_capability,
    resolve,
)
from imageworks_proxy.catalogue.registry import load_registry, parse_entry
from imageworks_proxy.catalogue.vllm_parsers import REASONING_PARSERS, TOOL_CALL_PARSERS
from imageworks_proxy.testing import free_port, openwebui_turn, user
from imageworks_proxy.testing.fakes import vllm as fake_vllm
from imageworks_proxy.testing.fakes.ollama import FakeOllama
from tests.orch_helpers import orch_settings


def entry(**fields):
    return parse_entry({"name": "m", "backend": "ollama", **fields})


# -- sources -----------------------------------------------------------------------------------------


def test_the_registry_object_form_says_on_and_off_and_the_list_form_only_on():
    obj = from_registry(entry(capabilities={"vision": True, "tools": False, "function_calling": False}))
    assert obj.flags == {"vision": True, "tools": False}
    assert from_registry(entry(capabilities=["vision", "thinking"])).flags == {
        "vision": True,
        "reasoning": True,
    }
    assert from_registry(entry(capabilities="tools,vision")).flags == {"tools": True, "vision": True}


def test_ollama_capabilities_in_the_metadata_say_on_and_off_and_capabilities_win():
    meta = {"metadata": {"ollama_capabilities": ["completion", "vision", "thinking"]}}
    assert from_registry(entry(**meta)).flags == {
        "tools": False,
        "vision": True,
        "reasoning": True,
        "embedding": False,
    }
    assert from_registry(entry(capabilities=["tools"], **meta)).flags["tools"] is True


def test_a_failed_vision_probe_turns_vision_off():
    e = entry(capabilities=["vision"], probes={"vision": {"vision_ok": False}})
    assert from_registry(e).flags == {"vision": False}


def test_learned_refusals_win_over_the_registry_which_wins_over_the_adapter():
    adapter = Capabilities({"tools": True, "reasoning": True, "vision": True}, "Ollama /api/show")
    e = entry(capabilities={"reasoning": False})
    caps = resolve(e, adapter, {"tools": "does not support tools"})
    assert caps.known() == {"reasoning": False, "tools": False, "vision": True}
    assert caps.why("vision") == "Ollama /api/show" and caps.why("reasoning") == "the registry entry"
    assert caps.why("tools") == "the upstream refused it: does not support tools"
    assert caps.has("embedding") is None and caps.names() == ["vision"]


# -- refusals and request fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "capability"),
    [
        (
            400,
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
            "tools",
        ),
        (400, "registry.ollama.ai/library/llama3.2-vision:latest does not support tools", "tools"),
        (400, '"gemma3:4b" does not support thinking', "reasoning"),
        (
            400,
            '"qwen3" does not support thinking. Pull the model again to get the latest version',
            "reasoning",
        ),
        (400, "max_tokens is too large", None),
        (500, "registry.ollama.ai/library/x does not support tools", None),
        (400, 'tool_choice="required" requires --tool-call-parser to be set', None),
    ],
)
def test_the_refusals_of_vllm_and_ollama_are_recognised(status, message, capability):
    assert refused_capability(status, message) == capability


def test_dropping_tools_and_reasoning_removes_every_field_that_carries_them():
    body = {
        "messages": [],
        "tools": [{"type": "function"}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "functions": [{}],
        "function_call": "auto",
        "think": True,
        "reasoning_effort": "high",
        "chat_template_kwargs": {"enable_thinking": True},
        "temperature": 0.2,
    }
    assert drop_fields(body, "tools") == [
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
    ]
    assert drop_fields(body, "reasoning") == [
        "think",
        "reasoning_effort",
        "chat_template_kwargs.enable_thinking",
    ]
    assert body == {"messages": [], "temperature": 0.2}
    kept = {"chat_template_kwargs": {"enable_thinking": False, "custom": 1}}
    assert drop_fields(kept, "reasoning") == ["chat_template_kwargs.enable_thinking"]
    assert kept == {"chat_template_kwargs": {"custom": 1}}


def test_an_empty_tool_list_goes_with_the_fields_that_only_go_with_it():
    body = {"tools": [], "tool_choice": "auto", "parallel_tool_calls": False}
    assert drop_empty_tools(body) == ["tools", "tool_choice", "parallel_tool_calls"] and body == {}
    body = {"tools": [], "functions": [{"name": "f"}], "function_call": "auto"}
    assert drop_empty_tools(body) == ["tools"] and "function_call" in body


# -- registry fields for vLLM ----------------------------------------------------------------------------


def test_the_parser_names_are_the_ones_vllm_0_33_registers():
    names = fake_vllm.vllm_parsers()
    assert names["--tool-call-parser"] == TOOL_CALL_PARSERS
    assert names["--reasoning-parser"] == REASONING_PARSERS


def test_an_unknown_parser_name_warns_at_registry_load(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text(
        json.dumps(
            [
                {"name": "a", "backend": "vllm", "backend_config": {"tool_call_parser": "hermez"}},
                {
                    "name": "b",
                    "backend": "vllm",
                    "backend_config": {"reasoning_parser": "qwen3", "tool_call_parser": "hermes"},
                },
                {
                    "name": "c",
                    "backend": "vllm",
                    "backend_config": {
                        "tool_call_parser": "mine",
                        "extra_args": ["--tool-parser-plugin", "/p/mine.py"],
                    },
                },
                {"name": "d", "backend": "vllm", "backend_config": {"reasoning_parser": "qwen"}},
            ]
        )
    )
    warnings = load_registry(path).warnings
    assert warnings == (
        "entry 'a': backend_config.tool_call_parser: 'hermez' is not a tool-call parser vLLM 0.33 knows "
        "(did you mean 'hermes'?); vLLM will refuse to start",
        "entry 'd': backend_config.reasoning_parser: 'qwen' is not a reasoning parser vLLM 0.33 knows "
        "(did you mean 'qwen3'?); vLLM will refuse to start",
    )


# -- the fake vLLM refuses what vLLM 0.33 refuses ---------------------------------------------------------


def run_fake(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        str(fake_vllm.SCRIPT),
        *args,
        "--port",
        str(free_port()),
        "--fake-start-delay",
        "0",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_fake_vllm_exits_2_on_an_option_vllm_does_not_have():
    done = run_fake("serve", "/m", "--num-ctx", "4096")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "vllm serve: error: unrecognized arguments: --num-ctx"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--enable-auto-tool-choice"],
            "TypeError: Error: --enable-auto-tool-choice requires --tool-call-parser",
        ),
        (
            ["--enable-auto-tool-choice", "--tool-call-parser", "hermez"],
            "KeyError: 'invalid tool call parser: hermez",
        ),
        (["--reasoning-parser", "qwen"], "KeyError: 'invalid reasoning parser: qwen"),
    ],
)
def test_the_fake_vllm_refuses_to_start_with_tool_options_vllm_refuses(args, line):
    done = run_fake("serve", "/m", *args)
    assert done.returncode == 1 and done.stderr.splitlines()[-1].startswith(line)


async def test_the_fake_vllm_refuses_tools_without_a_parser_and_an_empty_tool_list():
    import aiohttp

    async with (
        fake_vllm.started("/m", "--served-model-name", "m", port=free_port()) as base,
        aiohttp.ClientSession() as http,
    ):

        async def post(**body):
            async with http.post(
                f"{base}/chat/completions", json={"model": "m", "messages": user("x"), **body}
            ) as r:
                return r.status, (await r.json())["error"]["message"] if r.status != 200 else None

        tools = openwebui_turn("m", "x")["tools"]
        assert await post(tools=tools) == (
            400,
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
        )
        assert await post(tools=tools, tool_choice="required") == (
            400,
            'tool_choice="required" requires --tool-call-parser to be set',
        )
        status, message = await post(tools=[])
        assert status == 400 and "`tools` must not be an empty array" in message
        assert await post(tools=tools, tool_choice="none") == (200, None)


# -- Ollama: /api/show when the tag list has no capabilities; refusals learned -----------------------------


@pytest.fixture
async def ollama_proxy(aiohttp_server, registry_file, make_config, proxy_client):
    async def start(fake: FakeOllama, settings=None, **fields):
        base = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
        registry_file(
            [
                {
                    "name": "vision",
                    "backend": "ollama",
                    **fields,
                    "backend_config": {"base_url": base, "model_path": "ollama:/llama3.2-vision"},
                },
            ]
        )
        return await proxy_client(make_config(**(settings or {})))

    return start


async def test_an_older_ollama_is_asked_with_api_show_once_per_tag(ollama_proxy, registry_file, tmp_path):
    fake = FakeOllama({"llama3.2-vision:latest": ("completion", "vision")}, list_capabilities=False)
    client = await ollama_proxy(fake, settings={"suppress_decorations": "0"})
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=openwebui_turn("vision", "hi", stream=False))
        assert resp.status == 200
    listing = await (await client.get("/v1/models")).json()
    ext = listing["data"][0]["extensions"]
    assert ext["capabilities"] == ["vision"] and ext["adapter"] == "ollama"  # decorations on
    assert fake.shows == ["llama3.2-vision:latest"]
    assert all("tools" not in chat for chat in fake.chats)
    # a registry change asks again, once
    entries = json.loads((tmp_path / "registry.json").read_text())
    registry_file([{**entries[0], "display_name": "Vision"}])
    assert await keys.models(client.app).store.reload_if_changed()
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=openwebui_turn("vision", "hi", stream=False))
        assert resp.status == 200
    assert fake.shows == ["llama3.2-vision:latest"] * 2


async def test_a_refusal_the_registry_did_not_foresee_is_retried_once_and_remembered(ollama_proxy, caplog):
    # the registry says tools and thinking; this Ollama's model has neither
    fake = FakeOllama({"llama3.2-vision:latest": ("completion", "vision")})
    client = await ollama_proxy(fake, capabilities=["vision", "tools", "reasoning"])
    with caplog.at_level(logging.WARNING, logger="imageworks_proxy.capabilities"):
        for stream in (False, True, False):
            body = openwebui_turn("vision", "hi", stream=stream, reasoning_effort="high")
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 200
            await resp.read()
    # the first turn: refused for thinking, then for tools, then answered; later turns go straight through
    sent = [("think" in c, "tools" in c) for c in fake.chats]
    assert sent == [(True, True), (False, True), (False, False), (False, False), (False, False)]
    learned = [r.getMessage() for r in caplog.records]
    assert len(learned) == 2 and "refused reasoning" in learned[0] and "refused tools" in learned[1]
    listing = await (await client.get("/v1/models")).json()
    assert listing["data"][0]["extensions"]["capabilities"] == ["vision"]


async def test_a_registry_change_forgets_what_was_learned(ollama_proxy, registry_file, tmp_path):
    fake = FakeOllama({"llama3.2-vision:latest": ("completion", "vision")})
    client = await ollama_proxy(fake, capabilities=["vision", "tools"])
    models = keys.models(client.app)
    resp = await client.post("/v1/chat/completions", json=openwebui_turn("vision", "hi", stream=False))
    assert resp.status == 200 and models.capabilities.learned("vision")
    entries = json.loads((tmp_path / "registry.json").read_text())
    entries[0]["capabilities"] = ["vision"]
    registry_file(entries)
    assert await models.store.reload_if_changed()
    assert models.capabilities.learned("vision") == {}


# -- orchestrated vLLM: a parser name vLLM refuses ---------------------------------------------------------


async def test_an_unknown_tool_parser_makes_the_start_fail_with_vllms_reason(
    registry_file, make_config, proxy_client, tmp_path
):
    registry_file(
        [
            {
                "name": "q",
                "backend": "vllm",
                "backend_config": {"model_path": "/m/q", "tool_call_parser": "hermez"},
            },
        ]
    )
    client = await proxy_client(make_config(**orch_settings(free_port())))
    resp = await client.post("/v1/chat/completions", json={"model": "q", "messages": user("hi")})
    error = (await resp.json())["error"]
    assert resp.status == 503 and error["code"] == "model_start_failed"
    assert "invalid tool call parser: hermez" in error["message"]


async def test_an_image_reaches_a_model_ollama_says_has_vision_though_the_registry_is_silent(ollama_proxy):
    """The image stages act on the effective capabilities: Ollama's own list makes the tag a vision model,
    so its image goes through instead of becoming a placeholder (or a 409 without alt text)."""
    fake = FakeOllama({"llama3.2-vision:latest": ("completion", "vision")})
    client = await ollama_proxy(fake)  # the registry entry lists no capabilities
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]
    resp = await client.post("/v1/chat/completions",
                             json={"model": "vision", "messages": [{"role": "user", "content": parts}]})
    assert resp.status == 200, await resp.text()
    assert fake.chats[-1]["messages"][-1]["images"] == [png]


async def test_a_listing_asks_an_older_ollama_about_all_its_tags_at_once(
    aiohttp_server, registry_file, make_config, proxy_client
):
    tags = {f"model{i}:latest": ("completion", "tools") if i % 2 else ("completion",) for i in range(6)}
    fake = FakeOllama(tags, list_capabilities=False)
    fake.show_delay_s = 0.2
    base = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    registry_file(
        [
            {"name": f"m{i}", "backend": "ollama",
             "backend_config": {"base_url": base, "model_path": f"ollama:/model{i}"}}
            for i in range(6)
        ]
    )
    client = await proxy_client(make_config(suppress_decorations="0"))
    listing = await (await client.get("/v1/models")).json()
    caps = {m["id"]: m["extensions"]["capabilities"] for m in listing["data"]}
    assert caps == {f"m{i}": ["tools"] if i % 2 else [] for i in range(6)}
    assert sorted(fake.shows) == sorted(tags) and fake.most_shows_at_once == 6
