"""Tool-call synthesis on responses (SPEC §6.9): legacy ``function_call`` → ``tool_calls``, unique ids,
JSON-string arguments, ``finish_reason: tool_calls``, and (only when the request offered ``tools``) a
reply whose whole content is a JSON tool call becomes a structured call. Streams get the same."""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from imageworks_proxy.pipeline import ChatContext, Stage


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def json_arguments(value: Any) -> str:
    """Arguments as a JSON string: strings pass, objects are JSON-encoded (never Python repr)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "{}"
    return orjson.dumps(value).decode()


def tool_names(body: dict[str, Any]) -> frozenset[str]:
    names = set()
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            fn = tool.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
    return frozenset(names)


def _strip_fence(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text[3:]
        if text[:4].lower() == "json":
            text = text[4:]
        if text.endswith("```"):
            text = text[:-3]
    return text.strip()


def calls_from_content(content: str, names: frozenset[str]) -> list[dict[str, Any]] | None:
    """Tool calls when ``content`` is nothing but a JSON call (or list of calls) naming offered tools."""
    text = _strip_fence(content)
    if not text or text[0] not in "[{":
        return None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        fn = item.get("function") if isinstance(item.get("function"), dict) else item
        name = fn.get("name")
        if name not in names:
            return None
        args = fn.get("arguments", fn.get("parameters", {}))
        calls.append({"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": json_arguments(args)}})
    return calls or None


def normalise_message(message: dict[str, Any], names: frozenset[str]) -> bool:
    """Rewrite one non-streamed message in place; True when it carries tool calls afterwards."""
    calls = message.get("tool_calls")
    legacy = message.pop("function_call", None)
    if not calls and isinstance(legacy, dict) and legacy.get("name"):
        calls = [{"function": legacy}]
    if not calls and names and isinstance(message.get("content"), str):
        calls = calls_from_content(message["content"], names)
        if calls:
            message["content"] = None
    if not calls:
        if calls is not None and "tool_calls" in message:
            del message["tool_calls"]  # an empty list is not a valid tool_calls value for clients
        return False
    seen: set[str] = set()
    fixed = []
    for call in calls:
        if not isinstance(call, dict):
            continue
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        cid = call.get("id")
        if not isinstance(cid, str) or not cid or cid in seen:
            cid = new_call_id()
        seen.add(cid)
        fixed.append({"id": cid, "type": "function",
                      "function": {"name": fn.get("name") or "", "arguments": json_arguments(fn.get("arguments"))}})
    message["tool_calls"] = fixed
    return bool(fixed)


class _StreamState:
    __slots__ = ("index_by_key", "announced", "next_index", "saw_calls", "buffering", "buffer", "decided", "template")

    def __init__(self) -> None:
        self.index_by_key: dict[Any, int] = {}
        self.announced: set[int] = set()
        self.next_index = 0
        self.saw_calls = False
        self.buffering = False
        self.buffer: list[str] = []
        self.decided = False
        self.template: dict[str, Any] | None = None


class ToolCallSynthesis(Stage):
    name = "tool-calls"
    order = 900

    def _names(self, ctx: ChatContext) -> frozenset[str]:
        names = ctx.state.get("tool_names")
        if names is None:
            names = ctx.state["tool_names"] = tool_names(ctx.body)
        return names

    def response(self, ctx: ChatContext, completion: dict[str, Any]) -> dict[str, Any]:
        if self.config.disable_tool_normalization:
            return completion
        names = self._names(ctx)
        for choice in completion.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and normalise_message(message, names):
                choice["finish_reason"] = "tool_calls"
        return completion

    # -- streaming -----------------------------------------------------------------------------
    def _state(self, ctx: ChatContext) -> _StreamState:
        st = ctx.state.get(self.name)
        if st is None:
            st = ctx.state[self.name] = _StreamState()
        return st

    def chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if self.config.disable_tool_normalization:
            return [chunk]
        choices = chunk.get("choices")
        if not choices:
            return [chunk]
        st = self._state(ctx)
        out: list[dict[str, Any]] = [chunk]
        for choice in choices:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            if "function_call" in delta or "tool_calls" in delta:
                self._fix_call_delta(st, delta)
            content = delta.get("content")
            if isinstance(content, str) and content and not st.decided and self._names(ctx):
                out = self._maybe_buffer(ctx, st, chunk, choice, delta, content)
            if choice.get("finish_reason") is not None:
                if st.buffering:
                    out = self._flush_buffer(ctx, st, chunk) + out
                if st.saw_calls and choice["finish_reason"] in ("stop", "function_call"):
                    choice["finish_reason"] = "tool_calls"
        return out

    def _fix_call_delta(self, st: _StreamState, delta: dict[str, Any]) -> None:
        legacy = delta.pop("function_call", None)
        calls = delta.get("tool_calls")
        if legacy is not None and not calls:
            calls = [{"index": 0, "function": legacy}] if isinstance(legacy, dict) else []
        if not calls:
            delta.pop("tool_calls", None)
            return
        fixed = []
        for pos, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            key = call.get("index")
            if not isinstance(key, int):
                key = ("id", call["id"]) if call.get("id") else ("pos", pos)
            index = st.index_by_key.get(key)
            if index is None:
                index = st.index_by_key[key] = key if isinstance(key, int) else st.next_index
                st.next_index = max(st.next_index, index + 1)
            fn = call.get("function") if isinstance(call.get("function"), dict) else {}
            out: dict[str, Any] = {"index": index}
            if index not in st.announced:
                st.announced.add(index)
                out["id"] = call.get("id") or new_call_id()
                out["type"] = "function"
                out["function"] = {"name": fn.get("name") or "", "arguments": json_arguments(fn.get("arguments", ""))}
            else:
                args = fn.get("arguments")
                out["function"] = {"arguments": json_arguments(args) if args is not None else ""}
            fixed.append(out)
        st.saw_calls = st.saw_calls or bool(fixed)
        delta["tool_calls"] = fixed

    def _maybe_buffer(self, ctx, st, chunk, choice, delta, content) -> list[dict[str, Any]]:
        if not st.buffering:
            head = content.lstrip()
            if not head:
                return [chunk]
            if head[0] not in "[{`":
                st.decided = True
                return [chunk]
            st.buffering = True
            st.template = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        st.buffer.append(content)
        del delta["content"]
        if len(delta) == 0 or (len(delta) == 1 and "role" in delta):
            # keep a role-only delta so the client still sees the assistant start
            return [chunk] if "role" in delta else []
        return [chunk]

    def _flush_buffer(self, ctx: ChatContext, st: _StreamState, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        st.buffering, st.decided = False, True
        text = "".join(st.buffer)
        st.buffer.clear()
        base = dict(st.template or {k: v for k, v in chunk.items() if k not in ("choices", "usage")})
        calls = calls_from_content(text, self._names(ctx))
        if calls:
            st.saw_calls = True
            deltas = [{"index": i, **c} for i, c in enumerate(calls)]
            return [{**base, "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None}]}]
        return [{**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}]

    def stream_end(self, ctx: ChatContext) -> list[dict[str, Any]]:
        st = ctx.state.get(self.name)
        if st is not None and st.buffering:
            return self._flush_buffer(ctx, st, {})
        return []
