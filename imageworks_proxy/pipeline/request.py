"""Request-side stages: validation, model resolution, default system prompt, generation defaults."""

from __future__ import annotations

from typing import Any

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import CHAT, COMPLETIONS, EMBEDDINGS
from imageworks_proxy.catalogue.service import model_kind
from imageworks_proxy.errors import ProxyError, invalid_request
from imageworks_proxy.pipeline.stage import ChatContext, Stage

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class ValidateRequest(Stage):
    """400 for a body the proxy cannot route; unknown fields are kept and forwarded."""

    name = "validate"
    order = 100

    async def request(self, ctx: ChatContext) -> None:
        body = ctx.body
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise invalid_request(
                "'model' must be a non-empty string naming a model from GET /v1/models.", "model"
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid_request("'messages' must be a non-empty list of message objects.", "messages")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise invalid_request(f"messages[{i}] must be an object.", f"messages[{i}]")
            role = msg.get("role")
            if role not in _ROLES:
                raise invalid_request(
                    f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}; got {role!r}.",
                    f"messages[{i}].role",
                )
            if role == "developer":
                # Few local chat templates know "developer"; it means "system" to them.
                msg["role"] = "system"
            content = msg.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise invalid_request(
                    f"messages[{i}].content must be a string or a list of parts.", f"messages[{i}].content"
                )
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise invalid_request("'stream' must be true or false.", "stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise invalid_request("'stream_options' must be an object.", "stream_options")
        ctx.client_wants_usage = bool(stream) and isinstance(opts, dict) and bool(opts.get("include_usage"))
        if not stream and "stream_options" in body:
            # vLLM and OpenAI answer 400 to stream_options without stream; it means nothing here anyway.
            del body["stream_options"]
        ctx.model = model
        ctx.stream = bool(stream)


class ResolveModel(Stage):
    """The request's ``model`` → a registry entry (404 ``model_not_found``); an embedding-only model asked
    to write text → 409 ``capability_mismatch`` (before any backend is woken for it)."""

    name = "resolve"
    order = 200
    endpoints = frozenset({CHAT, EMBEDDINGS, COMPLETIONS})

    async def request(self, ctx: ChatContext) -> None:
        entry = ctx.entry = keys.models(self.app).resolve(ctx.model)
        # "embedding" first: the chat path pays one set lookup
        if "embedding" in entry.capabilities and ctx.endpoint != EMBEDDINGS and model_kind(entry) != "chat":
            raise ProxyError(
                409,
                "capability_mismatch",
                f"Model {ctx.model!r} is an embedding model; send it to POST /v1/embeddings.",
                param="model",
            )


class DefaultSystemPrompt(Stage):
    """``metadata.default_system_prompt`` when the request has no system message."""

    name = "default-system-prompt"
    order = 300

    async def request(self, ctx: ChatContext) -> None:
        entry = ctx.entry
        prompt = entry.metadata.get("default_system_prompt") if entry else None
        if not prompt or not isinstance(prompt, str):
            return
        messages = ctx.body["messages"]
        if not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": prompt})


# registry generation_defaults key -> request key
_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_tokens": "min_tokens",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "stop_sequences": "stop",
    "stop": "stop",
    "seed": "seed",
}


class GenerationDefaults(Stage):
    """Registry ``generation_defaults`` for keys the request omits (chat and text completions)."""

    name = "generation-defaults"
    order = 700
    endpoints = frozenset({CHAT, COMPLETIONS})

    async def request(self, ctx: ChatContext) -> None:
        entry = ctx.entry
        if entry is None or not entry.generation_defaults:
            return
        body: dict[str, Any] = ctx.body
        for src, dst in _DEFAULT_KEYS.items():
            value = entry.generation_defaults.get(src)
            if value is not None and body.get(dst) is None:
                body[dst] = value
        max_tokens = entry.generation_defaults.get("max_tokens")
        if (
            max_tokens is not None
            and body.get("max_tokens") is None
            and body.get("max_completion_tokens") is None
        ):
            body["max_tokens"] = max_tokens
