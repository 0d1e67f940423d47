"""Autostart of non-orchestrated backends: one start for concurrent requests, readiness within
the grace period, 504 with the command's log tail, failures with the command's own reason."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys

import pytest

from imageworks_proxy import keys
from imageworks_proxy.config import ConfigError, load_config
from imageworks_proxy.testing import free_port, sse_events, user
from imageworks_proxy.testing.fakes import vllm as fake_vllm
from imageworks_proxy.upstream import process
from imageworks_proxy.upstream.autostart import AUTOSTART, ensure_started
from tests.openai_schemas import validate_error
from tests.orch_helpers import orch_settings, started


def server_command(tmp_path, port: int, served: str) -> list[str]:
    return [
        sys.executable,
        str(fake_vllm.SCRIPT),
        "--model",
        "/x",
        "--served-model-name",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--fake-events",
        str(tmp_path / "events.jsonl"),
    ]


@pytest.fixture
def proxy(tmp_path, make_config, registry_file, proxy_client):
    async def start(entries, autostart: dict, **overrides):
        registry_file(entries)
        settings = orch_settings(
            free_port(),
            **{
                "AUTOSTART_ENABLED": "1",
                "AUTOSTART_MAP": json.dumps(autostart),
                "AUTOSTART_GRACE_PERIOD_S": "30",
                **overrides,
            },
        )
        return await proxy_client(make_config(**settings))

    return start


def openai_entry(name: str, port: int, served: str, backend: str = "openai") -> dict:
    return {
        "name": name,
        "backend": backend,
        "served_model_id": served,
        "backend_config": {"base_url": f"http://127.0.0.1:{port}/v1"},
    }


@pytest.mark.parametrize("backend", ["openai", "vllm"])  # openai-passthrough and vllm-external
async def test_an_unreachable_backend_is_started_once_for_concurrent_requests(proxy, tmp_path, backend):
    port = free_port()
    client = await proxy(
        [openai_entry("ext", port, "ext-model", backend)],
        {"ext": shlex.join(server_command(tmp_path, port, "ext-model"))},
    )
    bodies = [{"model": "ext", "messages": user("hi"), "stream": s} for s in (False, True, False)]
    responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
    assert [r.status for r in responses] == [200, 200, 200]
    assert (await responses[0].json())["choices"][0]["message"]["content"].startswith("served by ext-model")
    raw = await responses[1].read()
    assert raw.startswith(b": keep-alive\n\n")  # the stream was committed while the backend started
    assert sse_events(raw)[-1] == "[DONE]"
    assert len(started(tmp_path)) == 1
    # the proxy stops what it started when it shuts down
    pid = started(tmp_path)[0]["pid"]
    await client.close()
    assert not process.pid_alive(pid)


async def test_a_command_that_fails_reports_its_own_reason(proxy, tmp_path):
    port = free_port()
    client = await proxy(
        [openai_entry("ext", port, "m")],
        {"ext": "echo 'Error: llama-server: model file not found: /m.gguf' >&2; exit 3"},
    )
    resp = await client.post("/v1/chat/completions", json={"model": "ext", "messages": user("hi")})
    assert resp.status == 503
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "model_start_failed"
    assert (
        "model file not found: /m.gguf" in body["error"]["message"]
        and "exit code 3" in body["error"]["message"]
    )


async def test_a_backend_not_ready_within_the_grace_period_is_a_504_with_the_log_tail(proxy, tmp_path):
    port = free_port()
    client = await proxy(
        [openai_entry("ext", port, "m")],
        {
            "ext": [
                sys.executable,
                "-c",
                "import time; print('loading shards 1/8', flush=True); time.sleep(60)",
            ]
        },
        AUTOSTART_GRACE_PERIOD_S="0.5",
    )
    resp = await client.post("/v1/chat/completions", json={"model": "ext", "messages": user("hi")})
    assert resp.status == 504
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "model_start_timeout"
    assert "loading shards 1/8" in body["error"]["message"]
    pid = next(iter(client.app[AUTOSTART]._procs.values())).pid
    assert process.pid_alive(pid)
    await client.close()
    assert not process.pid_alive(pid)


async def test_nothing_to_start_means_a_plain_503(proxy, tmp_path):
    port = free_port()
    client = await proxy(
        [openai_entry("ext", port, "m"), openai_entry("other", port, "m")], {"other": "true"}
    )
    resp = await client.post("/v1/chat/completions", json={"model": "ext", "messages": user("hi")})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "backend_unavailable"


async def test_orchestrated_vllm_entries_and_a_disabled_switch_ignore_the_map(
    make_config, make_app, registry_file, tmp_path
):
    registry_file(
        [
            {"name": "v", "backend": "vllm", "backend_config": {"model_path": "/m"}},
            openai_entry("ext", free_port(), "m"),
        ]
    )

    class Call:
        queue_ms = 0.0

        async def waiting(self):
            raise AssertionError("nothing should wait")

    for enabled, name in (("1", "v"), ("0", "ext")):
        cfg = make_config(AUTOSTART_ENABLED=enabled, AUTOSTART_MAP=json.dumps({"v": "false", "ext": "false"}))
        app = make_app(cfg)
        from imageworks_proxy.upstream.autostart import Autostarter

        app[AUTOSTART] = Autostarter(app, cfg)
        assert await ensure_started(app, keys.models(app).resolve(name), Call()) is False


def test_an_invalid_map_is_a_startup_error_naming_the_variable():
    with pytest.raises(ConfigError) as exc:
        load_config({"CHAT_PROXY_AUTOSTART_MAP": "{not json"})
    assert "CHAT_PROXY_AUTOSTART_MAP" in str(exc.value)
    with pytest.raises(ConfigError):
        load_config({"CHAT_PROXY_AUTOSTART_MAP": '{"m": 42}'})
    cfg = load_config(
        {"CHAT_PROXY_AUTOSTART_MAP": '{"a": "serve a", "b": ["serve", "b"], "c": {"command": ["c"]}}'}
    )
    assert cfg.autostart_map == {"a": "serve a", "b": ("serve", "b"), "c": ("c",)}


async def test_an_unreachable_ollama_is_autostarted_and_the_request_retried(proxy, tmp_path):
    port = free_port()
    entry = {"name": "llama", "backend": "ollama", "served_model_id": "llama3.2:latest",
             "backend_config": {"host": "127.0.0.1", "port": port}}
    fake = [sys.executable, "-m", "imageworks_proxy.testing.fakes.ollama", str(port)]
    client = await proxy([entry], {"llama": fake}, GPU_EXCLUSIVE="0")
    resp = await client.post("/v1/chat/completions", json={"model": "llama", "messages": user("hi")})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    again = await client.post("/v1/chat/completions", json={"model": "llama", "messages": user("hi")})
    assert again.status == 200
