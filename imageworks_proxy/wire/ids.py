"""The ids the proxy mints: completion ids, tool-call ids and request ids, in OpenAI's shapes."""

from __future__ import annotations

import random
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
    """``req_<24 hex>``, for a request that came without a usable ``X-Request-Id``.

    Drawn from :mod:`random` (reseeded in a forked child), not :mod:`secrets`: a request id only has to
    be unique, and ``secrets`` costs a ``getrandom`` system call on every request. The ids a client could
    build on (completion and tool-call ids) stay unpredictable.
    """
    return f"req_{random.getrandbits(96):024x}"
