"""Built-in plugin registering the shared pipeline stages (SPEC §6), in the spec's order."""

from __future__ import annotations

from imageworks_proxy.conformance import Conformance
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.image_stage import ImageLimits
from imageworks_proxy.observe_stage import ObserveStage
from imageworks_proxy.request_stages import DefaultSystemPrompt, GenerationDefaults, ResolveModel, ValidateRequest
from imageworks_proxy.template_stage import TemplateStage
from imageworks_proxy.toolcalls import ToolCallSynthesis
from imageworks_proxy.truncation import VisionHistoryTruncation


@hookimpl
def register_stages(register):
    register(ValidateRequest)  # 100
    register(ResolveModel)  # 200
    register(DefaultSystemPrompt)  # 300
    register(ImageLimits)  # 400
    register(VisionHistoryTruncation)  # 500
    register(TemplateStage)  # 600
    register(GenerationDefaults)  # 700
    register(ToolCallSynthesis)  # 900
    register(Conformance)  # 1000
    register(ObserveStage)  # 1100
