"""Built-in adapter plugin: vLLM models started and switched on demand on one port (SPEC §11)."""

from __future__ import annotations

import os

from imageworks_proxy.adapters.base import Adapter
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.registry import Entry


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~"))


class VllmOrchestratedAdapter(Adapter):
    name = "vllm-orchestrated"
    backends = ("vllm",)
    description = "vLLM started by the proxy, one model at a time on CHAT_PROXY_VLLM_PORT"

    def accepts(self, entry: Entry) -> bool:
        return self.config.vllm_single_port and not entry.backend_config.base_url

    def installed(self, entry: Entry) -> bool | None:
        if entry.download_path:
            return None  # the default rule (cached stat of download_path)
        path = entry.backend_config.model_path
        if path and _looks_local(path):
            return os.path.exists(os.path.expanduser(path))
        return True  # a hub id: vLLM fetches it itself

    def model_status(self, entry: Entry) -> str | None:
        return "stopped"


@hookimpl
def register_backends(register):
    register(VllmOrchestratedAdapter)
