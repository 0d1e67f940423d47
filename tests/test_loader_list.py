"""``imageworks-loader list``: the registry's models with id, logical name, backend, installed."""

from __future__ import annotations

import json
import os
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
        {"id": "gpt-oss-20b", "logical_name": "a-missing", "backend": "vllm", "installed": False},
        {"id": "qwen2.5-7b-instruct (AWQ)", "logical_name": "b-vllm", "backend": "vllm", "installed": True},
    ]


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
