"""What a chat client sends and reads: ``user()`` messages, the ``sse_events()`` of a streamed answer, and
requests shaped like real clients' requests.

:func:`openwebui_turn` is a chat turn started from OpenWebUI 0.12's browser UI: its default ("native")
function calling puts the built-in tools on every such turn, with no ``tool_choice``, whether or not the
user enabled anything (28 tools on a plain turn; :func:`openwebui_tools` has 8 of them, their specs exactly
as OpenWebUI 0.12.4 builds them). docs/clients.md describes what clients send.
"""

from __future__ import annotations

import json
from pathlib import Path
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


_TOOLS = Path(__file__).resolve().parent / "data" / "openwebui-0.12.4-builtin-tools.json"
#: OpenWebUI's tool names in :func:`openwebui_tools`, in order.
OPENWEBUI_TOOL_NAMES = (
    "get_current_timestamp",
    "calculate_timestamp",
    "ask_user",
    "list_knowledge_bases",
    "search_knowledge_bases",
    "query_knowledge_bases",
    "search_chats",
    "view_chat",
)


def openwebui_tools() -> list[dict[str, Any]]:
    """OpenWebUI 0.12.4's built-in tools as it sends them: ``{"type": "function", "function": spec}``."""
    specs = json.loads(_TOOLS.read_text())["tools"]
    return [{"type": "function", "function": spec} for spec in specs]


def openwebui_turn(model: str, text: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """The body of a chat turn from OpenWebUI's browser UI: a system message and the user's ``text``, the
    built-in tools without ``tool_choice``, streamed unless ``stream=False``; ``extra`` adds fields (the
    advanced parameters OpenWebUI sends top-level, such as ``reasoning_effort``).

    It also carries the browser's ``session_id`` and ``chat_id`` top-level: OpenWebUI moves them into its
    own metadata before calling a model, but a body relayed as the browser sent it has them, and fields
    the proxy does not know must pass without harm.
    """
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": text},
        ],
        "stream": stream,
        "tools": openwebui_tools(),
        "session_id": "hQ3vX9yZ1kLmN0pQAAAB",
        "chat_id": "5d0c6a3e-8f1b-4c2a-9e7d-1f2a3b4c5d6e",
        **extra,
    }
