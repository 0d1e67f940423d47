"""Fixtures for the llama.cpp plugin: a fake ``llama-server`` launched as a real subprocess, and proxy apps
built with this plugin registered explicitly (no entry-point scanning, so the tests do not depend on
which other plugins happen to be installed). Configs, apps, clients and the openai SDK come from the
proxy's testing kit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imageworks_proxy_llamacpp.adapter as llamacpp_plugin
import pytest
from llamacpp_testlib import FAKE_SERVER

from imageworks_proxy import keys
from imageworks_proxy.testing import free_port

pytest_plugins = ["imageworks_proxy.testing.pytest_plugin"]

#: make_config settings for every proxy these tests start: the model port is free, timeouts are short.
SETTINGS = {"vllm_start_timeout_s": "20", "vllm_stop_timeout_s": "5", "vllm_health_timeout_s": "1"}


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
    """Create a model file (its first line steers the fake: ``ok``, ``broken``, ``hang``, ``echo`` or
    ``tools``)."""

    def make(name: str, content: str = "ok", folder: str = "models") -> Path:
        path = tmp_path / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
        return path

    return make


@pytest.fixture
def proxy_settings() -> Callable[..., dict[str, str]]:
    """``proxy_settings(**overrides)``: make_config settings for a proxy with this plugin, on a free port."""
    return lambda **overrides: {**SETTINGS, "vllm_port": str(free_port()), **overrides}


@pytest.fixture
def make_proxy(registry_file, make_config, make_app, aiohttp_client, proxy_settings) -> Callable[..., Any]:
    """Start a proxy app (with this plugin) on loopback for registry ``entries``; returns the test client.

    Keyword arguments are CHAT_PROXY_* settings (lower-case, without the prefix); ``tenancy`` replaces
    the app's GPU tenancy."""

    async def start(entries: list[dict[str, Any]], *, tenancy: Any = None, **overrides: Any):
        registry_file(entries)
        app = make_app(make_config(**proxy_settings(**overrides)), plugins=(llamacpp_plugin,))
        if tenancy is not None:
            app[keys.TENANCY] = tenancy  # stands in for the proxy's GPU tenancy
        return await aiohttp_client(app)

    return start
