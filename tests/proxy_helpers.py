"""Helpers for the tests that run the proxy in front of the fake OpenAI-compatible server: the proxy
itself (a fixture, registered for every test by ``tests/conftest.py``), the error a client sees, and the
request-log records a request left."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from imageworks_proxy import keys
from imageworks_proxy.testing.fakes.openai import make_fake_openai, registry_for
from tests.openai_schemas import validate_error


@pytest.fixture
def fake_openai_proxy(aiohttp_server, registry_file, make_config, proxy_client) -> Callable[..., Awaitable]:
    """``await fake_openai_proxy(vision=False, extra_entries=(), **settings)`` -> ``(client, fake)``: a
    fresh fake OpenAI-compatible server, the registry of its models (``m-<mode>``, served id ``<mode>``,
    see ``testing/fakes/openai.py``) plus ``extra_entries``, and the proxy started with ``settings``."""

    async def start(vision: bool = False, extra_entries: Iterable[dict[str, Any]] = (), **settings: Any):
        fake = make_fake_openai()
        server = await aiohttp_server(fake)
        registry_file(registry_for(str(server.make_url("/v1")), vision=vision) + list(extra_entries))
        client = await proxy_client(make_config(**settings))
        return client, fake

    return start


async def error_of(resp, status: int, code: str) -> dict[str, Any]:
    """The body of an error answer, after checking what every error answer has: the status, a JSON body in
    the OpenAI error shape with ``code``, and the request id of the ``X-Request-Id`` header."""
    assert resp.status == status, (await resp.text())[:300]
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
    return body


async def log_records(client) -> list[dict[str, Any]]:
    """The request-log records, once no request is in flight and the writer caught up ([] before the first
    record is written)."""
    app = client.app
    for _ in range(1000):
        if keys.metrics(app).in_flight == 0:
            break
        await asyncio.sleep(0.01)
    await keys.request_log(app).flush()
    path = Path(keys.config(app).log_path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
