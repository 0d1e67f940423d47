"""Request-side stages: validation, model resolution, default system prompt, generation defaults."""

from __future__ import annotations

from typing import Any

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import CHAT, COMPLETIONS, EMBEDDINGS
from imageworks_proxy.catalogue.service import model_kind
from imageworks_proxy.errors import ProxyError, invalid_request
from imageworks_proxy.pipeline.stage import ChatContext, Stage

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


#: Longer ``model`` values are refused: no registry name is this long, and a megabyte name would otherwise
#: be echoed in the 404 and fill the request log.
MAX_MODEL_CHARS = 256


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters (a client's value may be
    huge); lists and objects are named by their type."""
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _objects(value: Any, param: str, what: str) -> list[dict[str, Any]]:
    """``value`` as a list of objects, or a 400 naming ``param`` (or the offending item)."""
    if not isinstance(value, list):
        raise invalid_request(f"'{param}' must be a list of {what} objects.", param)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise invalid_request(f"{param}[{i}] must be an object ({what}).", f"{param}[{i}]")
        fn = item.get("function")
        if fn is not None and not isinstance(fn, dict):
            raise invalid_request(f"{param}[{i}].function must be an object.", f"{param}[{i}].function")
    return value


def _check_message(i: int, msg: Any) -> None:
    if not isinstance(msg, dict):
        raise invalid_request(f"messages[{i}] must be an object.", f"messages[{i}]")
    role = msg.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise invalid_request(
            f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}; got {shown(role)}.",
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
    if msg.get("tool_calls") is not None:
        _objects(msg["tool_calls"], f"messages[{i}].tool_calls", "tool call")


def _check_tools(body: dict[str, Any]) -> None:
    for field, what in (("tools", "tool"), ("functions", "function")):
        if body.get(field) is not None:
            _objects(body[field], field, what)
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, (str, dict)):
        raise invalid_request("'tool_choice' must be a string or an object.", "tool_choice")


def _check_max_tokens(body: dict[str, Any]) -> None:
    # A negative limit would mean "unlimited" to Ollama (num_predict -1); OpenAI and vLLM refuse < 1.
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < 1:
            raise invalid_request(f"'{field}' must be an integer of at least 1; got {shown(value)}.", field)


def check_model(body: dict[str, Any]) -> str:
    """The request's ``model``; a 400 naming ``model`` when it is not a non-empty string or is longer than
    any id (checked by every route that names a model)."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid_request(
            "'model' must be a non-empty string naming a model from GET /v1/models.", "model"
        )
    if len(model) > MAX_MODEL_CHARS:
        raise invalid_request(
            f"'model' is {len(model)} characters long; model ids have at most {MAX_MODEL_CHARS}.", "model"
        )
    return model


def check_stream(ctx: ChatContext, body: dict[str, Any]) -> None:
    """Check ``stream`` and ``stream_options`` (400 naming the field), and set ``ctx.stream`` and
    ``ctx.client_wants_usage``. ``stream_options`` without ``stream`` is dropped: vLLM and OpenAI answer
    400 to it, and it means nothing here anyway."""
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request("'stream' must be true or false.", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid_request("'stream_options' must be an object.", "stream_options")
    ctx.client_wants_usage = bool(stream) and isinstance(opts, dict) and bool(opts.get("include_usage"))
    if not stream and "stream_options" in body:
        del body["stream_options"]
    ctx.stream = bool(stream)


class ValidateRequest(Stage):
    """400 for a body the proxy cannot route; unknown fields are kept and forwarded."""

    name = "validate"
    order = 100

    async def request(self, ctx: ChatContext) -> None:
        body = ctx.body
        model = check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid_request("'messages' must be a non-empty list of message objects.", "messages")
        for i, msg in enumerate(messages):
            _check_message(i, msg)
        _check_tools(body)
        _check_max_tokens(body)
        check_stream(ctx, body)
        ctx.model = model


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
