"""Built-in plugin registering the shared pipeline stages (SPEC §6)."""

from __future__ import annotations

from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.template_stage import TemplateStage


@hookimpl
def register_stages(register):
    # The chat stages are registered here as they are implemented (see imageworks_proxy/pipeline.py).
    register(TemplateStage)
