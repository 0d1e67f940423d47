"""Request shaping by capability: a model gets only what it can take (order 250, right after the model
is resolved, so later stages see the effective capabilities in ``ctx.capabilities``).

- An empty ``tools: []`` (or ``functions: []``) is dropped for every model: vLLM and OpenAI refuse it and it
  means "no tools" anyway.
- A model without tools loses ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``functions`` and
  ``function_call`` (OpenWebUI puts its built-in tools on every browser turn), unless the request insists
  on a tool call (``tool_choice`` ``"required"`` or a named function): that is refused with 409
  ``capability_mismatch`` instead of silently answering without tools.
- A model without reasoning loses ``think``, ``reasoning_effort`` and
  ``chat_template_kwargs.enable_thinking`` (Ollama refuses them for a model that cannot think).

Unknown capabilities are left alone: the adapter retries once without them if the upstream refuses
(``Adapter.retry_refused``). What was dropped is logged once per model at INFO and listed in the request
log's ``adapted`` field.
"""

from __future__ import annotations

from imageworks_proxy import keys
from imageworks_proxy.catalogue.capabilities import drop_empty_tools, drop_fields, forces_tool_call
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.pipeline.stage import ChatContext, Stage


class CapabilityShaping(Stage):
    name = "capabilities"
    order = 250

    async def request(self, ctx: ChatContext) -> None:
        entry = ctx.entry
        if entry is None:
            return
        models = keys.models(self.app)
        caps = ctx.capabilities = await models.effective_capabilities(entry)
        body = ctx.body
        ctx.adapted.extend(drop_empty_tools(body))
        if caps.has("tools") is False and (body.get("tools") or body.get("functions")):
            if forces_tool_call(body):
                raise ProxyError(
                    409,
                    "capability_mismatch",
                    f"Model {ctx.model!r} cannot call tools ({caps.why('tools')}), and the request "
                    "insists on a tool call (tool_choice). Pick a model with tools, or let the model choose.",
                    param="tool_choice",
                )
            dropped = drop_fields(body, "tools")
            models.capabilities.note(entry, "tools", dropped, caps.why("tools"))
            ctx.adapted.extend(dropped)
        if caps.has("reasoning") is False:
            dropped = drop_fields(body, "reasoning")
            if dropped:
                models.capabilities.note(entry, "reasoning", dropped, caps.why("reasoning"))
                ctx.adapted.extend(dropped)
