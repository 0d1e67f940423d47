"""aiohttp middlewares for HTTP concerns only: the access log, request ids, the error envelope and API and
admin keys (docs/security.md)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import CHAT, COMPLETIONS, EMBEDDINGS
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.keys import REQUEST_ID
from imageworks_proxy.pipeline.stage import ChatContext
from imageworks_proxy.wire import ids

log = logging.getLogger("imageworks_proxy.http")
access_log = logging.getLogger("imageworks_proxy.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
#: Route names that never need an API key (the status page's shell and files hold no data).
PUBLIC_ROUTES = frozenset({"health", "status_page", "status_asset"})
#: Routes polled by health checks, scrapers and the status page: their access lines are DEBUG, not INFO.
QUIET_ROUTES = frozenset({"health", "metrics", "prometheus", "status", "status_asset"})
#: Routes served by adapters, with the route each serves (``ChatContext.endpoint``): their requests count
#: as in flight in the metrics and each ends in one request-log record, even when refused before the view.
ADAPTER_ROUTES = {"chat": CHAT, "embeddings": EMBEDDINGS, "completions": COMPLETIONS}
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\"\\]")
#: The access line after the log's own prefix: method, path, model, status, error, ms, request id.
ACCESS_FORMAT = "%s %s%s status=%d%s %.1fms rid=%s"


def request_id(request: web.Request) -> str:
    rid = request.get(REQUEST_ID)
    if rid is None:
        incoming = request.headers.get("X-Request-Id", "")
        rid = incoming if _SANE_ID.match(incoming) else ids.request_id()
        request[REQUEST_ID] = rid
    return rid


def _http_exception_error(exc: web.HTTPException) -> ProxyError:
    status = exc.status
    if status == 404:
        return ProxyError(
            404,
            "not_found",
            "Unknown route. The proxy serves /v1/models, /v1/chat/completions, /v1/embeddings, "
            "/v1/completions, /v1/health.",
        )
    if status == 405:
        return ProxyError(
            405, "method_not_allowed", f"Method not allowed here; allowed: {exc.headers.get('Allow', '')}"
        )
    if status == 413:
        return ProxyError(413, "payload_too_large", f"Request body too large: {exc.text or ''}".strip())
    return ProxyError(status, "http_error", exc.reason or str(status))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the OpenAI error shape with the request id; never a bare 500."""
    rid = request_id(request)
    try:
        resp = await handler(request)
    except ProxyError as exc:
        resp = exc.response(rid)
        _record_refused_chat(request, exc, rid)
        if exc.headers.get("Connection", "").lower() == "close":
            resp.force_close()  # the body was left unread: this connection cannot carry another request
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = _http_exception_error(exc)
        resp = err.response(rid)
        _record_refused_chat(request, err, rid)
        if exc.status == 405 and "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        log.exception("unhandled error in %s %s (request %s)", request.method, request.path, rid)
        resp = ProxyError(
            500, "internal_error", f"Internal error; see the proxy log for request {rid}."
        ).response(rid)
    if not resp.prepared:
        resp.headers["X-Request-Id"] = rid
    return resp


def _record_refused_chat(request: web.Request, err: ProxyError, rid: str) -> None:
    """A request on an adapter route (chat, embeddings, text completions) refused before its handler ran
    (bad key, origin, host, size) still gets its one request-log record and metrics sample, like every
    such request."""
    endpoint = ADAPTER_ROUTES.get(getattr(request.match_info.route, "name", None))
    if endpoint is None or keys.CHAT_CONTEXT in request:
        return
    ctx = ChatContext(
        request_id=rid, body={}, app=request.app, status=err.status, error_code=err.code, endpoint=endpoint
    )
    request[keys.CHAT_CONTEXT] = ctx  # the access line shows the error code too
    try:
        keys.pipeline(request.app).for_endpoint(endpoint).run_finish(ctx)
    except Exception:
        log.exception("recording refused request %s failed", rid)


def is_admin_route(request: web.Request) -> bool:
    """The ``/v1/admin/*`` routes (and plugin routes named ``admin_*``): they start and stop models."""
    name = getattr(request.match_info.route, "name", None) or ""
    return name.startswith("admin") or "/v1/admin/" in request.path + "/"


def _bearer_token(request: web.Request) -> bytes | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # Header bytes that are not UTF-8 arrive as surrogates; they cannot match a key but must not crash.
    token_bytes = token.strip().encode("utf-8", "surrogateescape")
    return token_bytes if scheme.lower() == "bearer" and token_bytes else None


def _unauthorized(setting: str) -> ProxyError:
    return ProxyError(
        401,
        "invalid_api_key",
        f"Missing or invalid API key. Send 'Authorization: Bearer <key>' with one of {setting}.",
        headers={"WWW-Authenticate": "Bearer"},
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """When ``CHAT_PROXY_API_KEYS`` is set, every route but health needs ``Authorization: Bearer <key>``;
    when ``CHAT_PROXY_ADMIN_KEYS`` is set, the admin routes need one of those (and they work everywhere)."""
    config = keys.config(request.app)
    if getattr(request.match_info.route, "name", None) in PUBLIC_ROUTES:
        return await handler(request)
    token = _bearer_token(request)
    admin_ok = token is not None and _any_key_matches(token, config.admin_keys)
    api_ok = token is not None and _any_key_matches(token, config.api_keys)
    if is_admin_route(request) and config.admin_keys:
        if api_ok and not admin_ok:
            raise ProxyError(
                403,
                "admin_key_required",
                "This key may chat but not manage models. "
                "The admin routes need one of CHAT_PROXY_ADMIN_KEYS.",
            )
        if not admin_ok:
            raise _unauthorized("CHAT_PROXY_ADMIN_KEYS")
    elif config.api_keys and not (api_ok or admin_ok):
        raise _unauthorized("CHAT_PROXY_API_KEYS")
    return await handler(request)


def _any_key_matches(token: bytes, api_keys: tuple[str, ...]) -> bool:
    # Compare against every key, always, so timing does not reveal which key or prefix matched.
    found = False
    for key in api_keys:
        found |= hmac.compare_digest(token, key.encode("utf-8", "surrogateescape"))
    return found


def _clean(text: str, limit: int) -> str:
    """Client-supplied text for a log line: no control characters (no forged lines), bounded length."""
    text = text[:limit]
    if text.isprintable() and '"' not in text and "\\" not in text:  # the usual case, without a regex
        return text
    return _UNSAFE.sub("?", text)


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request: method, path, model, status, ms and request id (never bodies or headers).

    Outermost middleware, so it sees the final status of error responses too. Also counts requests on the
    adapter routes (chat, embeddings, text completions) in flight for the metrics.
    """
    started = time.perf_counter()
    rid = request_id(request)
    route = request.match_info.route
    route_name = getattr(route, "name", None)
    metrics = request.app.get(keys.METRICS) if route_name in ADAPTER_ROUTES else None
    if metrics is not None:
        metrics.in_flight += 1
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:  # redirects and the like; errors were turned into responses already
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        if metrics is not None:
            metrics.in_flight -= 1
        level = logging.DEBUG if route_name in QUIET_ROUTES else logging.INFO
        if access_log.isEnabledFor(level):
            ctx = request.get(keys.CHAT_CONTEXT)
            model = getattr(ctx, "model", None)
            error = getattr(ctx, "error_code", None)
            args = (
                request.method,
                _clean(request.path, 200),
                f' model="{_clean(model, 120)}"' if model else "",
                status,
                f" error={error}" if error else "",
                (time.perf_counter() - started) * 1000,
                rid,
            )
            direct = request.app.get(keys.ACCESS_LINES)
            if direct is None or not direct(level, ACCESS_FORMAT, args):
                access_log.log(level, ACCESS_FORMAT, *args)
