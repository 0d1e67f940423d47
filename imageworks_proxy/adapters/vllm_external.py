"""Built-in adapter plugin: a vLLM server the proxy does not start (``backend: vllm`` with a ``base_url``,
or any ``vllm`` entry when single-port orchestration is off)."""

from __future__ import annotations

import contextlib
from typing import Any

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import ChatCall, ChunkStream, Completion
from imageworks_proxy.adapters.openai_passthrough import OpenAIPassthroughAdapter
from imageworks_proxy.adapters.vllm_served import ServedNames
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.upstream.urls import apply_loopback_alias, entry_base_url


class VllmExternalAdapter(OpenAIPassthroughAdapter):
    """Passthrough plus vLLM's specifics: its error shapes (normalised by the shared error mapping) and its
    ``reasoning`` field, which is mirrored as ``reasoning_content`` so every client finds it."""

    name = "vllm-external"
    backends = ("vllm",)
    description = "A vLLM server started elsewhere (OpenAI API plus vLLM's quirks)"

    def __init__(self, app, config) -> None:
        super().__init__(app, config)
        self.served_names = ServedNames(lambda: self.http)

    def accepts(self, entry: Entry) -> bool:
        return not (self.config.vllm_single_port and not entry.backend_config.base_url)

    async def start(self) -> None:
        await super().start()
        keys.models(self.app).store.on_change.append(self.served_names.forget)

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            keys.models(self.app).store.on_change.remove(self.served_names.forget)
        await super().close()

    async def chat(self, call: ChatCall) -> Completion | ChunkStream:
        """An entry without ``served_model_id`` gets the name the server really serves
        (:mod:`~imageworks_proxy.adapters.vllm_served`)."""
        base = self.base_url(call.entry)
        if not call.entry.served_model_id:
            call.body["model"] = await self.served_names.name_for(call.entry, base, self.headers(call.entry))
        return await self.forward(call, base)

    def base_url(self, entry: Entry) -> str:
        url = entry_base_url(entry, default_port=8000, default_url="http://127.0.0.1:8000/v1", path="/v1")
        return apply_loopback_alias(url or "http://127.0.0.1:8000/v1", self.config.loopback_alias)

    async def forward(self, call, base_url, headers=None):
        """vLLM reports token usage in streams only when asked: always ask, so the request log and metrics
        get real counts; the usage chunk reaches the client only when it asked for it too."""
        if call.stream:
            opts = call.body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage")):
                call.body["stream_options"] = {
                    **(opts if isinstance(opts, dict) else {}),
                    "include_usage": True,
                }
        return await super().forward(call, base_url, headers)

    def adjust_completion(self, completion: dict[str, Any]) -> dict[str, Any]:
        for choice in completion.get("choices") or ():
            msg = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(msg, dict) and msg.get("reasoning") and not msg.get("reasoning_content"):
                msg["reasoning_content"] = msg["reasoning"]
        return completion

    def adjust_chunk(self, chunk: dict[str, Any]) -> dict[str, Any]:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and delta.get("reasoning") and not delta.get("reasoning_content"):
                delta["reasoning_content"] = delta["reasoning"]
        return chunk


@hookimpl
def register_backends(register):
    register(VllmExternalAdapter)
