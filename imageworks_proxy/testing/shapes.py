"""The fields every OpenAI chat completion, stream chunk and error carries, checked without a schema library.

These are the required fields of the official OpenAI schemas (``CreateChatCompletionResponse``,
``CreateChatCompletionStreamResponse``, ``ErrorResponse``) that clients such as the ``openai`` SDK and
OpenWebUI read. Each check raises ``AssertionError`` naming the first missing or mistyped field.
"""

from __future__ import annotations

from typing import Any

#: ``finish_reason`` values a client understands.
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_TEXT_OR_NULL = (str, type(None))


def _field(obj: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    assert isinstance(obj, dict) and key in obj, f"{where}: no {key!r} in {obj!r}"
    assert isinstance(obj[key], kinds), f"{where}.{key}: {obj[key]!r} has the wrong type"
    return obj[key]


def _head(body: Any, kind: str) -> list[Any]:
    assert _field(body, "object", str, kind) == kind, f"object is {body['object']!r}, not {kind!r}"
    _field(body, "id", str, kind)
    _field(body, "created", int, kind)
    _field(body, "model", str, kind)
    return _field(body, "choices", list, kind)


def check_completion(body: Any) -> None:
    """Assert that ``body`` is a non-streamed ``chat.completion`` a client can read."""
    for n, choice in enumerate(_head(body, "chat.completion")):
        where = f"choices[{n}]"
        _field(choice, "index", int, where)
        assert choice.get("finish_reason") in FINISH_REASONS, f"{where}.finish_reason: {choice!r}"
        assert "logprobs" in choice, f"{where}: no 'logprobs' in {choice!r}"
        message = _field(choice, "message", dict, where)
        assert message.get("role") == "assistant", f"{where}.message.role: {message!r}"
        _field(message, "content", _TEXT_OR_NULL, f"{where}.message")
        _field(message, "refusal", _TEXT_OR_NULL, f"{where}.message")


def check_chunk(chunk: Any) -> None:
    """Assert that ``chunk`` is a ``chat.completion.chunk`` a client can read (``choices`` may be empty:
    the usage chunk)."""
    for n, choice in enumerate(_head(chunk, "chat.completion.chunk")):
        where = f"choices[{n}]"
        _field(choice, "index", int, where)
        _field(choice, "delta", dict, where)
        finish = _field(choice, "finish_reason", _TEXT_OR_NULL, where)
        assert finish is None or finish in FINISH_REASONS, f"{where}.finish_reason: {finish!r}"


def check_error(body: Any) -> None:
    """Assert that ``body`` is an error in the OpenAI shape: ``{"error": {message, type, param, code}}``."""
    error = _field(body, "error", dict, "error response")
    _field(error, "message", str, "error")
    _field(error, "type", str, "error")
    _field(error, "param", _TEXT_OR_NULL, "error")
    _field(error, "code", _TEXT_OR_NULL, "error")
