"""Conformance: whatever the backend sent, what leaves the proxy validates against the OpenAI schemas.

Two stages. :class:`UpstreamShape` runs first on every reply and refuses JSON of the wrong types
(``choices: "abc"``, ``content: 5``, ``tool_calls: 5``) as the backend's fault, a 502 ``backend_error``,
before any later stage trips over it. :class:`Conformance` fills in what is missing: required fields, the
role in the first delta, a finish reason at the end of a stream.
"""

from __future__ import annotations

import time
from typing import Any

from imageworks_proxy.errors import ProxyError
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


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fix_usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    p = usage.get("prompt_tokens") if _count(usage.get("prompt_tokens")) else 0
    c = usage.get("completion_tokens") if _count(usage.get("completion_tokens")) else 0
    usage["prompt_tokens"], usage["completion_tokens"] = p, c
    if not _count(usage.get("total_tokens")):
        usage["total_tokens"] = p + c
    return usage


_TEXT = (str, list)  # content may come as a list of parts
_ARGS = (str, dict)  # arguments as JSON text, or an object (Ollama-style) the tool-call stage encodes


class _WrongType(Exception):
    def __init__(self, path: str, value: Any) -> None:
        super().__init__(path)
        self.path, self.value = path, value


def _want(obj: dict[str, Any], key: str, types: type | tuple[type, ...], path: str) -> Any:
    value = obj.get(key)
    if value is None or (isinstance(value, types) and not isinstance(value, bool)):
        return value
    raise _WrongType(f"{path}.{key}" if path else key, value)


def _call(call: Any, path: str) -> None:
    if not isinstance(call, dict):
        raise _WrongType(path, call)
    _want(call, "index", int, path)
    _want(call, "id", str, path)
    fn = _want(call, "function", dict, path)
    if fn:
        _want(fn, "name", str, f"{path}.function")
        _want(fn, "arguments", _ARGS, f"{path}.function")


def _message(msg: dict[str, Any], path: str) -> None:
    """A completion's ``message`` or a chunk's ``delta``: text fields, tool calls, legacy function call."""
    _want(msg, "role", str, path)
    _want(msg, "content", _TEXT, path)
    for key in ("refusal", "reasoning", "reasoning_content"):
        _want(msg, key, str, path)
    for i, call in enumerate(_want(msg, "tool_calls", list, path) or ()):
        _call(call, f"{path}.tool_calls[{i}]")
    legacy = _want(msg, "function_call", dict, path)
    if legacy:
        _want(legacy, "name", str, f"{path}.function_call")
        _want(legacy, "arguments", _ARGS, f"{path}.function_call")


def _token(entry: Any, path: str, top: bool = False) -> None:
    """One logprobs entry: ``token`` and ``logprob`` are required, ``bytes`` integers when present."""
    if not isinstance(entry, dict):
        raise _WrongType(path, entry)
    if not isinstance(entry.get("token"), str):
        raise _WrongType(f"{path}.token", entry.get("token"))
    logprob = entry.get("logprob")
    if not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
        raise _WrongType(f"{path}.logprob", logprob)
    raw = _want(entry, "bytes", list, path)
    if raw and not all(isinstance(b, int) and not isinstance(b, bool) for b in raw):
        raise _WrongType(f"{path}.bytes", raw)
    if not top:
        for j, alt in enumerate(_want(entry, "top_logprobs", list, path) or ()):
            _token(alt, f"{path}.top_logprobs[{j}]", top=True)


def _choices(obj: dict[str, Any], inner: str) -> None:
    for i, choice in enumerate(_want(obj, "choices", list, "") or ()):
        path = f"choices[{i}]"
        if not isinstance(choice, dict):
            raise _WrongType(path, choice)
        _want(choice, "index", int, path)
        _want(choice, "finish_reason", str, path)
        msg = _want(choice, inner, dict, path)
        if msg:
            _message(msg, f"{path}.{inner}")
        logprobs = _want(choice, "logprobs", dict, path)
        for key in ("content", "refusal") if logprobs else ():
            for j, entry in enumerate(_want(logprobs, key, list, f"{path}.logprobs") or ()):
                _token(entry, f"{path}.logprobs.{key}[{j}]")


def _fill_logprobs(choice: dict[str, Any]) -> None:
    """The fields the schema requires of logprobs that some servers leave out, as null (``[]`` for
    ``top_logprobs``)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return
    for key in ("content", "refusal"):
        for entry in logprobs.setdefault(key, None) or ():
            entry.setdefault("bytes", None)
            for alt in entry.setdefault("top_logprobs", []):
                alt.setdefault("bytes", None)


class UpstreamShape(Stage):
    """Refuses a completion or chunk whose fields have the wrong JSON types: 502 ``backend_error``."""

    name = "upstream-shape"
    order = 800

    def _check(self, ctx: ChatContext, obj: dict[str, Any], inner: str) -> None:
        try:
            _choices(obj, inner)
        except _WrongType as exc:
            raise ProxyError(
                502,
                "backend_error",
                f"Backend for {ctx.model!r} sent a reply with {exc.path} of the wrong type "
                f"({type(exc.value).__name__}).",
            ) from None

    def response(self, ctx: ChatContext, completion: dict[str, Any]) -> dict[str, Any]:
        self._check(ctx, completion, "message")
        return completion

    def chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self._check(ctx, chunk, "delta")
        return [chunk]


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
        if not _count(obj.get("created")):
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
            if not _count(choice.get("index")):
                choice["index"] = i
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
            _fill_logprobs(choice)
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
            index = choice.get("index")
            if not _count(index):
                index = choice["index"] = i
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
            if "logprobs" in choice:
                _fill_logprobs(choice)
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
