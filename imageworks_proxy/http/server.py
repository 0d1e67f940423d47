"""How ``imageworks-chat-proxy`` serves the app: aiohttp's runner with the protections a trusted local
service needs against slow and flooding clients (docs/security.md).

- A request's line and headers must arrive within ``CHAT_PROXY_HEADER_TIMEOUT_S`` once they begin
  (aiohttp only times out connections that send nothing): 408, and the connection is closed.
- At most ``CHAT_PROXY_MAX_CONNECTIONS`` client connections, and never more than half the process's
  open-file limit, so upstream connections and log files always find a descriptor: past the cap the oldest
  idle connection (keep-alive, or a head still arriving) is closed; with none idle the newcomer gets 503.
- HTTP that aiohttp's parser refuses (too many or too long headers, unknown methods, undecodable bodies)
  is answered in the OpenAI error shape and logged in one line, instead of plain text and a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from http import HTTPStatus
from typing import Any

import attrs
import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, ContentEncodingError, LineTooLong

from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.wire import ids
from imageworks_proxy.wire.writes import BatchedTransport, WriteBatch

log = logging.getLogger("imageworks_proxy.http")
#: After answering a request whose body (or head) it will not read, how long the server keeps reading and
#: dropping what arrives, so that the client sees the answer instead of a reset.
LINGER_S = 2.0
CAP_WARNING_INTERVAL_S = 60.0


def connection_cap(configured: int) -> int:
    """``CHAT_PROXY_MAX_CONNECTIONS``, lowered to half the open-file limit when that is smaller."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft // 2))


@attrs.frozen
class ServerLimits:
    """The connection-level limits, from the configuration (the cap already lowered to the file limit)."""

    header_timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, config: Config) -> ServerLimits:
        return cls(config.header_timeout_s, connection_cap(config.max_connections))


def raw_error(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer in the OpenAI shape, for moments without a request object."""
    rid = ids.request_id()
    body = orjson.dumps(ProxyError(status, code, message).payload(rid))
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Request-Id: {rid}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _parse_error(status: int, exc: BaseException | None) -> ProxyError:
    text = str(exc).lower()
    if isinstance(exc, LineTooLong) or "too many headers" in text:
        return ProxyError(431, "headers_too_large", "The request line or headers are too long or too many.")
    if isinstance(exc, ContentEncodingError) and "install" in text:  # br or zstd without their library
        return ProxyError(
            415, "unsupported_content_encoding",
            "The request body's Content-Encoding is not supported; send it plain, gzip or deflate.",
            headers={"Accept-Encoding": "gzip, deflate"},
        )
    if isinstance(exc, ContentEncodingError):
        return ProxyError(400, "invalid_request", "The request body could not be decompressed.")
    if isinstance(exc, BadHttpMethod):
        return ProxyError(400, "invalid_request", "Not an HTTP request the proxy understands (bad method).")
    return ProxyError(status, "invalid_request", "Malformed HTTP request.")


def _reason(exc: BaseException | None) -> str:
    """The parser's complaint for the log: one line, printable, bounded (it may quote the client's bytes)."""
    if exc is None:
        return "no details"
    text = getattr(exc, "message", None) or str(exc)  # aiohttp's parse errors keep theirs in .message
    first = (str(text).splitlines() or [""])[0]
    return "".join(c if c.isprintable() else "?" for c in f"{type(exc).__name__}: {first}")[:200]


class ProxyRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with a deadline on request heads and OpenAI-shaped parse errors."""

    __slots__ = ("_batch", "_closing_at", "_draining", "_head_timer", "_last_payload", "_limits")

    def __init__(
        self, manager: web.Server, *, limits: ServerLimits, batch: WriteBatch, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._batch = batch
        self._head_timer: asyncio.TimerHandle | None = None
        self._closing_at: asyncio.TimerHandle | None = None
        self._draining = False
        self._last_payload: Any = None

    @property
    def idle(self) -> bool:
        """Open, and neither serving a request nor holding a complete one: keep-alive, or a head arriving."""
        return self.transport is not None and not self._request_in_progress and not self._messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Answers leave at the end of the tick, with the others written in it (wire/writes.py).
        super().connection_made(BatchedTransport(transport, self._batch))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return  # answered and closing: what the client still sends is dropped
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a complete head arrived
            self._last_payload = self._messages[-1][1] if self._messages else None
            self._stop_head_timer()
        elif self._head_timer is None and self.idle and self._reading_a_head() and not self._close:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self._limits.header_timeout_s, self._head_timed_out, count)

    def _reading_a_head(self) -> bool:
        # Bytes while the last request's body is complete belong to the next request's head.
        payload = self._last_payload
        return not self._upgraded and (payload is None or payload.is_eof())

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, count: int) -> None:
        self._head_timer = None
        if self._request_count != count or self.transport is None or self._request_in_progress:
            return
        log.info("closed a connection from %s: request head not complete within %g s",
                 self._peer(), self._limits.header_timeout_s)
        self.refuse(
            408, "request_timeout",
            f"The request line and headers did not arrive within {self._limits.header_timeout_s:g} s "
            "(CHAT_PROXY_HEADER_TIMEOUT_S).",
        )

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer without a request (a head too slow, a connection over the cap) and close.

        The connection is half-closed at once and fully closed ``LINGER_S`` later, reading and dropping
        whatever still arrives: closing with unread data resets the connection, and a reset can destroy
        the answer before the client has read it.
        """
        transport = self.transport
        if transport is None or self._draining:
            return
        self._draining = True
        self._stop_head_timer()
        transport.write(raw_error(status, code, message))
        if transport.can_write_eof():
            transport.write_eof()
        self._closing_at = asyncio.get_running_loop().call_later(LINGER_S, self.force_close)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._closing_at is not None:
            self._closing_at.cancel()
        super().connection_lost(exc)

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "?"

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp calls this for requests its parser refused (and for errors no middleware caught)."""
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already under way; it cannot be replaced by an error")
        rid = ids.request_id()
        if status >= 500:
            log.error("unhandled error answering %s (request %s)", request.remote, rid, exc_info=exc)
            err = ProxyError(status, "internal_error", f"Internal error; see the proxy log for request {rid}")
        else:
            err = _parse_error(status, exc)
            log.info("malformed HTTP request from %s: %d %s (%s) rid=%s", self._peer(), err.status, err.code,
                     _reason(exc), rid)
        resp = err.response(rid)
        resp.force_close()
        return resp


class ProxyServer(web.Server):
    """aiohttp's server with :class:`ProxyRequestHandler` connections and the connection cap."""

    def __init__(self, handler: Any, *, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._warned_at = -CAP_WARNING_INTERVAL_S
        self._batch = WriteBatch(self._loop)

    def __call__(self) -> ProxyRequestHandler:
        return ProxyRequestHandler(
            self, loop=self._loop, limits=self._limits, batch=self._batch, **self._kwargs
        )

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        live = [c for c in self.connections if c.transport is not None]
        if len(live) > self._limits.max_connections:
            self._make_room(handler, live)

    def _make_room(self, newcomer: web.RequestHandler, live: list[web.RequestHandler]) -> None:
        now = time.monotonic()
        if now - self._warned_at >= CAP_WARNING_INTERVAL_S:
            self._warned_at = now
            log.warning("%d client connections open (cap %d, CHAT_PROXY_MAX_CONNECTIONS or half the "
                        "open-file limit): closing idle ones to make room", len(live) - 1,
                        self._limits.max_connections)
        for conn in live:  # oldest first
            if conn is not newcomer and isinstance(conn, ProxyRequestHandler) and conn.idle:
                conn.force_close()
                return
        if isinstance(newcomer, ProxyRequestHandler):
            newcomer.refuse(503, "server_busy",
                            "Too many connections are busy; try again shortly (CHAT_PROXY_MAX_CONNECTIONS).")


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` serving through :class:`ProxyServer`."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, *, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # starts the app
        handler_args = {k: v for k, v in self._kwargs.items() if k != "handler_cancellation"}
        return ProxyServer(base.request_handler, request_factory=base.request_factory,
                           handler_cancellation=base.handler_cancellation, loop=asyncio.get_running_loop(),
                           limits=self._limits, **handler_args)


def make_runner(app: web.Application, config: Config, *, handle_signals: bool = False) -> ProxyRunner:
    """The runner the command line serves with: the limits above, aiohttp's keep-alive timeout set to
    ``CHAT_PROXY_KEEPALIVE_TIMEOUT_S``, no aiohttp access log (the proxy writes its own)."""
    return ProxyRunner(
        app,
        limits=ServerLimits.from_config(config),
        handle_signals=handle_signals,
        access_log=None,
        handler_cancellation=True,
        keepalive_timeout=config.keepalive_timeout_s,
        lingering_time=LINGER_S,
        # as create_app asks (its handler_args do not reach a custom server): request bodies are inflated
        # by the views (http/bodies.py), so a corrupt gzip body is one 400 and the connection lives on
        auto_decompress=False,
    )


async def _serve(app: web.Application, config: Config) -> None:
    runner = make_runner(app, config, handle_signals=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        await asyncio.Event().wait()  # until SIGINT or SIGTERM
    finally:
        await runner.cleanup()


def run(app: web.Application, config: Config, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Serve ``app`` on ``CHAT_PROXY_HOST:CHAT_PROXY_PORT`` until SIGINT or SIGTERM, then shut it down
    cleanly (what ``web.run_app`` does, with the runner above). Raises OSError when it cannot listen."""
    loop = loop or asyncio.new_event_loop()
    main = loop.create_task(_serve(app, config))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
