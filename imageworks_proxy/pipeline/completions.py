"""The ``POST /v1/completions`` stages (legacy text completions, as editors use for autocomplete): the
request's check, and answers and chunks that validate against OpenAI's ``CreateCompletionResponse``
whatever the backend sent."""

from __future__ import annotations

import time
from typing import Any

from imageworks_proxy.adapters.base import COMPLETIONS
from imageworks_proxy.errors import invalid_request
from imageworks_proxy.pipeline.conformance import fix_usage, take_usage
from imageworks_proxy.pipeline.embeddings import input_kind
from imageworks_proxy.pipeline.request import check_model, check_stream
from imageworks_proxy.pipeline.stage import ChatContext, Stage
from imageworks_proxy.wire.ids import text_completion_id

_FINISH = frozenset({"stop", "length", "content_filter"})


def _finish(value: Any) -> str:
    if value in _FINISH:
        return value
    return "length" if value in ("max_tokens", "max_length") else "stop"


class ValidateCompletions(Stage):
    """400 for a text completion body the proxy cannot route; unknown fields are kept and forwarded."""

    name = "validate-completions"
    order = 100
    endpoints = frozenset({COMPLETIONS})

    async def request(self, ctx: ChatContext) -> None:
        body = ctx.body
        model = check_model(body)
        prompt = body.get("prompt")
        if prompt != "" and input_kind(prompt) is None:
            raise invalid_request(
                "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id "
                "lists.",
                "prompt",
            )
        if body.get("suffix") is not None and not isinstance(body["suffix"], str):
            raise invalid_request("'suffix' must be a string.", "suffix")
        check_stream(ctx, body)
        ctx.model = model


class _Seen:
    """What one stream has shown so far: its id, and the choices that got their finish."""

    __slots__ = ("choices", "created", "finished", "id")

    def __init__(self) -> None:
        self.id: str | None = None
        self.created = int(time.time())
        self.choices: set[int] = set()
        self.finished: set[int] = set()


class TextCompletionConformance(Stage):
    """Fill in what OpenAI's schema requires (``id``, ``object``, ``created``, each choice's ``text``,
    ``index``, ``logprobs`` and a known ``finish_reason``), name the model the client asked for, send the
    usage chunk only to a client that asked for it, and end every stream with a finish."""

    name = "completions-conformance"
    order = 1000
    endpoints = frozenset({COMPLETIONS})

    def _seen(self, ctx: ChatContext) -> _Seen:
        seen = ctx.state.get(self.name)
        if seen is None:
            seen = ctx.state[self.name] = _Seen()
        return seen

    def _top(self, ctx: ChatContext, obj: dict[str, Any], seen: _Seen) -> None:
        if isinstance(obj.get("id"), str) and obj["id"]:
            seen.id = obj["id"]
        else:
            obj["id"] = seen.id = seen.id or text_completion_id()
        obj["object"] = "text_completion"
        if not isinstance(obj.get("created"), int):
            obj["created"] = seen.created
        obj["model"] = ctx.model or obj.get("model") or ""
        choices = obj.get("choices")
        if not isinstance(choices, list):
            choices = obj["choices"] = []
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                choices[i] = choice = {}
            choice.setdefault("index", i)
            if not isinstance(choice.get("text"), str):
                choice["text"] = ""
            choice.setdefault("logprobs", None)

    def response(self, ctx: ChatContext, completion: dict[str, Any]) -> dict[str, Any]:
        self._top(ctx, completion, self._seen(ctx))
        for choice in completion["choices"]:
            choice["finish_reason"] = _finish(choice.get("finish_reason"))
        take_usage(ctx, completion)
        return completion

    def chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        seen = self._seen(ctx)
        self._top(ctx, chunk, seen)
        for choice in chunk["choices"]:
            index = choice["index"]
            seen.choices.add(index)
            finish = choice.get("finish_reason")
            if finish is None or index in seen.finished:
                choice["finish_reason"] = None  # exactly one finish per choice
            else:
                choice["finish_reason"] = _finish(finish)
                seen.finished.add(index)
        usage = chunk.get("usage")
        if usage is not None:
            chunk["usage"] = fix_usage(usage)
            if chunk["usage"] is not None:
                ctx.usage = chunk["usage"]
        if not chunk["choices"] and chunk.get("usage") and not ctx.client_wants_usage:
            return []  # asked upstream for the request log's token counts, not by the client
        return [chunk]

    def stream_end(self, ctx: ChatContext) -> list[dict[str, Any]]:
        seen = self._seen(ctx)
        missing = sorted(seen.choices - seen.finished) if seen.choices else [0]
        if not missing:
            return []
        return self.chunk(
            ctx, {"choices": [{"index": i, "text": "", "finish_reason": "stop"} for i in missing]}
        )
