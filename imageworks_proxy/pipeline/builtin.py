"""Built-in plugin registering the shared pipeline stages (docs/architecture.md); each stage's ``order``
decides where it runs and its ``endpoints`` for which routes, the comments repeat them."""

from __future__ import annotations

from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.pipeline.capabilities import CapabilityShaping
from imageworks_proxy.pipeline.completions import TextCompletionConformance, ValidateCompletions
from imageworks_proxy.pipeline.conformance import Conformance, UpstreamShape
from imageworks_proxy.pipeline.embeddings import EmbeddingsConformance, ValidateEmbeddings
from imageworks_proxy.pipeline.images import ImageLimits
from imageworks_proxy.pipeline.observe import ObserveStage
from imageworks_proxy.pipeline.request import (
    DefaultSystemPrompt,
    GenerationDefaults,
    ResolveModel,
    ValidateRequest,
)
from imageworks_proxy.pipeline.template import TemplateStage
from imageworks_proxy.pipeline.toolcalls import ToolCallSynthesis
from imageworks_proxy.pipeline.truncation import VisionHistoryTruncation
from imageworks_proxy.pipeline.vision import VisionDownscale


@hookimpl
def register_stages(register):
    register(ValidateRequest)  # 100, chat
    register(ValidateEmbeddings)  # 100, embeddings
    register(ValidateCompletions)  # 100, text completions
    register(ResolveModel)  # 200, every route
    register(CapabilityShaping)  # 250, chat
    register(DefaultSystemPrompt)  # 300
    register(ImageLimits)  # 400
    register(VisionHistoryTruncation)  # 500
    register(VisionDownscale)  # 550
    register(TemplateStage)  # 600
    register(GenerationDefaults)  # 700, chat and text completions
    register(UpstreamShape)  # 800
    register(ToolCallSynthesis)  # 900
    register(Conformance)  # 1000, chat
    register(EmbeddingsConformance)  # 1000, embeddings
    register(TextCompletionConformance)  # 1000, text completions
    register(ObserveStage)  # 1100, every route
