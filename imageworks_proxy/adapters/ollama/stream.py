"""A streamed answer from Ollama's native API (NDJSON lines), as OpenAI chunks: owns the upstream response
and the GPU tenancy lease until it is closed."""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Protocol

import aiohttp

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.tenancy import Lease
from imageworks_proxy.upstream.ndjson import NdjsonSplitter, decode_line


class LineTranslator(Protocol):
    """Turns the decoded NDJSON lines of one stream into OpenAI chunks (``ChunkTranslator`` for
    ``/api/chat``, ``GenerateTranslator`` for ``/api/generate``)."""

    finished: bool
    usage: dict[str, int] | None

    def feed(self, line: Any) -> list[dict[str, Any]]: ...


def describe(exc: BaseException) -> str:
    """An exception for an error message: its type, and its text when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class OllamaChunkStream:
    """The chunks of one streamed Ollama reply; owns the upstream response and the tenancy lease.

    Closing it (the core always does) closes the upstream connection, which makes Ollama stop
    generating, and releases the lease. Errors while iterating are :class:`ProxyError`: 504
    ``stream_idle_timeout`` after ``CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS`` without bytes, 502
    ``backend_error`` for an ``{"error": ...}`` line, bad data or a stream cut short.
    """

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        translator: LineTranslator,
        *,
        base: str,
        idle_s: float,
        lease: Lease,
    ) -> None:
        self._resp = resp
        self._translator = translator
        self._base = base
        self._idle_s = idle_s
        self._lease = lease
        self._splitter = NdjsonSplitter()
        self._lines: collections.deque[bytes] = collections.deque()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._eof = False
        self._closed = False

    @property
    def usage(self) -> dict[str, int] | None:
        return self._translator.usage

    def __aiter__(self) -> OllamaChunkStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._pending:
            if self._closed or self._translator.finished:
                await self.aclose()
                raise StopAsyncIteration
            await self._advance(self._idle_s)
        return self._pending.popleft()

    async def prime(self) -> None:
        """Read until the first line is translated (no idle limit: the caller bounds this wait)."""
        while not self._pending and not self._translator.finished:
            await self._advance(None)

    async def _advance(self, idle_s: float | None) -> None:
        # One line at a time, so an error line only counts for what came before it.
        if self._lines:
            self._pending.extend(self._translator.feed(decode_line(self._lines.popleft(), "Ollama")))
        elif self._eof:
            raise ProxyError(
                502, "backend_error", f"Ollama at {self._base} ended the stream before it was done"
            )
        else:
            await self._read(idle_s)

    async def _read(self, idle_s: float | None) -> None:
        try:
            async with asyncio.timeout(idle_s):
                data = await self._resp.content.readany()
        except TimeoutError:
            raise ProxyError(
                504,
                "stream_idle_timeout",
                f"Ollama at {self._base} sent nothing for {idle_s * 1000:.0f} ms "
                "(CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS)",
            ) from None
        except aiohttp.ClientError as exc:
            raise ProxyError(
                502, "backend_error", f"the stream from Ollama at {self._base} broke: {describe(exc)}"
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
            self._resp.release()  # keeps the connection for reuse when the body was read to the end
        else:
            self._resp.close()
        self._lease.release()
