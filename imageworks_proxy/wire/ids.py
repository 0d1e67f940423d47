"""The ids the proxy mints: completion ids, tool-call ids and request ids, in OpenAI's shapes."""

from __future__ import annotations

import secrets


def completion_id() -> str:
    """``chatcmpl-<24 hex>``, for a completion whose upstream sent no id."""
    return "chatcmpl-" + secrets.token_hex(12)


def text_completion_id() -> str:
    """``cmpl-<24 hex>``, for a legacy text completion whose upstream sent no id."""
    return "cmpl-" + secrets.token_hex(12)


def tool_call_id() -> str:
    """``call_<24 hex>``, for a tool call whose upstream sent no (or a repeated) id."""
    return "call_" + secrets.token_hex(12)


def request_id() -> str:
    """``req_<24 hex>``, for a request that came without a usable ``X-Request-Id``."""
    return "req_" + secrets.token_hex(12)
