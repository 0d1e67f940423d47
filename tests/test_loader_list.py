"""``imageworks-loader list``: the registry's models with id, logical name, backend, installed, status and
whether ``/v1/models`` lists them (the proxy's own rules, from the proxy's own objects)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

LOADER = str(Path(sys.executable).parent / "imageworks-loader")


def _run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    full.update(env)
    return subprocess.run([LOADER, *args], env=full, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_list_prints_every_registry_model(tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    registry = tmp_path / "r.json"
    registry.write_text(
        json.dumps(
            [
                {
                    "name": "b-vllm",
                    "backend": "vllm",
                    "family": "Qwen2.5-7B-Instruct-AWQ",
                    "quantization": "awq",
                    "download_path": str(weights),
                },
                {
                    "name": "a-missing",
                    "backend": "vllm",
                    "family": "gpt-oss-20b",
                    "download_path": str(tmp_path / "nope"),
                },
            ]
        )
    )
    result = _run("list", cwd=tmp_path, CHAT_PROXY_REGISTRY=str(registry))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {
            "id": "gpt-oss-20b",
            "logical_name": "a-missing",
            "backend": "vllm",
            "installed": False,
            "status": "stopped",
            "listed": False,
            "hidden_because": f"not installed: {tmp_path / 'nope'} not found",
        },
        {
            "id": "qwen2.5-7b-instruct (AWQ)",
            "logical_name": "b-vllm",
            "backend": "vllm",
            "installed": True,
            "status": "stopped",
            "listed": True,
            "hidden_because": None,
        },
    ]


def test_list_follows_the_proxys_rules_for_ollama_entries_while_ollama_is_down(tmp_path):
    registry = tmp_path / "r.json"
    registry.write_text(
        json.dumps(
            [
                # as ImageWorks' importer writes them: the download_path is no file
                {
                    "name": "llama3.2-3b",
                    "backend": "ollama",
                    "backend_config": {"model_path": "ollama:/llama3.2:3b"},
                    "download_path": "ollama:/llama3.2:3b",
                },
                {"name": "demo", "backend": "demo", "metadata": {"testing": True}},
            ]
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    result = _run(
        "list", cwd=tmp_path, CHAT_PROXY_REGISTRY=str(registry),
        CHAT_PROXY_OLLAMA_BASE_URL=f"http://127.0.0.1:{closed}",
    )
    assert result.returncode == 0, result.stderr
    rows = {r["logical_name"]: r for r in json.loads(result.stdout)}
    assert rows["llama3.2-3b"]["installed"] is True and rows["llama3.2-3b"]["listed"] is True
    assert rows["llama3.2-3b"]["status"] == "unavailable"
    assert rows["demo"]["listed"] is False and rows["demo"]["hidden_because"].startswith("test model")


def test_list_with_a_broken_registry_fails_with_one_line(tmp_path):
    registry = tmp_path / "r.json"
    registry.write_text("[")
    result = _run("list", cwd=tmp_path, CHAT_PROXY_REGISTRY=str(registry))
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "invalid JSON" in result.stderr


def test_usage_and_configuration_errors_exit_2(tmp_path):
    assert _run(cwd=tmp_path).returncode == 2
    bad = _run("list", cwd=tmp_path, CHAT_PROXY_PORT="x")
    assert bad.returncode == 2 and "CHAT_PROXY_PORT" in bad.stderr
