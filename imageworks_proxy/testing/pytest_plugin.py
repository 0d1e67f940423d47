"""pytest fixtures for testing the proxy and its adapters: configs built in code, apps built with an
explicit plugin manager (no entry-point scan), test clients, and the conformance suite's proxy.

Enable it in the top-level ``conftest.py`` of the tests::

    pytest_plugins = ["imageworks_proxy.testing.pytest_plugin"]

It needs pytest-aiohttp (``aiohttp_client``, ``aiohttp_server``) and ``asyncio_mode = "auto"``; the
``openai_sdk`` and ``conformance`` fixtures need the ``openai`` package.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imageworks_proxy import create_app
from imageworks_proxy.config import Config, load_config
from imageworks_proxy.plugins import make_plugin_manager
from imageworks_proxy.testing.conformance import Conformance, ConformanceBackend

if TYPE_CHECKING:
    import openai


@pytest.fixture
def registry_file(tmp_path: Path) -> Callable[[list[dict[str, Any]]], Path]:
    """``registry_file(entries)``: write registry entries (JSON objects) to the file ``make_config`` points
    ``CHAT_PROXY_REGISTRY`` at, and return its path. Call it again to replace them."""
    target = tmp_path / "registry.json"

    def write(entries: list[dict[str, Any]]) -> Path:
        target.write_text(json.dumps(entries))
        return target

    return write


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """``make_config(**overrides)``: a Config from ``CHAT_PROXY_*`` settings named without the prefix, in
    any case (``vllm_port="24001"``); values that are not strings are JSON-encoded.

    The registry, logs and state live under the test's temp dir, and the registry is polled every 0.1 s;
    nothing is read from the real environment.
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
def make_app() -> Callable[..., web.Application]:
    """``make_app(config, plugins=())``: ``create_app`` with a plugin manager holding the built-in plugins
    and ``plugins`` (modules or objects with hook implementations), without scanning entry points, so the
    result does not depend on which distributions happen to be installed."""

    def build(config: Config, plugins: tuple[Any, ...] = ()) -> web.Application:
        pm = make_plugin_manager(load_entrypoints=False, plugins=plugins)
        return create_app(config, plugin_manager=pm)

    return build


@pytest.fixture
def proxy_client(aiohttp_client, make_app) -> Callable[..., Awaitable[TestClient]]:
    """``await proxy_client(config, plugins=())``: start ``make_app(config, plugins)`` on loopback and return
    its aiohttp test client (closed, and the app shut down, after the test)."""

    async def start(config: Config, plugins: tuple[Any, ...] = ()) -> TestClient:
        return await aiohttp_client(make_app(config, plugins))

    return start


@pytest.fixture
async def openai_sdk() -> AsyncIterator[Callable[[TestClient], openai.AsyncOpenAI]]:
    """``openai_sdk(client)``: an ``openai.AsyncOpenAI`` pointed at a started proxy's ``/v1``, without
    retries (closed after the test)."""
    import openai

    made: list[openai.AsyncOpenAI] = []

    def make(client: TestClient) -> openai.AsyncOpenAI:
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        made.append(api)
        return api

    yield make
    for api in made:
        await api.close()


@pytest.fixture
def conformance_backend() -> ConformanceBackend:
    """Stands in until a conformance test class defines its own ``conformance_backend``."""
    pytest.fail(
        "an AdapterConformance subclass must define a `conformance_backend` fixture that starts the "
        "adapter's fake upstream and returns a ConformanceBackend",
        pytrace=False,
    )


@pytest.fixture
async def conformance(
    conformance_backend: ConformanceBackend, registry_file, make_config, proxy_client, openai_sdk
) -> Conformance:
    """The proxy started for the ``conformance_backend`` the test class defines: its entries in the
    registry, its settings in the config, its plugins registered."""
    backend = conformance_backend
    registry_file(backend.entries)
    client = await proxy_client(make_config(**backend.settings), backend.plugins)
    return Conformance(backend, client, openai_sdk(client))
