"""Tool-call synthesis on responses: legacy ``function_call`` → ``tool_calls``, unique ids,
JSON-string arguments, ``finish_reason: tool_calls``, and the JSON-tool heuristic: a reply whose whole
content is a JSON tool call becomes a structured call. The heuristic runs only when the request offered
``tools`` and the upstream has no tool parser of its own (``Adapter.native_tool_parser``). Streams get the
same."""

from __future__ import annotations

from typing import Any

import orjson

from imageworks_proxy import keys
from imageworks_proxy.pipeline.stage import ChatContext, Stage
from imageworks_proxy.wire.ids import tool_call_id


def json_arguments(value: Any) -> str:
    """Arguments as a JSON string: strings pass, objects are JSON-encoded (never Python repr)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "{}"
    return orjson.dumps(value).decode()


def tool_names(body: dict[str, Any]) -> frozenset[str]:
    """Names of the tools a reply may call; none when the request said ``tool_choice: "none"``."""
    if body.get("tool_choice") == "none":
        return frozenset()
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
        calls.append(
            {
                "id": tool_call_id(),
                "type": "function",
                "function": {"name": name, "arguments": json_arguments(args)},
            }
        )
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
            cid = tool_call_id()
        seen.add(cid)
        fixed.append(
            {
                "id": cid,
                "type": "function",
                "function": {"name": fn.get("name") or "", "arguments": json_arguments(fn.get("arguments"))},
            }
        )
    message["tool_calls"] = fixed
    return bool(fixed)


#: What the start of a reply says about it being a JSON tool call (see :func:`call_prefix`).
NOT_A_CALL, UNDECIDED, LOOKS_LIKE_A_CALL = 0, 1, 2


def call_prefix(text: str) -> int:
    """Can a reply starting with ``text`` still be a JSON tool call that :func:`calls_from_content` takes?

    ``NOT_A_CALL`` once the start rules it out (a ```python fence, ``{x}``, ``[1]``), ``LOOKS_LIKE_A_CALL``
    once it opens a JSON object with a key, ``UNDECIDED`` while too little has arrived to tell.
    """
    t = text.lstrip()
    if t.startswith("`"):
        if not t.startswith("```"):
            return UNDECIDED if "```".startswith(t) else NOT_A_CALL
        t = t[3:]
        if t[:4].lower() == "json":
            t = t[4:]
        elif len(t) < 4 and "json".startswith(t.lower()):
            return UNDECIDED  # the fence's language tag is still arriving
        t = t.lstrip()
    if t.startswith("["):
        t = t[1:].lstrip()
    if not t:
        return UNDECIDED
    if t[0] != "{":
        return NOT_A_CALL
    t = t[1:].lstrip()
    if not t:
        return UNDECIDED
    return LOOKS_LIKE_A_CALL if t[0] == '"' else NOT_A_CALL


class _StreamState:
    __slots__ = (
        "announced",
        "buffer",
        "buffering",
        "decided",
        "finish_seen",
        "index_at_pos",
        "index_by_id",
        "looks_like_call",
        "named",
        "next_index",
        "saw_calls",
        "template",
    )

    def __init__(self) -> None:
        self.index_by_id: dict[str, int] = {}
        #: for calls sent without index: the index last used at each position of a delta's list
        self.index_at_pos: dict[int, int] = {}
        self.announced: set[int] = set()
        self.named: set[int] = set()
        self.next_index = 0
        self.saw_calls = False
        self.buffering = False
        self.buffer: list[str] = []
        self.decided = False
        self.looks_like_call = False
        self.template: dict[str, Any] | None = None
        self.finish_seen = False


class ToolCallSynthesis(Stage):
    name = "tool-calls"
    order = 900

    def _names(self, ctx: ChatContext) -> frozenset[str]:
        """The tool names the JSON-tool heuristic looks for: none unless the request offered tools and the
        upstream does not parse tool calls itself (an upstream that does would only be slowed down: a
        streamed reply that starts like JSON is held back until it is decided)."""
        names = ctx.state.get("tool_names")
        if names is None:
            names = tool_names(ctx.body)
            if names and self._upstream_parses_calls(ctx):
                names = frozenset()
            ctx.state["tool_names"] = names
        return names

    def _upstream_parses_calls(self, ctx: ChatContext) -> bool:
        entry = ctx.entry
        if entry is None or self.app is None:
            return False  # the stage used on its own, with no routed backend to ask
        return keys.models(self.app).adapter_for(entry).native_tool_parser(entry)

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
        st = ctx.state.get(self.name)
        if st is None:
            st = ctx.state[self.name] = _StreamState()
        out: list[dict[str, Any]] = [chunk]
        for choice in choices:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            if "function_call" in delta or "tool_calls" in delta:
                self._fix_call_delta(st, delta)
            content = delta.get("content")
            if content and not st.decided and isinstance(content, str):
                if self._names(ctx):
                    out = self._maybe_buffer(ctx, st, chunk, choice, delta, content)
                else:
                    st.decided = True  # no tools offered: content is never a tool call; stop asking
            if choice.get("finish_reason") is not None:
                st.finish_seen = True
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
            index = call.get("index")
            cid = call.get("id")
            if not isinstance(index, int):
                if cid:
                    index = st.index_by_id.get(cid)
                    if index is None:
                        index = st.index_by_id[cid] = st.next_index
                else:  # a fragment with neither index nor id continues the call it follows
                    index = st.index_at_pos.get(pos, st.next_index)
                st.index_at_pos[pos] = index
            if index >= st.next_index:
                st.next_index = index + 1
            fn = call.get("function") if isinstance(call.get("function"), dict) else {}
            name = fn.get("name")
            args = fn.get("arguments")
            out: dict[str, Any] = {"index": index}
            if index not in st.announced:
                st.announced.add(index)
                if name:
                    st.named.add(index)
                out["id"] = cid or tool_call_id()
                out["type"] = "function"
                out["function"] = {
                    "name": name or "",
                    "arguments": "" if args is None else json_arguments(args),
                }
            elif name and index not in st.named:
                # the name came after the id: clients concatenate it onto the "" sent first
                st.named.add(index)
                out["function"] = {"name": name, "arguments": "" if args is None else json_arguments(args)}
            else:
                out["function"] = {"arguments": "" if args is None else json_arguments(args)}
            fixed.append(out)
        st.saw_calls = st.saw_calls or bool(fixed)
        delta["tool_calls"] = fixed

    def _maybe_buffer(self, ctx, st, chunk, choice, delta, content) -> list[dict[str, Any]]:
        """Hold back content that may be a JSON tool call; give it back as soon as it cannot be one."""
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
        if not st.looks_like_call:
            verdict = call_prefix("".join(st.buffer))
            if verdict == NOT_A_CALL:
                # ordinary text after all: it goes out now, in this chunk, and streams on from here
                delta["content"] = "".join(st.buffer) if len(st.buffer) > 1 else content
                st.buffer.clear()
                st.buffering, st.decided = False, True
                return [chunk]
            st.looks_like_call = verdict == LOOKS_LIKE_A_CALL
        del delta["content"]
        if delta or choice.get("finish_reason") is not None or chunk.get("usage"):
            return [chunk]  # what else it carries (role, finish, usage) still goes out
        return []

    def _flush_buffer(
        self, ctx: ChatContext, st: _StreamState, chunk: dict[str, Any]
    ) -> list[dict[str, Any]]:
        st.buffering, st.decided = False, True
        text = "".join(st.buffer)
        st.buffer.clear()
        base = dict(st.template or {k: v for k, v in chunk.items() if k not in ("choices", "usage")})
        calls = calls_from_content(text, self._names(ctx))
        if calls:
            st.saw_calls = True
            deltas = [{"index": i, **c} for i, c in enumerate(calls)]
            return [
                {**base, "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None}]}
            ]
        return [{**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}]

    def stream_end(self, ctx: ChatContext) -> list[dict[str, Any]]:
        st = ctx.state.get(self.name)
        if st is None:
            return []
        out = self._flush_buffer(ctx, st, {}) if st.buffering else []
        if st.saw_calls and not st.finish_seen:  # the upstream never said why it stopped
            out.append(
                {**(st.template or {}), "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
            )
        return out
