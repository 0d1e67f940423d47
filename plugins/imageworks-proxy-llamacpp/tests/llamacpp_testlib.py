"""Helpers shared by the plugin's tests (not collected: the name does not start with ``test_``); the
generic ones (free ports, process checks) come from ``imageworks_proxy.testing``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imageworks_proxy import keys

FAKE_SERVER = Path(__file__).with_name("fake_llama_server.py")


def gguf_entry(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    """A registry entry served by this plugin."""
    entry: dict[str, Any] = {
        "name": name,
        "backend": "gguf",
        "backend_config": {"model_path": str(path), "extra_args": extra.pop("extra_args", [])},
        "served_model_id": extra.pop("served_model_id", name),
        "family": name,
    }
    entry.update(extra)
    return entry


def adapter_of(client) -> Any:
    return keys.models(client.server.app).adapters["llamacpp"]


def read_pid(pid_dir: Path, alias: str) -> int:
    return int((pid_dir / f"{alias}.pid").read_text())
