"""Request bodies: refused at once when declared too large, ``100 Continue`` only for requests that will be
served, and read within ``CHAT_PROXY_BODY_TIMEOUT_S`` (docs/security.md).

The middleware reads the whole body before the handler runs; ``request.read()`` in a handler then returns
the bytes already read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from imageworks_proxy import keys
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
#: The connection cannot carry another request once a body is left unread or half read.
CLOSE = {"Connection": "close"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def defer_continue(request: web.Request) -> None:
    """The routes' ``expect_handler``: instead of aiohttp's immediate ``100 Continue``, note that the client
    waits for one; the limits middleware sends it once the checks before it have passed."""
    request[keys.CONTINUE_PENDING] = True


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, "payload_too_large", f"The request body is over {limit} bytes (CHAT_PROXY_MAX_BODY_BYTES).",
        headers=CLOSE,
    )


async def _send_continue(request: web.Request) -> None:
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        raise ProxyError(
            417, "expectation_failed", "Only 'Expect: 100-continue' is supported.", headers=CLOSE
        )
    if request.version >= (1, 1) and request.pop(keys.CONTINUE_PENDING, False):
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # an interim answer: the real one has not started


async def _read_body(request: web.Request, timeout_s: float, limit: int) -> None:
    try:
        if request.content.is_eof():  # all of it has arrived (the usual small body): nothing to wait for
            await request.read()
        else:
            async with asyncio.timeout(timeout_s):
                await request.read()
    except TimeoutError:
        raise ProxyError(
            408, "request_timeout",
            f"The request body did not arrive within {timeout_s:g} s (CHAT_PROXY_BODY_TIMEOUT_S).",
            headers=CLOSE,
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except ConnectionError:
        raise ProxyError(499, "client_disconnected", "The client left while sending its request.",
                         headers=CLOSE) from None
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        # A body that cannot be decompressed or ends early (the cause is aiohttp's message).
        raise ProxyError(400, "invalid_request", f"The request body could not be read: {exc}",
                         headers=CLOSE) from None


def body_limits(config: Config) -> Middleware:
    """The middleware that applies the body limits; it runs after the Host, Origin and key checks, so a
    refused request never has its body read (and never gets ``100 Continue``)."""
    limit, timeout_s = config.max_body_bytes, config.body_timeout_s

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > limit:
            raise too_large(limit)
        if request.match_info.http_exception is None and request.body_exists:
            if "Expect" in request.headers:
                await _send_continue(request)
            await _read_body(request, timeout_s, limit)
        return await handler(request)

    return limits
