"""Reading one HTTP/1.1 answer off a connection: the head, the body's framing, and the body as a stream.

:class:`ResponseReader` is fed whatever the socket delivered (``feed``) by the connection protocol in
:mod:`imageworks_proxy.upstream.client` and read by the adapter (``readany``); it is the only place that
knows HTTP's response syntax.
"""

from __future__ import annotations

import asyncio
import collections
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imageworks_proxy.upstream.client import _Connection

#: The most an answer's status line and headers may take.
HEAD_LIMIT = 64 * 1024
#: Buffered body bytes at which the socket is paused until the reader catches up (resumed at half).
BUFFER_LIMIT = 4 * 1024 * 1024
#: How long :meth:`ResponseReader.finish_quietly` waits for the end of an answer to keep its connection.
DRAIN_S = 1.0
_LINE_LIMIT = 8 * 1024  # a chunk-size or trailer line

_HEAD, _BODY, _DONE = range(3)
_LENGTH, _CHUNKED, _UNTIL_CLOSE = range(3)
_SIZE, _DATA_END, _TRAILER = range(3)  # where a chunked body stands between chunk data


class UpstreamConnectError(ConnectionError):
    """No connection to the upstream: refused, unresolvable, TLS failure, or none accepted in time."""


class UpstreamHeadTimeout(TimeoutError):
    """The upstream accepted the request but sent no answer within the head timeout."""


class UpstreamBroken(ConnectionError):
    """The connection broke, or the upstream broke HTTP, before the answer was complete."""


class ResponseReader:
    """One answer, fed by the connection and read by one consumer."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_chunk_state",
        "_chunks",
        "_compressed",
        "_conn",
        "_decoder",
        "_draining",
        "_exc",
        "_framing",
        "_head",
        "_left",
        "_paused",
        "_size",
        "_state",
        "_timer",
        "_waiter",
        "eof",
        "headers",
        "length",
        "received",
        "reusable",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._state = _HEAD
        self._buf = b""
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self._decoder: zlib._Decompress | None = None
        self._compressed = False  # bytes went to the decoder
        self._draining = False  # the consumer is gone; the rest of the body is dropped (finish_quietly)
        self._framing = _LENGTH
        self._left = 0
        self._chunk_left = 0
        self._chunk_state = _SIZE
        self._timer: asyncio.TimerHandle | None = None
        self.received = False  # any byte of the answer arrived
        self.eof = False
        self.reusable = True
        self.status = 0
        self.headers: dict[str, str] = {}
        self.length: int | None = None

    # -- the consumer's side -------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the answer arrives on."""
        return self._conn.loop

    async def wait_head(self, timeout: float | None) -> None:
        head = self._head
        if timeout is None or head.done():
            await head
            return
        timer = self._conn.loop.call_later(timeout, _expire, head, UpstreamHeadTimeout())
        try:
            await head
        finally:
            timer.cancel()

    async def readany(self) -> bytes:
        """The next body bytes; ``b""`` once the body is complete."""
        chunks = self._chunks
        while not chunks:
            if self._exc is not None:
                raise self._exc
            if self.eof:
                return b""
            self._waiter = waiter = self._conn.loop.create_future()
            await waiter
        data = chunks.popleft()
        self._size -= len(data)
        if self._paused and self._size <= BUFFER_LIMIT // 2:
            self._paused = False
            self._conn.resume()
        return data

    def start_timeout(self, deadline: float) -> None:
        """Fail the exchange with :class:`TimeoutError` if it is not complete at ``deadline`` (loop time)."""
        self._timer = self._conn.loop.call_at(deadline, self._time_out)

    def stop_timeout(self) -> None:
        """Lift :meth:`start_timeout`'s limit."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _time_out(self) -> None:
        self._timer = None
        if self._state != _DONE:
            self.fail(TimeoutError())
            if self._conn.reader is self:
                self._conn.close()

    def set_exception(self, exc: BaseException) -> None:
        """Make a waiting (or the next waiting) read raise ``exc`` (the idle deadline uses it)."""
        self._exc = exc
        self._wake()

    def release(self) -> None:
        """The consumer is done: a complete answer has freed its connection, an incomplete one closes it."""
        self.abort()

    def finish_quietly(self, within_s: float = DRAIN_S) -> None:
        """The consumer has all it wants, but the answer has not ended yet (a stream's ``[DONE]`` comes
        before the HTTP chunk that ends the body): drop the rest as it arrives and keep the connection if
        the answer ends within ``within_s`` seconds, else close it."""
        if self._state == _DONE:
            return
        self.stop_timeout()
        self._draining = True
        self._decoder = None
        self._chunks.clear()
        self._size = 0
        if self._paused:
            self._paused = False
            self._conn.resume()
        self._timer = self._conn.loop.call_later(within_s, self.abort)

    def abort(self) -> None:
        self.stop_timeout()
        if self._state != _DONE:
            self._state = _DONE
            self.eof = True
            if self._conn.reader is self:
                self._conn.close()

    # -- the connection's side -----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.received = True
        if self._state == _HEAD:
            self._feed_head(data)
        elif self._state == _BODY:
            self._feed_body(data)
        else:  # bytes after a complete answer: the connection is out of step
            self.reusable = False

    def fail(self, exc: BaseException) -> None:
        self.stop_timeout()
        if not self._head.done():
            self._head.set_exception(exc)
        else:
            self._exc = exc
            self._wake()
        self._state = _DONE

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._state == _DONE:
            return
        if self._state == _BODY and self._framing == _UNTIL_CLOSE and exc is None:  # a reset is not an end
            try:
                self._finish()
            except ValueError as bad:
                self.fail(UpstreamBroken(f"the upstream broke HTTP: {bad}"))
        elif self._state == _HEAD:
            self.fail(UpstreamBroken(f"the upstream closed the connection before answering{_why(exc)}"))
        else:
            self.fail(UpstreamBroken(f"the upstream closed the connection mid-answer{_why(exc)}"))

    def _feed_head(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        if end > HEAD_LIMIT or (end < 0 and len(buf) > HEAD_LIMIT):
            raise ValueError(f"headers over {HEAD_LIMIT} bytes")
        if end < 0:
            self._buf = buf
            return
        self._buf = b""
        lines = buf[:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status = int(rest[:3])
        if not version.startswith(b"HTTP/1.") or not 100 <= status <= 599:
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        if status < 200:  # 100 Continue, 103 Early Hints: the answer follows
            if len(buf) > end + 4:
                self._feed_head(buf[end + 4 :])
            return
        self.status = status
        self.headers = headers = _headers(lines)
        self._frame(version, headers)
        self._state = _BODY
        if not self._head.done():  # cancelled when the request was (its connection closes)
            self._head.set_result(None)
        if self._framing == _LENGTH and self._left == 0:
            self._finish()
        if len(buf) > end + 4:
            self._feed_body(buf[end + 4 :])

    def _frame(self, version: bytes, headers: dict[str, str]) -> None:
        connection = headers.get("connection", "").lower()
        if "close" in connection or (version == b"HTTP/1.0" and "keep-alive" not in connection):
            self.reusable = False
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by its header
        elif encoding != "identity":
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")
        if self.status in (204, 304):
            self._left = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing = _CHUNKED
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length < 0:
                raise ValueError("negative Content-Length")
            self.length = self._left = length
        else:
            self._framing = _UNTIL_CLOSE
            self.reusable = False

    def _feed_body(self, data: bytes) -> None:
        framing = self._framing
        if framing == _LENGTH:
            left = self._left
            if len(data) >= left:
                if len(data) > left:
                    self.reusable = False
                    data = data[:left]
                self._left = 0
                if data:
                    self._push(data)
                self._finish()
            else:
                self._left = left - len(data)
                self._push(data)
        elif framing == _CHUNKED:
            self._feed_chunked(data)
        else:
            self._push(data)

    def _feed_chunked(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        out: list[bytes] = []
        while pos < end:
            if self._chunk_left:
                take = min(self._chunk_left, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._chunk_left -= take
                if not self._chunk_left:
                    self._chunk_state = _DATA_END
                continue
            if self._chunk_state == _DATA_END:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError("a chunk is longer than its size")
                pos += 2
                self._chunk_state = _SIZE
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > _LINE_LIMIT:
                    raise ValueError("a chunk-size line is too long")
                break
            line, pos = buf[pos:eol], eol + 2
            if self._chunk_state == _TRAILER:
                if not line:  # the blank line after the trailers: the answer is complete
                    if pos < end:
                        self.reusable = False
                    self._buf = b""
                    if out:
                        self._push(b"".join(out))
                    self._finish()
                    return
                continue
            size = int(line.partition(b";")[0].strip(), 16)
            if size < 0:
                raise ValueError("negative chunk size")
            if size == 0:
                self._chunk_state = _TRAILER
            self._chunk_left = size
        self._buf = buf[pos:]
        if out:
            self._push(out[0] if len(out) == 1 else b"".join(out))

    def _push(self, data: bytes) -> None:
        if self._draining:
            return
        if self._decoder is not None:
            self._compressed = True
            try:
                data = self._decoder.decompress(data)
            except zlib.error as exc:
                raise ValueError(f"the body does not decode: {exc}") from None
            if not data:
                return
        self._chunks.append(data)
        self._size += len(data)
        self._wake()
        if self._size > BUFFER_LIMIT and not self._paused:
            self._paused = True
            self._conn.pause()

    def _finish(self) -> None:
        if self._decoder is not None:
            if self._compressed and not self._decoder.eof:  # an empty body (a 204, a 304) is no stream
                raise ValueError("the compressed body was cut short")
            self._decoder = None
        self._state = _DONE
        self.eof = True
        self.stop_timeout()
        self._wake()
        if self._paused:
            self._paused = False
            self._conn.resume()
        self._conn.finished(self.reusable)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


def _headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line[:80]!r}")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _expire(head: asyncio.Future[None], exc: BaseException) -> None:
    if not head.done():
        head.set_exception(exc)


def _why(exc: BaseException | None) -> str:
    return f" ({exc})" if exc else ""
