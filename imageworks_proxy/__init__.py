"""imageworks-proxy: one OpenAI-compatible base URL in front of the model servers on a GPU box.

The names below are the public API, for apps that embed the proxy and for plugin authors; everything
else is internal and may move. ``create_app`` is imported on first use, so importing the package (as
every plugin does for ``hookimpl``) does not build the web application module graph.

    from imageworks_proxy import create_app, hookimpl, Adapter, ChatCall, Stage, ChatContext, ProxyError
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imageworks_proxy import keys
from imageworks_proxy._version import __version__
from imageworks_proxy.adapters.base import ANY_BACKEND, Adapter, ChatCall, ChunkStream, Completion, HeldStream
from imageworks_proxy.adapters.openai_passthrough import OpenAIPassthroughAdapter
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.config import Config, ConfigError, load_config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.tenancy import Lease, Tenant, tenancy
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.pipeline.stage import ChatContext, Stage

if TYPE_CHECKING:
    from imageworks_proxy.app import create_app

__all__ = [
    "ANY_BACKEND",
    "Adapter",
    "ChatCall",
    "ChatContext",
    "ChunkStream",
    "Completion",
    "Config",
    "ConfigError",
    "Entry",
    "HeldStream",
    "Lease",
    "OpenAIPassthroughAdapter",
    "ProxyError",
    "Stage",
    "Tenant",
    "__version__",
    "create_app",
    "hookimpl",
    "keys",
    "load_config",
    "tenancy",
]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from imageworks_proxy.app import create_app

        return create_app
    raise AttributeError(f"module 'imageworks_proxy' has no attribute {name!r}")
