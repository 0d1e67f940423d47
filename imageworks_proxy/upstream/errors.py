"""Upstream failures → the proxy's OpenAI-shaped errors, read from OpenAI, vLLM, FastAPI and Ollama
error bodies."""

from __future__ import annotations

from typing import Any

import orjson

from imageworks_proxy.errors import ProxyError


def error_fields(body: Any) -> tuple[str | None, str | None, str | None, Any]:
    """(message, type, param, code) of an upstream error body, None where it has no such field.

    Reads OpenAI-style nested, vLLM flat, FastAPI ``detail`` and Ollama bodies.
    """
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return (str(err.get("message") or "") or None, err.get("type"), err.get("param"), err.get("code"))
        if isinstance(err, str):
            return err, None, None, None
        if "message" in body:  # vLLM's flat {"object":"error","message":...,"code":400}
            return (
                str(body.get("message") or "") or None,
                body.get("type"),
                body.get("param"),
                body.get("code"),
            )
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail, None, None, None
        if detail is not None:
            return orjson.dumps(detail).decode(), None, None, None
    return None, None, None, None


def parse_error_body(raw: bytes) -> tuple[str | None, str | None, str | None, Any]:
    try:
        return error_fields(orjson.loads(raw))
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        return (text[:500] or None), None, None, None


def json_error_message(raw: bytes) -> str | None:
    """The error message of a JSON error body (OpenAI, vLLM, FastAPI or Ollama shape), else ``None``
    (not JSON, or JSON that is not an error: an HTML 404 page is not a "model not found")."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return error_fields(body)[0]


def upstream_error(status: int, raw: bytes, where: str) -> ProxyError:
    """An upstream error answer: 4xx keep status, message and (string) code; 5xx become 502."""
    message, etype, param, code = parse_error_body(raw)
    if 400 <= status < 500:
        code_str = (
            code
            if isinstance(code, str) and code
            else ("model_not_found" if status == 404 else "backend_rejected")
        )
        return ProxyError(
            status,
            code_str,
            message or f"{where} rejected the request (HTTP {status}).",
            param=param if isinstance(param, str) else None,
            type=etype if isinstance(etype, str) and etype.endswith("_error") else None,
        )
    return ProxyError(502, "backend_error", f"{where} failed (HTTP {status}): {message or 'no details'}")


def in_band_error(obj: dict[str, Any], where: str) -> ProxyError:
    """An ``{"error": ...}`` event inside an upstream stream."""
    message, _etype, _param, code = error_fields(obj)
    return ProxyError(
        502,
        code if isinstance(code, str) and code else "backend_error",
        f"{where} reported an error mid-stream: {message or 'unknown error'}",
    )
