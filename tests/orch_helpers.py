"""Helpers for the orchestrator tests: configs that launch the fake vLLM, registry entries, event logs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from imageworks_proxy.testing.fakes import vllm as fake_vllm


class Call:
    """Stands in for ChatCall when a test takes a GPU lease itself: records that it was told to wait."""

    def __init__(self) -> None:
        self.queue_ms = 0.0
        self.waited = False

    async def waiting(self) -> None:
        self.waited = True


def orch_settings(port: int, **overrides: Any) -> dict[str, str]:
    """make_config overrides for orchestration with the fake vLLM and small timeouts."""
    base = {
        "VLLM_COMMAND": fake_vllm.command(),
        "VLLM_PORT": str(port),
        "VLLM_START_TIMEOUT_S": "30",
        "VLLM_STOP_TIMEOUT_S": "2",
        "VLLM_HEALTH_TIMEOUT_S": "1",
        "VLLM_FAILURE_BACKOFF_S": "30",
        "INCLUDE_NON_INSTALLED": "1",
        "REQUIRE_TEMPLATE": "0",
        "GPU_EXCLUSIVE": "0",
    }
    base.update({k.upper(): str(v) for k, v in overrides.items()})
    return base


def vllm_entry(name: str, tmp: Path, *extra: str, **fields: Any) -> dict[str, Any]:
    """An orchestrated vLLM entry whose fake records events and takes the shared "GPU" lock."""
    args = ["--fake-events", str(tmp / "events.jsonl"), "--fake-lock", str(tmp / "gpu.lock"), *extra]
    entry = {
        "name": name,
        "backend": "vllm",
        "served_model_id": f"served-{name}",
        "backend_config": {"model_path": f"/models/{name}", "extra_args": args},
    }
    entry.update(fields)
    return entry


async def until(predicate, timeout=30.0):
    """Poll until ``predicate()`` holds (a condition the test needs, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


def pid_of(text: str) -> int:
    """The pid in the fake vLLM's answer (``... pid 1234``)."""
    return int(text.rsplit("pid ", 1)[1])


def events(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def started(tmp: Path, model: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events(tmp) if e["event"] == "start" and (model is None or e["model"] == model)]


def overlaps(tmp: Path) -> list[dict[str, Any]]:
    return [e for e in events(tmp) if e["event"] == "overlap"]


async def chat(app, model: str, *, stream: bool = False, **extra: Any) -> tuple[str, Any, list[bool]]:
    """One chat request through the orchestrated adapter, as the chat view makes it. Returns the answer
    text, the ChatCall (queue_ms) and whether ``waiting()`` was called."""
    from imageworks_proxy import keys
    from imageworks_proxy.adapters.base import ChatCall

    models = keys.models(app)
    entry = models.resolve(model)
    adapter = models.adapter_for(entry)
    waited: list[bool] = []

    async def waiting() -> None:
        waited.append(True)

    body = {
        "model": entry.upstream_model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }
    call = ChatCall(
        request_id="req_test",
        entry=entry,
        model=entry.upstream_model,
        body=body,
        stream=stream,
        waiting=waiting,
    )
    result = await adapter.chat(call)
    if not stream:
        return result["choices"][0]["message"]["content"], call, waited
    parts = []
    async for chunk in result:
        for choice in chunk.get("choices", []):
            parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts), call, waited
