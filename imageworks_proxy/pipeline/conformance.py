"""Conformance fill-in: whatever the backend sent, what leaves the proxy validates against the OpenAI
schemas — required fields are filled in, the first delta carries the role, a stream ends with a
finish reason."""

from __future__ import annotations

import time
from typing import Any

from imageworks_proxy.pipeline.stage import ChatContext, Stage
from imageworks_proxy.wire.ids import completion_id

_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


def _finish(value: Any) -> str:
    if value in _FINISH:
        return value
    if value in ("eos", "end_turn", "stop_sequence"):
        return "stop"
    if value in ("max_tokens", "max_length"):
        return "length"
    return "stop"


def fix_usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    p = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
    c = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else 0
    usage["prompt_tokens"], usage["completion_tokens"] = p, c
    if not isinstance(usage.get("total_tokens"), int):
        usage["total_tokens"] = p + c
    return usage


class _Ids:
    __slots__ = ("_id", "choices", "created", "finished", "held_usage", "role_sent")

    def __init__(self) -> None:
        self._id: str | None = None  # made only when the upstream sent none (a random id costs a syscall)
        self.created = int(time.time())
        self.role_sent = False
        #: choice indexes seen, and those that already got their finish_reason
        self.choices: set[int] = set()
        self.finished: set[int] = set()
        #: a usage-only chunk that arrived before every choice finished; sent last
        self.held_usage: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        if self._id is None:
            self._id = completion_id()
        return self._id

    @id.setter
    def id(self, value: str) -> None:
        self._id = value


class Conformance(Stage):
    name = "conformance"
    order = 1000

    def _ids(self, ctx: ChatContext) -> _Ids:
        ids = ctx.state.get(self.name)
        if ids is None:
            ids = ctx.state[self.name] = _Ids()
        return ids

    def _top(self, ctx: ChatContext, obj: dict[str, Any], kind: str, ids: _Ids | None = None) -> None:
        if ids is None:
            ids = self._ids(ctx)
        if not isinstance(obj.get("id"), str) or not obj["id"]:
            obj["id"] = ids.id
        else:
            ids.id = obj["id"]
        obj["object"] = kind
        if not isinstance(obj.get("created"), int):
            obj["created"] = ids.created
        # Clients see the id they asked for, not the upstream's internal name.
        obj["model"] = ctx.model or obj.get("model") or ""

    def response(self, ctx: ChatContext, completion: dict[str, Any]) -> dict[str, Any]:
        self._top(ctx, completion, "chat.completion")
        choices = completion.get("choices")
        if not isinstance(choices, list):
            choices = completion["choices"] = []
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                choices[i] = choice = {}
            choice.setdefault("index", i)
            message = choice.get("message")
            if not isinstance(message, dict):
                message = choice["message"] = {}
            message["role"] = "assistant"
            message.setdefault("content", None)
            message.setdefault("refusal", None)
            if message.get("reasoning") and not message.get("reasoning_content"):
                message["reasoning_content"] = message["reasoning"]
            choice["finish_reason"] = _finish(choice.get("finish_reason"))
            choice.setdefault("logprobs", None)
        if "usage" in completion:
            usage = fix_usage(completion["usage"])
            if usage is None:
                del completion["usage"]
            ctx.usage = usage
        return completion

    def chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        ids = self._ids(ctx)
        self._top(ctx, chunk, "chat.completion.chunk", ids)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            choices = chunk["choices"] = []
        repeated = False
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                choices[i] = choice = {}
            index = choice.setdefault("index", i)
            if index not in ids.choices:
                ids.choices.add(index)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            if not ids.role_sent:
                delta["role"] = "assistant"
            elif delta.get("role"):
                del delta["role"]  # a repeated role would be concatenated by accumulating clients
            if delta.get("reasoning") and not delta.get("reasoning_content"):
                delta["reasoning_content"] = delta["reasoning"]
            fr = choice.get("finish_reason")
            if fr is None:
                choice["finish_reason"] = None
            elif index in ids.finished:
                choice["finish_reason"] = None  # exactly one finish_reason per choice
                repeated = True
            else:
                choice["finish_reason"] = _finish(fr)
                ids.finished.add(index)
        if choices:
            ids.role_sent = True
        usage = chunk.get("usage")
        if usage is not None:
            chunk["usage"] = fix_usage(usage)
            if chunk["usage"] is not None:
                ctx.usage = chunk["usage"]
        if repeated:
            # drop what only repeated a finish; keep anything else the chunk carries (text, usage)
            choices = [c for c in choices if c["delta"] or c["finish_reason"] or c.get("logprobs")]
            chunk["choices"] = choices
            if not choices and not chunk.get("usage"):
                return []
        if not choices and chunk.get("usage") and not ctx.client_wants_usage:
            return []  # asked upstream for the request log's token counts, not by the client
        if not choices and chunk.get("usage") and not (ids.choices and ids.choices <= ids.finished):
            ids.held_usage = chunk  # the usage chunk comes last: after the finish still to be sent
            return []
        return [chunk]

    def stream_end(self, ctx: ChatContext) -> list[dict[str, Any]]:
        ids = self._ids(ctx)
        out: list[dict[str, Any]] = []
        missing = sorted(ids.choices - ids.finished) if ids.choices else [0]
        if missing:
            chunk = {"choices": [{"index": i, "delta": {}, "finish_reason": "stop"} for i in missing]}
            out = self.chunk(ctx, chunk)
        if ids.held_usage is not None:
            out.append(ids.held_usage)
            ids.held_usage = None
        return out
