"""The data-plane HTTP/1.1 client: what forwards chat, text completions and embeddings to the upstreams.

Every forwarded request crosses it twice (the request out, the answer back), so it is the proxy's busiest
code after aiohttp's server. aiohttp's general-purpose client spends about as many instructions on one
small exchange as the whole rest of a minimal passthrough (``bench/instructions.py`` measures it); this
one does only what forwarding needs, on a plain :class:`asyncio.Protocol`:

- ``POST`` with a body already in memory, over keep-alive connections pooled per host (``http`` and
  ``https``; idle ones are closed after :attr:`UpstreamClient.keepalive_s`); a login in the URL is sent
  as basic authentication;
- answers with ``Content-Length``, ``Transfer-Encoding: chunked`` (trailers skipped) or ending at close;
  ``gzip`` and ``deflate`` bodies are decoded (no ``Accept-Encoding`` is sent, so servers rarely use them);
- flow control: a reader that falls behind pauses the socket at :data:`BUFFER_LIMIT` buffered bytes;
- a kept connection that fails at once, before anything was answered (the server had closed it), is
  replaced by a new one and the request sent again; a later failure is an error, never a second send;
- a consumer done before the body ended (a stream after ``[DONE]``) can keep the connection:
  :meth:`UpstreamResponse.finish_quietly` drops the rest and pools it if the body ends within a second.

The control plane (health checks, model listings, Ollama's ``/api/show``, vLLM's admin routes) keeps using
the app's aiohttp session: those calls are rare and want its conveniences. docs/architecture.md has the
split.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import time
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from imageworks_proxy.upstream.wire import (
    BUFFER_LIMIT,
    ResponseReader,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamHeadTimeout,
)
from imageworks_proxy.wire.writes import BatchedTransport, WriteBatch

__all__ = [
    "BUFFER_LIMIT",
    "UpstreamBroken",
    "UpstreamClient",
    "UpstreamConnectError",
    "UpstreamHeadTimeout",
    "UpstreamResponse",
]

#: Idle pooled connections kept per host; more are closed when released.
MAX_IDLE_PER_HOST = 100
#: A kept connection that breaks this soon after the request was written is taken to have been closed by
#: the server before it read the request, and the request is sent again on a new connection.
STALE_WINDOW_S = 0.25


class _Target:
    """A URL split once: where to connect, the request line's start and any login it carries."""

    __slots__ = ("authorization", "host", "key", "port", "prefix", "secure", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)  # the scheme comes back lower-cased: HTTPS:// is https
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.secure = parts.scheme == "https"
        self.ssl: ssl.SSLContext | None = None  # set by the client for https
        self.host = parts.hostname
        self.port = parts.port or (443 if self.secure else 80)
        self.key = (parts.scheme, self.host, self.port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None:
            host = f"{host}:{self.port}"
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        self.prefix = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")
        #: ``user:password@`` in the URL, sent as basic authentication (unless the caller sends its own)
        self.authorization: str | None = None
        if parts.username is not None:
            login = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.authorization = "Basic " + base64.b64encode(login).decode("ascii")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it answers one request at a time."""

    def __init__(
        self,
        key: tuple[str, str, int],
        client: UpstreamClient,
        loop: asyncio.AbstractEventLoop,
        batch: WriteBatch,
    ) -> None:
        self.key = key
        self.client = client
        #: The connection's event loop, kept: ``asyncio.get_running_loop()`` costs a ``getpid`` system call
        #: per call on Python 3.11, and the hot path would make several per request.
        self.loop = loop
        self.batch = batch
        self.transport: asyncio.Transport | None = None
        self.reader: ResponseReader | None = None
        self.closed = False
        self.idle_since = 0.0
        self.used = False  # it carried a request before (a pooled connection)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Requests leave at the end of the tick, with the others sent in it (wire/writes.py).
        self.transport = BatchedTransport(transport, self.batch)  # type: ignore[arg-type]
        self.client._open.add(self)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:  # nothing was asked: a server talking out of turn is not reused
            self.close()
            return
        try:
            reader.feed(data)
        except ValueError as exc:
            reader.fail(UpstreamBroken(f"the upstream broke HTTP: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._open.discard(self)
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.connection_lost(exc)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def finished(self, reusable: bool) -> None:
        """The reader has the whole answer; keep the connection for the next request when it can be."""
        self.reader = None
        if reusable and not self.closed:
            self.client._keep(self)
        else:
            self.close()

    def close(self) -> None:
        self.reader = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


class UpstreamResponse:
    """An upstream's answer: status and headers now, the body from :attr:`content` as it arrives.

    ``headers`` has lower-case names (a repeated header's values joined with ``", "``). Use it as an
    async context manager, or call :meth:`release` after reading the body to the end (the connection goes
    back to the pool) or :meth:`close` to drop it (the upstream sees the connection close).
    """

    __slots__ = ("content", "headers", "status")

    def __init__(self, reader: ResponseReader) -> None:
        self.status = reader.status
        self.headers = reader.headers
        #: The body: ``await content.readany()`` returns the next bytes, ``b""`` at the end.
        self.content = reader

    @property
    def content_length(self) -> int | None:
        return self.content.length

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    async def read(self) -> bytes:
        parts = []
        while data := await self.content.readany():
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        self.content.release()

    def close(self) -> None:
        self.content.abort()

    def finish_quietly(self) -> None:
        """Done reading although the answer may not have ended (a stream after ``[DONE]``): the
        connection is kept if the rest arrives within a second, closed otherwise."""
        self.content.finish_quietly()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.content.release()


class UpstreamClient:
    """Pooled keep-alive connections to the upstreams, owned by the app (closed on shutdown)."""

    #: How long an idle connection is kept: under the 5 s after which uvicorn (vLLM) and llama.cpp's
    #: server close theirs, so a kept connection is rarely one the server is closing at that moment.
    keepalive_s = 4.0

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch: WriteBatch | None = None

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        head_timeout: float | None = None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send ``body`` to ``url`` and wait for the answer's head.

        Raises :class:`UpstreamConnectError` when no connection could be made, :class:`UpstreamHeadTimeout`
        when nothing was answered within ``head_timeout`` seconds (None: no limit), :class:`UpstreamBroken`
        when the connection broke first. Cancelling the wait closes the connection.

        ``timeout`` (None: none) bounds the whole exchange, from now until the body is complete: when it
        passes, the wait for the head or the read in progress raises :class:`TimeoutError` and the
        connection is closed. ``resp.content.stop_timeout()`` lifts it (a stream's body is bounded by its
        idle deadline instead). One timer, where ``asyncio.timeout`` around the call would cost a
        ``Timeout`` object and the task's cancel bookkeeping on every request.

        A login in the URL (``http://user:password@host/…``) is sent as basic authentication unless
        ``headers`` has an ``Authorization``.
        """
        target = self._target(url)
        if target.authorization is not None and not any(k.lower() == "authorization" for k in headers):
            headers = {**headers, "Authorization": target.authorization}
        request = _request(target.prefix, headers, body)
        loop, batch = self._loop, self._batch
        if loop is None or batch is None:
            loop = self._loop = asyncio.get_running_loop()
            batch = self._batch = WriteBatch(loop)  # the connections' requests are written in it
        deadline = None if timeout is None else loop.time() + timeout
        for attempt in (0, 1):
            conn = self._pooled(target.key)
            if conn is None:
                conn = await self._connect(target, connect_timeout, loop, batch)
            reader = ResponseReader(conn)
            conn.reader = reader
            if deadline is not None:
                reader.start_timeout(deadline)
            conn.transport.write(request)  # type: ignore[union-attr]
            sent = loop.time()
            try:
                await reader.wait_head(head_timeout)
            except UpstreamBroken:
                # A kept connection the upstream had closed while it was idle fails at once, before the
                # request could be read: send it again on a new one. A connection that fails later may
                # have had the request taken and worked on (a crash, a gateway timing out): sending it
                # again could run a generation twice, so that is an error.
                if attempt == 0 and conn.used and not reader.received and loop.time() - sent < STALE_WINDOW_S:
                    continue
                raise
            except BaseException:
                reader.stop_timeout()
                if conn.reader is reader:  # a complete answer may already have freed it for another request
                    conn.close()
                raise
            return UpstreamResponse(reader)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            target = _Target(url)
            if target.secure:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                target.ssl = self._tls
            if len(self._targets) >= 1024:  # URLs come from the registry; never let them pile up
                self._targets.clear()
            self._targets[url] = target
        return target

    def _pooled(self, key: tuple[str, str, int]) -> _Connection | None:
        """The most recently kept connection to ``key``; the ones idle too long are closed on the way."""
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = time.monotonic() - self.keepalive_s
        while idle and (idle[0].closed or idle[0].idle_since <= oldest):  # oldest first
            idle.popleft().close()
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(
        self, target: _Target, timeout: float, loop: asyncio.AbstractEventLoop, batch: WriteBatch
    ) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(target.key, self, loop, batch),
                    target.host,
                    target.port,
                    ssl=target.ssl,
                    server_hostname=target.host if target.ssl else None,
                )
        except TimeoutError:
            raise UpstreamConnectError(f"no connection accepted within {timeout:g} s") from None
        except OSError as exc:  # refused, unresolvable, unreachable, TLS (ssl.SSLError is an OSError)
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from None
        return conn

    def _keep(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = collections.deque()
        if len(idle) >= MAX_IDLE_PER_HOST:
            conn.close()
            return
        conn.used = True
        conn.idle_since = time.monotonic()
        idle.append(conn)


def _request(prefix: bytes, headers: Mapping[str, str], body: bytes) -> bytes:
    lines = [prefix]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)
