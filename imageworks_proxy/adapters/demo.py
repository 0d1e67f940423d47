"""Built-in adapter plugin: ``backend: "demo"`` entries answer with a fixed text, no model server needed.

It makes the quick start end in a reply on any machine: the example registry has one demo entry, so a
client, the proxy's pipeline and streaming can be checked before any real model is set up. The reply says
what it is and how to add real models; it repeats the start of the user's last message, so a client can
see its request arrived. Streamed word by word, with token usage counted in words.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from imageworks_proxy.adapters.base import Adapter, ChatCall, ChunkStream, Completion
from imageworks_proxy.hookspecs import hookimpl

#: The reply, before the echo of the user's message.
REPLY = (
    "Hello from imageworks-proxy! I am its built-in demo model: I give this same answer to every message, "
    "so you can check that your client, the proxy and streaming work without a GPU or a model server. "
    "To chat with real models, add entries for Ollama, vLLM or any OpenAI-compatible server to your "
    "registry (docs/registry.md) and point CHAT_PROXY_REGISTRY or --registry at it."
)
ECHO_CHARS = 80


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def demo_reply(messages: Any) -> str:
    """The demo model's answer to ``messages`` (the request's list; anything else counts as empty)."""
    said = ""
    for message in reversed(messages if isinstance(messages, list) else ()):
        if isinstance(message, dict) and message.get("role") == "user":
            said = " ".join(_text(message.get("content")).split())
            break
    if not said:
        return REPLY
    if len(said) > ECHO_CHARS:
        said = said[: ECHO_CHARS - 1].rstrip() + "…"
    return f'{REPLY} You wrote: "{said}"'


def _usage(messages: Any, reply: str) -> dict[str, int]:
    prompt = sum(
        len(_text(m.get("content")).split()) for m in (messages if isinstance(messages, list) else ())
        if isinstance(m, dict)
    )
    completion = len(reply.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class DemoAdapter(Adapter):
    name = "demo"
    backends = ("demo",)
    description = "A built-in demo model that answers without any model server (the quick start)"

    def model_status(self, entry) -> str | None:
        return "loaded"

    async def chat(self, call: ChatCall) -> Completion | ChunkStream:
        messages = call.body.get("messages")
        reply = demo_reply(messages)
        usage = _usage(messages, reply)
        if not call.stream:
            return {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                ],
                "usage": usage,
            }
        return self._chunks(reply, usage)

    async def _chunks(self, reply: str, usage: dict[str, int]) -> AsyncIterator[dict[str, Any]]:
        first = {"role": "assistant", "content": ""}
        yield {"choices": [{"index": 0, "delta": first, "finish_reason": None}]}
        words = reply.split(" ")
        for i, word in enumerate(words):
            text = word if i == len(words) - 1 else word + " "
            yield {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        # The pipeline passes this on only to clients that asked for stream_options.include_usage.
        yield {"choices": [], "usage": usage}


@hookimpl
def register_backends(register):
    register(DemoAdapter)
