"""What a chat client sends and reads: ``user()`` messages and the ``sse_events()`` of a streamed answer."""

from __future__ import annotations

from typing import Any

import orjson


def sse_events(raw: bytes) -> list[Any]:
    """Parse an SSE body into decoded ``data:`` payloads (``"[DONE]"`` kept as a string); comments skipped."""
    events: list[Any] = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[6:]
                events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


def user(text: str) -> list[dict[str, Any]]:
    """``messages`` holding one user turn with ``text``."""
    return [{"role": "user", "content": text}]
