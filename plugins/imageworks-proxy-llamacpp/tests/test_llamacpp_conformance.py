"""The adapter conformance suite every adapter passes, run against this plugin in front of the fake
llama-server: what a client sees is the same as with the built-in adapters."""

from __future__ import annotations

from pathlib import Path

import imageworks_proxy_llamacpp.adapter as llamacpp_plugin
import pytest
from llamacpp_testlib import gguf_entry

from imageworks_proxy.testing import AdapterConformance, ConformanceBackend


class TestLlamaCppConformance(AdapterConformance):
    @pytest.fixture
    def conformance_backend(self, fake_llama, gguf, proxy_settings, tmp_path: Path) -> ConformanceBackend:
        entries = [
            gguf_entry("c-echo", gguf("echo.gguf", content="echo")),
            gguf_entry("c-tools", gguf("tools.gguf", content="tools")),
            # llama-server serves the one file it was started with: the model it lacks is a missing file
            gguf_entry("c-missing", tmp_path / "models" / "missing.gguf"),
        ]
        return ConformanceBackend(
            entries,
            echo="c-echo",
            tools="c-tools",
            missing="c-missing",
            adapter="llamacpp",
            settings=proxy_settings(),
            plugins=(llamacpp_plugin,),
        )

    @pytest.mark.xfail(
        reason="llama-server's tool-call ids are 32 random letters and digits and the proxy passes "
        "upstream ids through instead of giving each call a call_<random> id",
        raises=AssertionError,
        strict=True,
    )
    async def test_tool_call_ids_have_the_openai_form(self, conformance) -> None:
        await super().test_tool_call_ids_have_the_openai_form(conformance)

    @pytest.mark.xfail(
        reason="a gguf entry whose file is missing is started anyway: llama-server exits (no such file) "
        "and the client gets 503 model_start_failed instead of 404 model_not_found",
        raises=AssertionError,
        strict=True,
    )
    async def test_backend_model_not_found_is_404(self, conformance) -> None:
        await super().test_backend_model_not_found_is_404(conformance)
