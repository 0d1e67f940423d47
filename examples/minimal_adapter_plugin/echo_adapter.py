"""A complete imageworks-proxy adapter plugin in one file: registry entries with ``backend: "echo"`` are
answered with the last user message (the ``metadata.echo_prefix`` of the entry in front of it).

Install it with ``pip install -e examples/minimal_adapter_plugin``; ``imageworks-chat-proxy --list-plugins``
then shows ``echo``. Replace ``chat`` with a call to your backend and you have a real adapter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from imageworks_proxy import Adapter, ChatCall, hookimpl


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(p.get("text", "") for p in content or () if p.get("type") == "text")
    return ""


class EchoAdapter(Adapter):
    name = "echo"  # what backend_config.adapter can name; must be unique among installed adapters
    backends = ("echo",)  # registry "backend" values this adapter serves
    description = "Answers with the last user message (example plugin)"

    async def chat(self, call: ChatCall) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        # call.body is the OpenAI request after the proxy's stages ran; call.entry is the registry entry.
        reply = str(call.entry.metadata.get("echo_prefix", "echo: ")) + last_user_text(call.body["messages"])
        if not call.stream:
            # Only the essentials: the proxy fills in id, created, model and the other required fields.
            words = len(reply.split())
            return {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": words, "total_tokens": words},
            }
        return self._chunks(reply)

    async def _chunks(self, reply: str) -> AsyncIterator[dict[str, Any]]:
        # Release locks, leases or connections in a ``finally`` here: the proxy always closes the iterator.
        yield {
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        }
        for word in reply.split(" "):
            yield {"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


@hookimpl
def register_backends(register):
    register(EchoAdapter)
