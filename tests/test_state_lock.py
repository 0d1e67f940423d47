"""One proxy per vLLM state file: a second proxy started by mistake, on another port or on the same one,
exits at once with a message and never touches the running vLLM (a real fake-vLLM process here);
``imageworks-loader`` acts directly only when no proxy holds the file."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from imageworks_proxy.testing import pid_alive
from imageworks_proxy.upstream import process
from imageworks_proxy.vllm.lock import StateLock, StateLockHeld
from tests.orch_helpers import orch_settings, vllm_entry
from tests.process_helpers import PROXY, ServedProxy, clean_env, free_port

LOADER = str(Path(sys.executable).parent / "imageworks-loader")


@pytest.fixture
def running(tmp_path):
    """A proxy (a real process) that started the fake vLLM for model "alpha"; its settings, as the
    environment of another proxy started in the same folder would have them."""
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps([vllm_entry("alpha", tmp_path)]))
    vllm_port = free_port()
    settings = {"CHAT_PROXY_" + k: v for k, v in orch_settings(vllm_port).items()}
    settings["CHAT_PROXY_REGISTRY"] = str(registry)
    first = ServedProxy(tmp_path, **settings)
    first.get("/v1/health")
    try:
        reply = first.post(
            "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
        )
        pid = first.get("/v1/health")["vllm"]["pid"]
        assert reply["choices"][0]["message"]["content"] == f"served by served-alpha pid {pid}"
        yield first, settings, pid, vllm_port
    finally:
        if first.proc.poll() is None:
            first.stop()
        if pid_alive(pid):  # the test failed before the proxy could stop it
            asyncio.run(process.stop_group(pid, term_timeout=2))


def _vllm_serves(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _second_proxy(tmp_path: Path, port: int, settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROXY, "--port", str(port)], env=clean_env(**settings), cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )


def test_a_second_proxy_on_the_same_state_file_exits_and_leaves_the_running_vllm_alone(running, tmp_path):
    first, settings, pid, vllm_port = running
    state_before = (tmp_path / "_staging" / "active_vllm.json").read_text()

    other_port = _second_proxy(tmp_path, free_port(), settings)
    assert other_port.returncode == 2
    (line,) = other_port.stderr.strip().splitlines()
    assert "already uses the vLLM state file _staging/active_vllm.json" in line
    assert f"pid {first.proc.pid}" in line and first.url in line
    assert pid_alive(pid) and _vllm_serves(vllm_port)

    same_port = _second_proxy(tmp_path, first.port, settings)
    assert same_port.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in same_port.stderr
    assert pid_alive(pid) and _vllm_serves(vllm_port)

    assert (tmp_path / "_staging" / "active_vllm.json").read_text() == state_before
    reply = first.post(
        "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "again"}]}
    )
    assert reply["choices"][0]["message"]["content"] == f"served by served-alpha pid {pid}"
    assert first.get("/v1/health")["vllm"]["pid"] == pid


def test_the_loader_acts_directly_only_when_no_proxy_holds_the_state_file(running, tmp_path):
    first, settings, pid, _vllm_port = running
    # Configured for another port (nothing answers there): the lock file says where the proxy is.
    env = clean_env(**settings, CHAT_PROXY_PORT=str(free_port()))
    current = subprocess.run(
        [LOADER, "current-model"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert current.returncode == 0, current.stderr
    out = json.loads(current.stdout)
    assert out["logical_name"] == "alpha" and out["pid"] == pid and out["source"] == "proxy"

    direct = subprocess.run(
        [LOADER, "--direct", "activate-model", "--stop"], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )
    assert direct.returncode == 1
    assert "already uses the vLLM state file" in direct.stderr
    assert pid_alive(pid) and first.get("/v1/health")["vllm"]["state"] == "loaded"


def test_the_lock_is_free_again_once_the_proxy_has_stopped(tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps([{"name": "demo", "backend": "demo"}]))
    first = ServedProxy(tmp_path, "--registry", str(registry))
    first.get("/v1/health")
    with pytest.raises(StateLockHeld) as held:
        StateLock(str(tmp_path / "_staging" / "active_vllm.json")).acquire({"pid": os.getpid()})
    assert held.value.holder == {
        "pid": first.proc.pid, "program": "imageworks-chat-proxy", "url": first.url,
    }
    first.stop()
    second = ServedProxy(tmp_path, "--registry", str(registry))
    assert second.get("/v1/health")["status"] == "ok"
    second.stop()
