"""A scripted upstream for tests of broken backends: it answers ``/v1/chat/completions`` (OpenAI-compatible)
and ``/api/chat`` (Ollama) with exactly the bytes a test gives, paced as it says, so truncated streams,
comment-only streams, endless lines, huge bodies and wrongly typed JSON can be served on purpose."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from imageworks_proxy.testing.fakes.ollama import ollama_entry

#: A script step: bytes are written, a number sleeps that many seconds.
Step = bytes | float


class ScriptedUpstream:
    """``scripts[name] = (status, content_type, steps)``; the request's ``model`` picks the script."""

    def __init__(self) -> None:
        self.scripts: dict[str, tuple[int, str, list[Step]]] = {}
        #: Scripts whose response was cut off by the proxy closing the connection.
        self.cancelled: list[str] = []

    def sse(self, name: str, *events: Any, status: int = 200) -> None:
        """A stream of ``data:`` events (dicts are JSON-encoded; bytes and pauses go as they are)."""
        steps: list[Step] = []
        for event in events:
            if isinstance(event, dict):
                steps.append(b"data: " + json.dumps(event).encode() + b"\n\n")
            else:
                steps.append(event)
        self.scripts[name] = (status, "text/event-stream", steps)

    def json(self, name: str, body: Any, status: int = 200) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.scripts[name] = (status, "application/json", [raw])

    def ndjson(self, name: str, *lines: Any) -> None:
        steps: list[Step] = [
            line if isinstance(line, (bytes, int, float)) else json.dumps(line).encode() + b"\n"
            for line in lines
        ]
        self.scripts[name] = (200, "application/x-ndjson", steps)

    def raw(self, name: str, status: int, content_type: str, *steps: Step) -> None:
        self.scripts[name] = (status, content_type, list(steps))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = str(body.get("model")).removesuffix(":latest")
        status, content_type, steps = self.scripts[name]
        resp = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        await resp.prepare(request)
        try:
            for step in steps:
                if isinstance(step, bytes):
                    await resp.write(step)
                else:
                    await asyncio.sleep(step)
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled.append(name)
            raise
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/api/chat", self.handle)
        return app


def entries(base: str, names: list[str]) -> list[dict[str, Any]]:
    """For each script name: ``o-<name>`` served by the passthrough adapter, ``l-<name>`` by Ollama."""
    out: list[dict[str, Any]] = []
    for name in names:
        out.append(
            {
                "name": f"o-{name}",
                "backend": "openai",
                "served_model_id": name,
                "backend_config": {"base_url": base + "/v1"},
            }
        )
        out.append(ollama_entry(base, name=f"l-{name}", display_name=f"l-{name}", tag=name))
    return out


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """An OpenAI stream chunk with one choice."""
    return {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": "s",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
        **extra,
    }


def ollama_line(content: str = "", done: bool = False, **extra: Any) -> dict[str, Any]:
    """An Ollama ``/api/chat`` stream line."""
    line: dict[str, Any] = {
        "model": "s",
        "created_at": "2026-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": content},
        "done": done,
    }
    if done:
        line.update(done_reason="stop", prompt_eval_count=3, eval_count=2)
    line.update(extra)
    return line
