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


def take_usage(ctx: ChatContext, completion: dict[str, Any]) -> None:
    """A completion's ``usage``, fixed (:func:`fix_usage`) and kept on ``ctx`` for the log; dropped when
    it is not an object."""
    if "usage" in completion:
        usage = fix_usage(completion["usage"])
        if usage is None:
            del completion["usage"]
        ctx.usage = usage


_TEXT = (str, list)  # content may come as a list of parts
_ARGS = (str, dict)  # arguments as JSON text, or an object (Ollama-style) the tool-call stage encodes
#: The types a field may have besides null, in a message or delta, a tool call, a function, a choice.
_MESSAGE = {"role": str, "content": _TEXT, "refusal": str, "reasoning": str, "reasoning_content": str,
            "tool_calls": list, "function_call": dict}
_CALL = {"index": int, "id": str, "function": dict}
_FUNCTION = {"name": str, "arguments": _ARGS}
_CHOICE = {"index": int, "finish_reason": str, "logprobs": dict}
_LOGPROBS = {"content": list, "refusal": list}
_TOKEN = {"bytes": list, "top_logprobs": list}


class _WrongType(Exception):
    """A field of the wrong type at ``path`` (relative until the callers above prefix theirs)."""

    def __init__(self, path: str, value: Any) -> None:
        super().__init__(path)
        self.path, self.value = path, value

    def under(self, prefix: str) -> _WrongType:
        return _WrongType(f"{prefix}.{self.path}" if self.path else prefix, self.value)


def _fields(obj: dict[str, Any], types: dict[str, Any]) -> None:
    """Check the fields ``obj`` has (the common chunk has one or two) against ``types``."""
    for key, value in obj.items():
        expected = types.get(key)
        if (
            expected is not None
            and value is not None
            and (not isinstance(value, expected) or value is True or value is False)
        ):
            raise _WrongType(key, value)


def _object(value: Any, types: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        raise _WrongType("", value)
    _fields(value, types)


def _message(msg: dict[str, Any]) -> None:
    """A completion's ``message`` or a chunk's ``delta``: text fields, tool calls, legacy function call."""
    _fields(msg, _MESSAGE)
    calls = msg.get("tool_calls")
    if calls:
        for i, call in enumerate(calls):
            try:
                _object(call, _CALL)
                _function(call)
            except _WrongType as exc:
                raise exc.under(f"tool_calls[{i}]") from None
    if msg.get("function_call"):
        _function(msg, "function_call")


def _function(obj: dict[str, Any], key: str = "function") -> None:
    if obj.get(key):
        try:
            _object(obj[key], _FUNCTION)
        except _WrongType as exc:
            raise exc.under(key) from None


def _token(entry: Any, top: bool = False) -> None:
    """One logprobs entry: ``token`` and ``logprob`` are required, ``bytes`` integers when present."""
    if not isinstance(entry, dict):
        raise _WrongType("", entry)
    if not isinstance(entry.get("token"), str):
        raise _WrongType("token", entry.get("token"))
    logprob = entry.get("logprob")
    if not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
        raise _WrongType("logprob", logprob)
    _fields(entry, _TOKEN)
    if entry.get("bytes") and not all(isinstance(b, int) and not isinstance(b, bool) for b in entry["bytes"]):
        raise _WrongType("bytes", entry["bytes"])
    for j, alt in enumerate((entry.get("top_logprobs") or ()) if not top else ()):
        try:
            _token(alt, top=True)
        except _WrongType as exc:
            raise exc.under(f"top_logprobs[{j}]") from None


def _logprobs(logprobs: dict[str, Any]) -> None:
    _fields(logprobs, _LOGPROBS)
    for key in ("content", "refusal"):
        for j, entry in enumerate(logprobs.get(key) or ()):
            try:
                _token(entry)
            except _WrongType as exc:
                raise exc.under(f"{key}[{j}]") from None


def _choice(choice: Any, inner: str) -> None:
    if not isinstance(choice, dict):
        raise _WrongType("", choice)
    _fields(choice, _CHOICE)
    msg = choice.get(inner)
    if msg is not None:
        if not isinstance(msg, dict):
            raise _WrongType(inner, msg)
        try:
            _message(msg)
        except _WrongType as exc:
            raise exc.under(inner) from None
    if choice.get("logprobs"):
        try:
            _logprobs(choice["logprobs"])
        except _WrongType as exc:
            raise exc.under("logprobs") from None


def _choices(obj: dict[str, Any], inner: str) -> None:
    """Raise :class:`_WrongType` for the first field of ``obj``'s choices that has the wrong type."""
    choices = obj.get("choices")
    if choices is None:
        return
    if not isinstance(choices, list):
        raise _WrongType("choices", choices)
    for i, choice in enumerate(choices):
        try:
            _choice(choice, inner)
        except _WrongType as exc:
            raise exc.under(f"choices[{i}]") from None


def _flat_text(msg: dict[str, Any]) -> None:
    """Content sent as a list of parts (some APIs answer so) becomes the text of its text parts."""
    content = msg.get("content")
    if isinstance(content, list):
        msg["content"] = "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )


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

    @staticmethod
    def _refusal(ctx: ChatContext, exc: _WrongType) -> ProxyError:
        return ProxyError(
            502,
            "backend_error",
            f"Backend for {ctx.model!r} sent a reply with {exc.path} of the wrong type "
            f"({type(exc.value).__name__}).",
        )

    def response(self, ctx: ChatContext, completion: dict[str, Any]) -> dict[str, Any]:
        try:
            _choices(completion, "message")
        except _WrongType as exc:
            raise self._refusal(ctx, exc) from None
        return completion

    def chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            _choices(chunk, "delta")
        except _WrongType as exc:
            raise self._refusal(ctx, exc) from None
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
            _flat_text(message)
            message.setdefault("refusal", None)
            if message.get("reasoning") and not message.get("reasoning_content"):
                message["reasoning_content"] = message["reasoning"]
            choice["finish_reason"] = _finish(choice.get("finish_reason"))
            choice.setdefault("logprobs", None)
            _fill_logprobs(choice)
        take_usage(ctx, completion)
        return completion

    def chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        # Runs for every streamed chunk: _ids, _top, _count and the common no-op helpers inlined.
        ids = ctx.state.get(self.name)
        if ids is None:
            ids = ctx.state[self.name] = _Ids()
        upstream_id = chunk.get("id")
        if isinstance(upstream_id, str) and upstream_id:
            ids._id = upstream_id
        else:
            chunk["id"] = ids.id
        chunk["object"] = "chat.completion.chunk"
        created = chunk.get("created")
        if not isinstance(created, int) or isinstance(created, bool):
            chunk["created"] = ids.created
        # Clients see the id they asked for, not the upstream's internal name.
        chunk["model"] = ctx.model or chunk.get("model") or ""
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            choices = chunk["choices"] = []
        repeated = False
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                choices[i] = choice = {}
            index = choice.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                index = choice["index"] = i
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
            if isinstance(delta.get("content"), list):
                _flat_text(delta)
            if choice.get("logprobs") is not None:
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
            usage = chunk["usage"] = fix_usage(usage)
            if usage is not None:
                ctx.usage = usage
        if repeated:
            # drop what only repeated a finish; keep anything else the chunk carries (text, usage)
            choices = [c for c in choices if c["delta"] or c["finish_reason"] or c.get("logprobs")]
            chunk["choices"] = choices
            if not choices and not usage:
                return []
        if not choices and usage:
            if not ctx.client_wants_usage:
                return []  # asked upstream for the request log's token counts, not by the client
            if not (ids.choices and ids.choices <= ids.finished):
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
