"""Ollama native ``/api/chat`` -> OpenAI Chat Completions: the answer's translation, pure (no I/O).

:func:`completion_from_ollama` builds a ``chat.completion`` from a non-streamed reply;
:class:`ChunkTranslator` turns the NDJSON lines of a stream (split by
:class:`~imageworks_proxy.upstream.ndjson.NdjsonSplitter`) into ``chat.completion.chunk`` dicts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.upstream.errors import error_fields
from imageworks_proxy.wire import ids


def _arguments_json(raw: Any) -> str:
    if isinstance(raw, str):
        return raw if raw.strip() else "{}"
    return orjson.dumps(raw if raw is not None else {}).decode()


def _finish_reason(done_reason: Any, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _wrong(value: Any, what: str) -> ProxyError:
    return ProxyError(502, "backend_error", f"Ollama sent {what} of the wrong type ({type(value).__name__}).")


def _expect(value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """``value`` when it is None or of ``types`` (true/false are not numbers); otherwise Ollama sent JSON
    of the wrong shape: 502."""
    if value is None or (isinstance(value, types) and not isinstance(value, bool)):
        return value
    raise _wrong(value, what)


def usage_from(data: Mapping[str, Any]) -> dict[str, int]:
    prompt = _expect(data.get("prompt_eval_count"), int, "prompt_eval_count") or 0
    completion = _expect(data.get("eval_count"), int, "eval_count") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The reply's ``message`` ({} when absent), its text fields and tool calls checked for type."""
    msg = _expect(data.get("message"), Mapping, "a message") or {}
    for field in ("content", "thinking"):
        _expect(msg.get(field), str, f"message.{field}")
    for call in _expect(msg.get("tool_calls"), list, "message.tool_calls") or ():
        if not isinstance(call, Mapping):
            raise _wrong(call, "a tool call")
        fn = _expect(call.get("function"), Mapping, "a tool function") or {}
        _expect(fn.get("name"), str, "a tool name")
        _expect(fn.get("arguments"), (Mapping, str), "tool arguments")
    return msg


def _tool_call(call: Mapping[str, Any]) -> tuple[str, str, str]:
    """(id, name, JSON arguments) of one Ollama tool call (checked by :func:`_message`)."""
    fn = call.get("function") or {}
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = ids.tool_call_id()
    return call_id, fn.get("name") or "", _arguments_json(fn.get("arguments"))


def completion_from_ollama(
    data: Mapping[str, Any], *, model: str, completion_id: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """A ``chat.completion`` for a non-streamed ``/api/chat`` reply; ``model`` is the id the client
    asked for. Raises :class:`ProxyError` 502 when a field has the wrong type (``tool_calls: 5``)."""
    msg = _message(data)
    content = msg.get("content") or ""
    calls = [_tool_call(c) for c in msg.get("tool_calls") or ()]
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in calls
        ]
        if not content:
            message["content"] = None
    thinking = msg.get("thinking")
    if isinstance(thinking, str) and thinking:
        message["reasoning_content"] = thinking
    return {
        "id": completion_id or ids.completion_id(),
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(data.get("done_reason"), bool(calls)),
            }
        ],
        "usage": usage_from(data),
    }


def stream_line(line: Any) -> Mapping[str, Any]:
    """One NDJSON line of an Ollama stream (``/api/chat`` or ``/api/generate``), checked: a line that is not
    a JSON object, or that carries Ollama's ``error``, is a 502 ``backend_error``."""
    if not isinstance(line, Mapping):
        raise ProxyError(502, "backend_error", "Ollama sent a stream line that is not a JSON object")
    if "error" in line:
        message = error_fields(line)[0] or "unknown error"
        raise ProxyError(502, "backend_error", f"Ollama error: {message}")
    return line


class ChunkTranslator:
    """Turns ``/api/chat`` NDJSON lines into ``chat.completion.chunk`` dicts for one stream.

    Feed every decoded line to :meth:`feed`; it returns the chunks to send (role first; content and
    reasoning deltas; each tool call as one delta with index, id, type, name and its JSON arguments, since
    Ollama sends calls whole; on ``done`` the finish chunk and, with ``include_usage``, the usage chunk).
    Raises :class:`ProxyError` 502 for an ``{"error": ...}`` line and for fields of the wrong type.
    """

    def __init__(self, *, model: str, include_usage: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = ids.completion_id()
        self.created = int(time.time())
        self.finished = False
        self.usage: dict[str, int] | None = None
        self._started = False
        self._tool_calls = 0

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def feed(self, line: Any) -> list[dict[str, Any]]:
        line = stream_line(line)
        out: list[dict[str, Any]] = []
        if not self._started:
            self._started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        msg = _message(line)
        # Oversized deltas are cut into pieces by the SSE writer (sse.py), so each field goes out whole here.
        thinking = msg.get("thinking")
        if isinstance(thinking, str) and thinking:
            out.append(self._chunk({"reasoning_content": thinking}))
        content = msg.get("content")
        if isinstance(content, str) and content:
            out.append(self._chunk({"content": content}))
        for call in msg.get("tool_calls") or ():
            index = self._tool_calls
            self._tool_calls += 1
            call_id, name, args = _tool_call(call)
            first = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            out.append(self._chunk({"tool_calls": [first]}))
        if line.get("done"):
            self.finished = True
            self.usage = usage_from(line)
            out.append(self._chunk({}, _finish_reason(line.get("done_reason"), self._tool_calls > 0)))
            if self.include_usage:
                out.append(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": self.usage,
                    }
                )
        return out
