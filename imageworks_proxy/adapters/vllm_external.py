"""Built-in adapter plugin: a vLLM server the proxy does not start (``backend: vllm`` with a ``base_url``,
or any ``vllm`` entry when single-port orchestration is off)."""

from __future__ import annotations

from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.registry import Entry


class VllmExternalAdapter(Adapter):
    name = "vllm-external"
    backends = ("vllm",)
    description = "A vLLM server started elsewhere (OpenAI API plus vLLM's quirks)"

    def accepts(self, entry: Entry) -> bool:
        return not (self.config.vllm_single_port and not entry.backend_config.base_url)


@hookimpl
def register_backends(register):
    register(VllmExternalAdapter)
