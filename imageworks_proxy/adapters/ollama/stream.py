"""One streamed Ollama reply: NDJSON lines read off the upstream response and translated into chunks
(``/api/chat`` into chat chunks, ``/api/generate`` into text completion chunks)."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Protocol

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.tenancy import Lease
from imageworks_proxy.upstream.client import UpstreamBroken, UpstreamResponse
from imageworks_proxy.upstream.ndjson import NdjsonSplitter, decode_line

log = logging.getLogger("imageworks_proxy.ollama")


class LineTranslator(Protocol):
    """Turns the decoded NDJSON lines of one stream into OpenAI chunks (``ChunkTranslator`` for
    ``/api/chat``, ``GenerateTranslator`` for ``/api/generate``)."""

    finished: bool
    usage: dict[str, int] | None

    def feed(self, line: Any) -> list[dict[str, Any]]: ...


class OllamaChunkStream:
    """The chunks of one streamed Ollama reply; owns the upstream response and the tenancy lease.

    Closing it (the core always does) closes the upstream connection, which makes Ollama stop
    generating, and releases the lease. Errors while iterating are :class:`ProxyError`: 504
    ``stream_idle_timeout`` after ``CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS`` without a line (blank lines do not
    count), 502 ``backend_error`` for an ``{"error": ...}`` line, bad data, a line over the NDJSON cap or
    a stream cut short.
    """

    def __init__(
        self,
        resp: UpstreamResponse,
        translator: LineTranslator,
        *,
        where: str,
        idle_s: float,
        lease: Lease,
    ) -> None:
        self._resp = resp
        self._translator = translator
        self._where = where
        self._idle_s = idle_s
        self._lease = lease
        self._splitter = NdjsonSplitter(where)
        self._lines: collections.deque[bytes] = collections.deque()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._eof = False
        self._closed = False

    @property
    def usage(self) -> dict[str, int] | None:
        return self._translator.usage

    def __aiter__(self) -> OllamaChunkStream:
        return self

    def ready(self) -> bool:
        """The next chunk is translated already (the core may write it together with this one)."""
        return bool(self._pending)

    async def __anext__(self) -> dict[str, Any]:
        deadline: float | None = None
        while not self._pending:
            if self._closed or self._translator.finished:
                await self.aclose()
                raise StopAsyncIteration
            if self._lines or self._eof:
                self._take_line()
                deadline = None  # a line is upstream activity, even one that makes no chunk
                continue
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self._idle_s
            await self._read(deadline)
        return self._pending.popleft()

    async def prime(self) -> None:
        """Read until the first line is translated (no idle limit: the caller bounds this wait)."""
        while not self._pending and not self._translator.finished:
            if self._lines or self._eof:
                self._take_line()
            else:
                await self._read(None)

    def _take_line(self) -> None:
        # One line at a time, so an error line only counts for what came before it.
        if not self._lines:
            raise ProxyError(502, "backend_error", f"{self._where} ended the stream before it was done")
        self._pending.extend(self._translator.feed(decode_line(self._lines.popleft(), "Ollama")))

    async def _read(self, deadline: float | None) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                data = await self._resp.content.readany()
        except TimeoutError:
            raise ProxyError(
                504,
                "stream_idle_timeout",
                f"{self._where} sent no data for {self._idle_s * 1000:.0f} ms "
                "(CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS)",
            ) from None
        except UpstreamBroken as exc:
            log.warning("%s: the stream broke: %s", self._where, exc)
            raise ProxyError(
                502, "backend_error", f"The stream from {self._where} broke ({type(exc).__name__})"
            ) from None
        if data:
            self._lines.extend(self._splitter.feed(data))
        else:
            self._lines.extend(self._splitter.close())
            self._eof = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._translator.finished:
            self._resp.finish_quietly()  # keeps the connection for reuse once the body has ended
        else:
            self._resp.close()
        self._lease.release()
