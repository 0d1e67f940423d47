"""The fake vLLM's sleep API refuses what vLLM refuses, and its GPU lock makes two awake engines loud."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from pathlib import Path

import aiohttp
import pytest

from imageworks_proxy.testing import free_port
from imageworks_proxy.testing.fakes import vllm as fake_vllm
from imageworks_proxy.upstream import process


@pytest.fixture
async def fakes(tmp_path):
    """Start a fake vLLM (``sleep_mode``: the flag; ``dev_mode``: VLLM_SERVER_DEV_MODE=1) sharing one GPU
    lock; returns its base URL. Every fake is stopped afterwards."""
    pids: list[int] = []

    async def start(name: str, *, sleep_mode: bool = True, dev_mode: bool = True) -> str:
        port = free_port()
        argv = [*shlex.split(fake_vllm.command()), "--model", f"/m/{name}", "--served-model-name", name,
                "--host", "127.0.0.1", "--port", str(port), "--fake-start-delay", "0",
                "--fake-lock", str(tmp_path / "gpu.lock"), "--fake-events", str(tmp_path / "events.jsonl")]
        if sleep_mode:
            argv.append("--enable-sleep-mode")
        env = {k: v for k, v in os.environ.items() if k != "VLLM_SERVER_DEV_MODE"}
        if dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        pids.append(process.spawn(argv, str(tmp_path / f"{name}.log"), env))
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                try:
                    async with session.get(url + "/health") as resp:
                        if resp.status == 200:
                            return url
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"fake {name} never became healthy")

    yield start
    await asyncio.gather(*(process.stop_group(pid, term_timeout=2) for pid in pids))


def events(tmp: Path, name: str) -> list[dict]:
    path = tmp / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == name]


async def call(method: str, url: str, **kwargs) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as resp:
        body = await resp.read()
        try:
            return resp.status, json.loads(body) if body else None
        except ValueError:
            return resp.status, body.decode()


@pytest.mark.parametrize(("sleep_mode", "dev_mode"), [(False, True), (True, False)])
async def test_the_sleep_api_exists_only_with_the_flag_and_dev_mode(fakes, sleep_mode, dev_mode):
    url = await fakes("alpha", sleep_mode=sleep_mode, dev_mode=dev_mode)
    for method, path in (("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
        assert (await call(method, url + path))[0] == 404


async def test_a_sleeping_engine_gives_the_gpu_back_and_a_wake_into_a_held_gpu_fails_loudly(fakes, tmp_path):
    alpha = await fakes("alpha")
    assert await call("GET", alpha + "/is_sleeping") == (200, {"is_sleeping": False})
    assert (await call("POST", alpha + "/sleep?level=3"))[0] == 400
    assert (await call("POST", alpha + "/sleep?level=1"))[0] == 200
    assert await call("GET", alpha + "/is_sleeping") == (200, {"is_sleeping": True})
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    status, body = await call("POST", alpha + "/v1/chat/completions", json=chat)
    assert status == 503 and "sleeping" in body["error"]["message"]
    assert len(events(tmp_path, "asleep_request")) == 1

    beta = await fakes("beta")  # starts at once: alpha's sleep released the GPU lock
    assert events(tmp_path, "overlap") == []
    status, body = await call("POST", alpha + "/wake_up")
    assert status == 500 and "CUDA out of memory" in body["error"]["message"]
    assert len(events(tmp_path, "overlap")) == 1
    assert (await call("POST", beta + "/sleep?level=1"))[0] == 200
    assert (await call("POST", alpha + "/wake_up"))[0] == 200
    status, body = await call("POST", alpha + "/v1/chat/completions", json=chat)
    assert status == 200 and body["choices"][0]["message"]["content"].startswith("served by alpha")


async def test_after_level_2_answers_are_garbage_until_the_weights_are_reloaded(fakes):
    alpha = await fakes("alpha")
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    for step in ("/sleep?level=2", "/wake_up"):
        assert (await call("POST", alpha + step))[0] == 200
    _, body = await call("POST", alpha + "/v1/chat/completions", json=chat)
    assert body["choices"][0]["message"]["content"].startswith("garbage")
    assert await call("POST", alpha + "/collective_rpc", json={"method": "reload_weights"}) == (
        200, {"results": [None]}
    )
    assert (await call("POST", alpha + "/reset_prefix_cache"))[0] == 200
    _, body = await call("POST", alpha + "/v1/chat/completions", json=chat)
    assert body["choices"][0]["message"]["content"].startswith("served by alpha")
