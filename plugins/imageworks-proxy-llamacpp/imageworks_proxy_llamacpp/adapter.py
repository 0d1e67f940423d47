"""The ``llamacpp`` adapter: registry entries with ``backend: "gguf"`` served by llama.cpp's ``llama-server``.

This module is the plugin: the entry point ``llamacpp`` in group ``imageworks_proxy`` names it, and its
``register_backends`` hook registers :class:`LlamaCppAdapter`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

from imageworks_proxy import (
    ChatCall,
    ChunkStream,
    Completion,
    Entry,
    HeldStream,
    OpenAIPassthroughAdapter,
    Tenant,
    hookimpl,
    tenancy,
)
from imageworks_proxy_llamacpp.server import LlamaCppSettings, LlamaServerSlot


class LlamaCppAdapter(OpenAIPassthroughAdapter):
    """Starts ``llama-server`` for the requested GGUF model on ``CHAT_PROXY_VLLM_PORT`` and forwards the
    chat to its OpenAI-compatible API.

    Each request holds a GPU tenancy lease on ``llamacpp:<logical name>`` (so the proxy's tenancy can
    evict vLLM or Ollama first and evict this server later), and a hold on the running server, until its
    response, stream included, is over.
    """

    name = "llamacpp"
    backends = ("gguf",)
    description = "GGUF models served by llama.cpp's llama-server on CHAT_PROXY_VLLM_PORT"

    def __init__(self, app, config) -> None:
        super().__init__(app, config)
        self.settings = LlamaCppSettings.from_env(os.environ, config)
        self.slot = LlamaServerSlot(self.settings, lambda: self.http)

    def installed(self, entry: Entry) -> bool | None:
        raw = entry.backend_config.model_path or entry.download_path
        return bool(raw) and Path(os.path.expanduser(raw)).exists()

    def model_status(self, entry: Entry) -> str | None:
        return self.slot.status(entry.name)

    async def close(self) -> None:
        await self.slot.stop()
        await super().close()

    def tenant(self, entry: Entry) -> Tenant:
        return Tenant(
            f"llamacpp:{entry.name}",
            f"llama.cpp {entry.name}",
            start=functools.partial(self.slot.ensure_started, entry),
            stop=functools.partial(self.slot.stop, entry.name),
            # llama-server binds the shared port and fills the GPU: one at a time, like vLLM, whatever
            # CHAT_PROXY_GPU_EXCLUSIVE says about the other tenants
            exclusive=True,
            model=entry.name,
        )

    def where(self, call: ChatCall) -> str:
        return f"llama-server for {call.entry.name!r}"

    async def on_unreachable(self, call: ChatCall) -> bool:
        """The server refused the connection: if its process died, start it again and retry once."""
        return await self.slot.recover(call.entry)

    async def chat(self, call: ChatCall) -> Completion | ChunkStream:
        lease = await tenancy(self.app).acquire(self.tenant(call.entry), call)
        releases: list[Callable[[], None]] = [lease.release]
        try:
            # With a pass-through tenancy nothing has started the server yet: start it here (joins a
            # start in progress, or waits for requests on another GGUF model to finish and switches).
            started = time.perf_counter()
            releases.insert(0, await self.slot.acquire(call.entry, call.waiting))
            call.queue_ms += (time.perf_counter() - started) * 1000
            result = await self.forward(call, self.slot.base_url)
        except BaseException:
            _release_all(releases)
            raise
        if not call.stream:
            _release_all(releases)
            return result
        return HeldStream(result, lambda: _release_all(releases))


def _release_all(releases: list[Callable[[], None]]) -> None:
    for release in releases:
        release()


@hookimpl
def register_backends(register):
    register(LlamaCppAdapter)
