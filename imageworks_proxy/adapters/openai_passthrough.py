"""Built-in adapter plugin: any OpenAI-compatible server (``backend: openai`` and unclaimed backends)."""

from __future__ import annotations

from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.hookspecs import hookimpl


class OpenAIPassthroughAdapter(Adapter):
    name = "openai-passthrough"
    backends = ("openai",)
    fallback = True
    description = "Any OpenAI-compatible server (base_url or http://host:port/v1)"


@hookimpl
def register_backends(register):
    register(OpenAIPassthroughAdapter)
