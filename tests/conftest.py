"""Shared fixtures: configs built in code, apps built with an explicit plugin manager (no entry-point scan)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imageworks_proxy import create_app
from imageworks_proxy.config import Config, load_config
from imageworks_proxy.plugins import make_plugin_manager


def write_registry(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def registry_file(tmp_path: Path) -> Callable[[list[dict[str, Any]]], Path]:
    """Write a registry JSON list to a temp file and return its path."""
    target = tmp_path / "registry.json"
    return lambda entries: write_registry(target, entries)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config from CHAT_PROXY_* style keyword overrides (names without the prefix).

    Logs and state go under the test's temp dir; nothing reads the real environment.
    """

    def build(**overrides: Any) -> Config:
        env = {
            "CHAT_PROXY_LOG_PATH": str(tmp_path / "logs" / "chat_proxy.jsonl"),
            "CHAT_PROXY_VLLM_STATE_PATH": str(tmp_path / "state" / "active_vllm.json"),
            "CHAT_PROXY_VLLM_LOG_DIR": str(tmp_path / "logs" / "vllm"),
            "CHAT_PROXY_REGISTRY": str(tmp_path / "registry.json"),
            "CHAT_PROXY_REGISTRY_POLL_S": "0.1",
        }
        for key, value in overrides.items():
            env["CHAT_PROXY_" + key.upper()] = value if isinstance(value, str) else json.dumps(value)
        return load_config(env)

    return build


@pytest.fixture
def make_app() -> Callable[..., Any]:
    """create_app with a plugin manager that skips entry-point scanning (built-ins registered directly)."""

    def build(config: Config, plugins: tuple[Any, ...] = ()) -> Any:
        pm = make_plugin_manager(load_entrypoints=False, plugins=plugins)
        return create_app(config, plugin_manager=pm)

    return build


@pytest.fixture
def proxy_client(aiohttp_client, make_app):
    """Start a proxy app on loopback for a config and return an aiohttp test client."""

    async def start(config: Config, plugins: tuple[Any, ...] = ()):
        return await aiohttp_client(make_app(config, plugins))

    return start
