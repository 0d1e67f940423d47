"""Every example runs: the openai SDK script against a proxy in front of a fake model server, and the
minimal adapter plugin both registered in code and found through its entry point."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import openai
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PLUGIN_DIR = EXAMPLES / "minimal_adapter_plugin"

SEEN: web.AppKey[list[dict[str, Any]]] = web.AppKey("seen", list)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content or () if p.get("type") == "text")


async def _model_like_chat(request: web.Request) -> web.StreamResponse:
    """Answers like a small model would: calls the offered tool, uses its result, sees images."""
    body = await request.json()
    request.app[SEEN].append(body)
    last = body["messages"][-1]
    message: dict[str, Any] = {"role": "assistant", "content": None}
    finish = "stop"
    if last["role"] == "tool":
        message["content"] = f"It is {last['content']}."
    elif body.get("tools") and last["role"] == "user":
        message["tool_calls"] = [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": body["tools"][0]["function"]["name"], "arguments": "{}"},
            }
        ]
        finish = "tool_calls"
    elif any(isinstance(last.get("content"), list) and p.get("type") == "image_url" for p in last["content"]):
        message["content"] = "Red."
    else:
        message["content"] = f"echo: {_text(last)}"
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    base = {"id": "chatcmpl-x", "created": 1767225600, "model": body["model"]}
    if not body.get("stream"):
        return web.json_response(
            {
                **base,
                "object": "chat.completion",
                "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            }
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    words = message["content"].split(" ")
    for i, word in enumerate(words):
        delta = {"content": word + (" " if i < len(words) - 1 else "")}
        if i == 0:
            delta["role"] = "assistant"
        chunk = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    end = {
        **base,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    await resp.write(b"data: " + json.dumps(end).encode() + b"\n\n")
    await resp.write(
        b"data: "
        + json.dumps({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}).encode()
        + b"\n\n"
    )
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _run_example(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run an example script as a subprocess without blocking the event loop serving the proxy."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_openai_sdk_example_runs_all_four_steps_against_the_proxy(
    aiohttp_server, registry_file, make_config, proxy_client
):
    upstream_app = web.Application()
    upstream_app[SEEN] = []
    upstream_app.router.add_post("/v1/chat/completions", _model_like_chat)
    upstream = await aiohttp_server(upstream_app)
    registry_file(
        [
            {
                "name": "demo",
                "backend": "openai",
                "display_name": "demo-vl",
                "backend_config": {"base_url": str(upstream.make_url("/v1"))},
                "served_model_id": "demo-served",
                "capabilities": ["vision", "tools"],
            }
        ]
    )
    proxy = await proxy_client(make_config())

    # Base URL from the environment, model picked from /v1/models.
    code, out, err = await _run_example(
        str(EXAMPLES / "openai_sdk.py"), env={"IMAGEWORKS_PROXY_URL": str(proxy.make_url("/v1"))}
    )
    assert code == 0, err
    lines = out.splitlines()
    assert "model 'demo-vl', vision model 'demo-vl'" in lines[0]
    assert "[plain] echo: Say hello in five words." in lines
    assert "[stream] echo: Count from one to five." in lines
    assert "[stream] usage: 9 prompt + 4 completion tokens" in lines
    assert any(ln.startswith("[tools] model called get_time({}) -> ") for ln in lines)
    assert any(ln.startswith("[tools] It is 20") for ln in lines)  # the tool's ISO time came back
    assert "[image] Red." in lines

    seen = upstream_app[SEEN]
    assert {b["model"] for b in seen} == {"demo-served"}
    assert [m["role"] for m in seen[3]["messages"]] == ["user", "assistant", "tool"]
    image_part = seen[-1]["messages"][-1]["content"][1]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")

    # Base URL as an argument, one step, explicit model; an unknown model is a clean failure.
    code, out, _ = await _run_example(
        str(EXAMPLES / "openai_sdk.py"), str(proxy.make_url("/v1")), "--steps", "plain", "--model", "demo"
    )
    assert code == 0 and "[plain] echo: Say hello in five words." in out
    code, _, err = await _run_example(
        str(EXAMPLES / "openai_sdk.py"), str(proxy.make_url("/v1")), "--steps", "plain", "--model", "nope"
    )
    assert code == 1 and "model_not_found" in err


def _load_echo_plugin():
    spec = importlib.util.spec_from_file_location("echo_adapter", PLUGIN_DIR / "echo_adapter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_minimal_plugin_serves_its_backend_through_the_sdk(registry_file, make_config, proxy_client):
    registry_file([{"name": "parrot", "backend": "echo", "metadata": {"echo_prefix": "you said: "}}])
    proxy = await proxy_client(make_config(), plugins=(_load_echo_plugin(),))
    plugins = await (await proxy.get("/v1/plugins")).json()
    assert {
        "name": "echo",
        "backends": ["echo"],
        "description": "Answers with the last user message (example plugin)",
    } in [a for p in plugins["data"] for a in p["adapters"]]

    async with openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key="x", max_retries=0) as api:
        assert [m.id for m in (await api.models.list()).data] == ["parrot"]
        reply = await api.chat.completions.create(
            model="parrot", messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.choices[0].message.content == "you said: hello there"
        assert reply.model == "parrot" and reply.id  # filled in by the proxy
        stream = await api.chat.completions.create(
            model="parrot", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
        parts = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(parts).strip() == "you said: a b c"
    assert len(parts) == 5


def test_minimal_plugin_is_found_through_the_entry_point_its_pyproject_declares(tmp_path):
    """What ``pip install examples/minimal_adapter_plugin`` leaves behind, written by hand: a dist-info with
    the entry points of its pyproject.toml, next to the module."""
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    dist_info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    eps = project["entry-points"]["imageworks_proxy"]
    (dist_info / "entry_points.txt").write_text(
        "[imageworks_proxy]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
    )
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps([{"name": "parrot", "backend": "echo"}]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(PLUGIN_DIR)]), CHAT_PROXY_REGISTRY=str(registry)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "imageworks_proxy", "--list-plugins"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "echo                         imageworks-proxy-echo-example 0.1.0" in proc.stdout
    assert "adapters: echo (echo)" in proc.stdout
    assert "FAILED" not in proc.stdout
