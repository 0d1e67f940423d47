"""Fixtures for the llama.cpp plugin: a fake ``llama-server`` launched as a real subprocess, and proxy apps
built with this plugin registered explicitly (no entry-point scanning, so the tests do not depend on
which other plugins happen to be installed)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imageworks_proxy_llamacpp.adapter as llamacpp_plugin
import pytest
from llamacpp_testlib import FAKE_SERVER, free_port

from imageworks_proxy import create_app, keys
from imageworks_proxy.config import load_config
from imageworks_proxy.plugins import make_plugin_manager


@pytest.fixture
def pid_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pids"
    d.mkdir()
    return d


@pytest.fixture
def fake_llama(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pid_dir: Path) -> Path:
    """Point the plugin at the fake llama-server; returns the folder its logs go to."""
    logs = tmp_path / "llamacpp-logs"
    monkeypatch.setenv("IMAGEWORKS_LLAMACPP_COMMAND", f"{sys.executable} {FAKE_SERVER}")
    monkeypatch.setenv("IMAGEWORKS_LLAMACPP_LOG_DIR", str(logs))
    monkeypatch.setenv("FAKE_LLAMA_PIDDIR", str(pid_dir))
    return logs


@pytest.fixture
def gguf(tmp_path: Path) -> Callable[..., Path]:
    """Create a model file (its first line steers the fake: ``ok``, ``broken`` or ``hang``)."""

    def make(name: str, content: str = "ok", folder: str = "models") -> Path:
        path = tmp_path / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
        return path

    return make


@pytest.fixture
def make_proxy(aiohttp_client, tmp_path: Path) -> Callable[..., Any]:
    """Start a proxy app (with this plugin) on loopback for registry ``entries``; returns the test client.

    Keyword arguments are CHAT_PROXY_* settings (lower-case, without the prefix); ``tenancy`` replaces
    the app's GPU tenancy."""

    async def start(entries: list[dict[str, Any]], *, tenancy: Any = None, **overrides: Any):
        registry = tmp_path / "registry.json"
        registry.write_text(json.dumps(entries))
        env = {
            "CHAT_PROXY_REGISTRY": str(registry),
            "CHAT_PROXY_LOG_PATH": str(tmp_path / "logs" / "chat_proxy.jsonl"),
            "CHAT_PROXY_VLLM_STATE_PATH": str(tmp_path / "state" / "active_vllm.json"),
            "CHAT_PROXY_VLLM_LOG_DIR": str(tmp_path / "logs" / "vllm"),
            "CHAT_PROXY_VLLM_PORT": str(free_port()),
            "CHAT_PROXY_VLLM_START_TIMEOUT_S": "20",
            "CHAT_PROXY_VLLM_STOP_TIMEOUT_S": "5",
            "CHAT_PROXY_VLLM_HEALTH_TIMEOUT_S": "1",
        }
        env.update({"CHAT_PROXY_" + k.upper(): str(v) for k, v in overrides.items()})
        pm = make_plugin_manager(load_entrypoints=False, plugins=(llamacpp_plugin,))
        app = create_app(load_config(env), plugin_manager=pm)
        if tenancy is not None:
            app[keys.TENANCY] = tenancy  # stands in for the proxy's GPU tenancy
        return await aiohttp_client(app)

    return start


@pytest.fixture
async def sdk():
    """``sdk(client)``: an openai.AsyncOpenAI pointed at a started proxy (closed after the test)."""
    import openai

    made: list[openai.AsyncOpenAI] = []

    def make(client) -> openai.AsyncOpenAI:
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        made.append(api)
        return api

    yield make
    for api in made:
        await api.close()
