"""The OpenAI error shape and the proxy's error codes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """The OpenAI ``error.type`` for a status: client errors by kind, everything else ``server_error``."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


class ProxyError(Exception):
    """A failure the client sees as ``{"error": {...}}`` with an HTTP status.

    Raise it anywhere on the request path; the error middleware (or, once a stream has begun, the
    streaming writer) turns it into the response. ``headers`` are added to the response
    (``Retry-After`` for 503s).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type or error_type(status)
        self.hint = hint
        self.headers = dict(headers or {})

    def payload(self, request_id: str | None = None) -> dict[str, Any]:
        err: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.hint:
            err["hint"] = self.hint
        if request_id:
            err["request_id"] = request_id
        return {"error": err}

    def response(self, request_id: str | None = None) -> web.Response:
        headers = dict(self.headers)
        if request_id:
            headers["X-Request-Id"] = request_id
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.payload(request_id)),
            content_type="application/json",
            headers=headers,
        )

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.code!r}, {self.message!r})"


def invalid_request(message: str, param: str | None = None) -> ProxyError:
    return ProxyError(400, "invalid_request", message, param=param)


def model_not_found(message: str) -> ProxyError:
    return ProxyError(404, "model_not_found", message, param="model")


def backend_unavailable(message: str, retry_after: int = 5) -> ProxyError:
    return ProxyError(503, "backend_unavailable", message, headers={"Retry-After": str(retry_after)})
