"""Upstream failures → the proxy's OpenAI-shaped errors, read from OpenAI, vLLM, FastAPI and Ollama
error bodies.

What a client is told is bounded and generic where the upstream said nothing useful: an upstream's own
error message is passed on (cut at :data:`MAX_MESSAGE_CHARS`), but HTML pages, upstream URLs and OS errors
stay in the proxy's log, tagged with the request id.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from imageworks_proxy.errors import ProxyError, backend_unavailable

log = logging.getLogger("imageworks_proxy.upstream")

#: An upstream's error message longer than this is cut before it reaches a client.
MAX_MESSAGE_CHARS = 1000


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def error_fields(body: Any) -> tuple[str | None, str | None, str | None, Any]:
    """(message, type, param, code) of an upstream error body, None where it has no such field.

    Reads OpenAI-style nested, vLLM flat, FastAPI ``detail`` and Ollama bodies.
    """
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or "") or None
            return message and _bounded(message), err.get("type"), err.get("param"), err.get("code")
        if isinstance(err, str):
            return _bounded(err), None, None, None
        if "message" in body:  # vLLM's flat {"object":"error","message":...,"code":400}
            return (
                _bounded(str(body.get("message") or "")) or None,
                body.get("type"),
                body.get("param"),
                body.get("code"),
            )
        detail = body.get("detail")
        if isinstance(detail, str):
            return _bounded(detail), None, None, None
        if detail is not None:
            return _bounded(orjson.dumps(detail).decode()), None, None, None
    return None, None, None, None


def json_error_message(raw: bytes) -> str | None:
    """The error message of a JSON error body (OpenAI, vLLM, FastAPI or Ollama shape), else ``None``
    (not JSON, or JSON that is not an error: an HTML 404 page is not a "model not found")."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if body == {"detail": "Not Found"}:
        return None  # FastAPI's answer for a path it does not serve (a base_url with the wrong path)
    return error_fields(body)[0]


def no_api_error(status: int, raw: bytes, where: str) -> ProxyError:
    """An error status whose body is no API error (an HTML page from a wrong ``base_url`` or a web server in
    front): 502, ``backend_rejected`` for a 4xx, ``backend_error`` for a 5xx; the page goes to the log."""
    log.warning("%s answered HTTP %d without an API error; the body began %r", where, status, raw[:300])
    if 400 <= status < 500:
        return ProxyError(
            502,
            "backend_rejected",
            f"{where} answered HTTP {status} without an API error; is its base_url in the registry right? "
            "The proxy log has the page it sent.",
        )
    return ProxyError(502, "backend_error", f"{where} failed with HTTP {status} and no error message.")


def upstream_error(status: int, raw: bytes, where: str) -> ProxyError:
    """An upstream error answer: a 4xx with an API error keeps its status, message and (string) code; a 5xx
    is 502 ``backend_error``; an error status without an API error body is :func:`no_api_error`."""
    if json_error_message(raw) is None:
        return no_api_error(status, raw, where)
    message, etype, param, code = error_fields(orjson.loads(raw))
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
    return ProxyError(502, "backend_error", f"{where} failed (HTTP {status}): {message}")


def in_band_error(obj: dict[str, Any], where: str) -> ProxyError:
    """An ``{"error": ...}`` event inside an upstream stream."""
    message, _etype, _param, code = error_fields(obj)
    return ProxyError(
        502,
        code if isinstance(code, str) and code else "backend_error",
        f"{where} reported an error mid-stream: {message or 'unknown error'}",
    )


def unreachable(where: str, request_id: str, detail: str, hint: str = "is it running?") -> ProxyError:
    """503 ``backend_unavailable`` naming ``where``; ``detail`` (the URL, the OS error) goes to the log
    only."""
    log.warning("request %s: %s is unreachable: %s", request_id, where, detail)
    return backend_unavailable(f"{where} is unreachable; {hint}")


def transport_failed(where: str, request_id: str, exc: BaseException, what: str = "failed") -> ProxyError:
    """502 ``backend_error`` for a broken connection; the exception's text (addresses) goes to the log
    only."""
    log.warning("request %s: %s %s: %s: %s", request_id, where, what, type(exc).__name__, exc)
    return ProxyError(502, "backend_error", f"{where} {what} ({type(exc).__name__}).")
