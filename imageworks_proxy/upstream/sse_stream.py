"""An OpenAI-compatible upstream's streamed answer as chunk objects: the ``ChunkStream`` of the OpenAI
family of adapters (OpenAI-compatible servers, vLLM, llama.cpp).

Each network read is split into events and decoded at once, so :meth:`SSEChunkStream.ready` can say
truthfully whether the next chunk is already here: the core then writes the chunks of one read to the
client together instead of one write each (docs/architecture.md, one request's path).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import orjson

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.upstream.client import UpstreamBroken, UpstreamResponse
from imageworks_proxy.upstream.errors import in_band_error
from imageworks_proxy.upstream.idle import IdleDeadline
from imageworks_proxy.upstream.sse import EventTooLong, SSEParser

log = logging.getLogger("imageworks_proxy.upstream")

_END = object()  # in the queue: the stream is over


class SSEChunkStream:
    """The chunks of one streamed answer; owns the upstream response (closed when the stream ends or is
    closed).

    Idle time counts between data events (an upstream sending only ``: ping`` comments is idle), and a
    stream that ends without ``[DONE]`` must have finished every choice (and sent its usage, when asked)
    or it is reported as cut short. Errors while iterating are :class:`ProxyError`: 504
    ``stream_idle_timeout``, 502 ``backend_error`` for an in-band error, an event that is not JSON, an
    over-long line or a broken connection. ``adjust`` (or None) rewrites each chunk (vLLM's fix-ups).
    """

    __slots__ = ("_adjust", "_closed", "_ending", "_idle", "_idle_ms", "_parser", "_queue", "_resp", "_where")

    def __init__(
        self,
        resp: UpstreamResponse,
        where: str,
        idle_ms: int,
        *,
        usage_asked: bool = False,
        adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self._resp = resp
        self._where = where
        self._idle_ms = idle_ms
        self._adjust = adjust
        self._parser = SSEParser()
        self._ending = _StreamEnding(usage_asked)
        self._idle = IdleDeadline(resp.content, idle_ms / 1000, resp.content.loop)
        #: decoded chunks, then at most one end marker or error: each resolves without waiting
        self._queue: collections.deque[Any] = collections.deque()
        self._closed = False

    def ready(self) -> bool:
        """The next :meth:`__anext__` returns (or ends) without waiting for the network."""
        return bool(self._queue)

    def __aiter__(self) -> SSEChunkStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        queue = self._queue
        while not queue:
            if self._closed:
                raise StopAsyncIteration
            await self._read()
        item = queue.popleft()
        if type(item) is dict:
            return item
        if item is _END:  # done: the connection is kept for the next request if the body ends soon
            self._close(finished=True)
            raise StopAsyncIteration
        self._close(finished=False)
        raise item

    async def aclose(self) -> None:
        """Stop reading: an unfinished stream's connection is closed (which stops the upstream's work)."""
        self._close(finished=False)

    def _close(self, finished: bool) -> None:
        if not self._closed:
            self._closed = True
            self._idle.cancel()
            if finished:
                self._resp.finish_quietly()
            else:
                self._resp.close()

    async def _read(self) -> None:
        idle = self._idle
        idle.arm()
        try:
            raw = await self._resp.content.readany()
        except TimeoutError:  # the idle deadline's
            self._queue.append(
                ProxyError(
                    504,
                    "stream_idle_timeout",
                    f"{self._where} sent no data for {self._idle_ms} ms (CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS).",
                )
            )
            return
        except UpstreamBroken as exc:
            log.warning("%s: the stream broke: %s", self._where, exc)
            self._queue.append(ProxyError(502, "backend_error", f"{self._where} closed the stream early."))
            return
        finally:
            idle.waiting = False
        if not raw:
            ending = self._ending
            if ending.complete:
                self._queue.append(_END)
            else:
                error = f"{self._where} ended the stream before it was done ({ending.missing})."
                self._queue.append(ProxyError(502, "backend_error", error))
            return
        try:
            events = self._parser.feed(raw)
        except EventTooLong as exc:
            self._queue.append(ProxyError(502, "backend_error", f"{self._where} sent {exc}."))
            return
        if events:  # only data restarts the idle clock; comments and partial lines do not
            idle.restart()
            self._decode(events)

    def _decode(self, events: list[bytes]) -> None:
        queue, note, adjust = self._queue, self._ending.note, self._adjust
        for payload in events:
            if payload == b"[DONE]":
                queue.append(_END)
                return
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                error = f"{self._where} sent a stream event that is not JSON."
                queue.append(ProxyError(502, "backend_error", error))
                return
            if not isinstance(obj, dict):
                continue
            if obj.get("error"):
                queue.append(in_band_error(obj, self._where))
                return
            note(obj)
            queue.append(adjust(obj) if adjust is not None else obj)


class _StreamEnding:
    """What a stream has delivered so far: choices seen and finished, a usage chunk."""

    __slots__ = ("finished", "seen", "usage", "usage_asked")

    def __init__(self, usage_asked: bool) -> None:
        self.usage_asked = usage_asked
        self.seen: set[Any] = set()
        self.finished: set[Any] = set()
        self.usage = False

    def note(self, chunk: dict[str, Any]) -> None:
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for i, choice in enumerate(choices):
                if isinstance(choice, dict):
                    index = choice.get("index", i)
                    index = index if isinstance(index, int) else i
                    self.seen.add(index)
                    if choice.get("finish_reason"):
                        self.finished.add(index)
        if chunk.get("usage"):
            self.usage = True

    @property
    def missing(self) -> str:
        if not self.seen or self.seen - self.finished:
            return "no finish_reason, no [DONE]"
        return "no usage chunk, no [DONE]"

    @property
    def complete(self) -> bool:
        """Every choice finished (and usage arrived when asked): a server that omits ``[DONE]`` is done."""
        return bool(self.seen) and self.seen <= self.finished and (self.usage or not self.usage_asked)
