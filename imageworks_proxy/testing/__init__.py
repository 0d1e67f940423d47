"""A testing kit for adapter authors: fake upstreams, the adapter conformance suite and pytest fixtures.

An adapter distribution tests its adapter the way the built-in adapters are tested:

1. Enable the fixtures in the top-level ``conftest.py`` of its tests (needs pytest-aiohttp and
   ``asyncio_mode = "auto"``)::

       pytest_plugins = ["imageworks_proxy.testing.pytest_plugin"]

   ``make_config(**settings)`` builds a config in code, ``make_app(config, plugins)`` and
   ``proxy_client(config, plugins)`` start the proxy with the built-ins plus your plugin module (no
   entry-point scan), ``registry_file(entries)`` writes the registry, ``openai_sdk(client)`` gives an
   ``openai.AsyncOpenAI`` pointed at the proxy.

2. Run the conformance suite against the adapter in front of a fake of its upstream::

       import pytest
       from imageworks_proxy.testing import AdapterConformance, ConformanceBackend

       import my_adapter_plugin


       class TestMyAdapterConformance(AdapterConformance):
           @pytest.fixture
           async def conformance_backend(self, aiohttp_server):
               server = await aiohttp_server(make_my_fake_upstream())
               base = str(server.make_url("/v1"))
               entries = [
                   {"name": f"c-{m}", "backend": "mine", "served_model_id": m,
                    "backend_config": {"base_url": base}, "capabilities": ["tools"]}
                   for m in ("echo", "tools", "missing")
               ]
               return ConformanceBackend(entries, echo="c-echo", tools="c-tools", missing="c-missing",
                                         adapter="my-adapter", plugins=(my_adapter_plugin,))

3. Reuse the fakes in :mod:`imageworks_proxy.testing.fakes` where the upstream speaks the OpenAI API
   (``fakes.openai``), Ollama's API (``fakes.ollama``) or is a vLLM process (``fakes.vllm``).

Importing this package does not import pytest; only :mod:`imageworks_proxy.testing.pytest_plugin` does.
``import imageworks_proxy`` does not import this package.
"""

from imageworks_proxy.testing.chat import openwebui_tools, openwebui_turn, sse_events, user
from imageworks_proxy.testing.conformance import AdapterConformance, Conformance, ConformanceBackend
from imageworks_proxy.testing.ports import free_port
from imageworks_proxy.testing.processes import pid_alive
from imageworks_proxy.testing.shapes import check_chunk, check_completion, check_error

__all__ = [
    "AdapterConformance",
    "Conformance",
    "ConformanceBackend",
    "check_chunk",
    "check_completion",
    "check_error",
    "free_port",
    "openwebui_tools",
    "openwebui_turn",
    "pid_alive",
    "sse_events",
    "user",
]
