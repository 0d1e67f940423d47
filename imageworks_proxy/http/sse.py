"""Server-sent events to the client: headers, framing, keep-alives, in-band errors, [DONE]."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from imageworks_proxy.errors import ProxyError

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
#: No single SSE line may exceed this (OpenWebUI's reader caps a line at 128 KiB).
MAX_LINE = 64 * 1024
_PIECE_CHARS = 8 * 1024  # worst case JSON escaping is 6 bytes/char: 48 KiB < MAX_LINE
_SPLIT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def _piece(
    chunk: dict[str, Any], choice: dict[str, Any], delta: dict[str, Any], last: bool
) -> dict[str, Any]:
    """One piece of a split chunk: finish_reason and usage stay on the last piece."""
    out = {k: v for k, v in chunk.items() if k != "choices" and (last or k != "usage")}
    out["choices"] = [
        {**choice, "delta": delta, "finish_reason": choice.get("finish_reason") if last else None}
    ]
    return out


def _cut(text: str) -> list[str]:
    return [text[i : i + _PIECE_CHARS] for i in range(0, len(text), _PIECE_CHARS)]


def _split_delta(chunk: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Split an oversized single-choice chunk: long text fields into pieces, several tool calls into one
    chunk each, long tool-call arguments into fragments (the way clients concatenate them)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    delta = choice.get("delta") or {}
    for field in _SPLIT_FIELDS:
        text = delta.get(field)
        if isinstance(text, str) and len(text) > _PIECE_CHARS:
            pieces = _cut(text)
            last = len(pieces) - 1
            return [
                _piece(chunk, choice, {**delta, field: p} if n == 0 else {field: p}, n == last)
                for n, p in enumerate(pieces)
            ]
    calls = delta.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return None
    if len(calls) > 1:  # parallel calls sent whole in one delta: one chunk per call, then split each
        last = len(calls) - 1
        return [
            _piece(chunk, choice, {**delta, "tool_calls": [c]} if n == 0 else {"tool_calls": [c]}, n == last)
            for n, c in enumerate(calls)
        ]
    call = calls[0]
    fn = call.get("function") if isinstance(call, dict) else None
    args = fn.get("arguments") if isinstance(fn, dict) else None
    if not isinstance(args, str) or len(args) <= _PIECE_CHARS:
        return None
    pieces = _cut(args)
    last = len(pieces) - 1
    out = [
        _piece(
            chunk,
            choice,
            {**delta, "tool_calls": [{**call, "function": {**fn, "arguments": pieces[0]}}]},
            last == 0,
        )
    ]
    index = call.get("index", 0)
    for n in range(1, len(pieces)):
        out.append(
            _piece(
                chunk,
                choice,
                {"tool_calls": [{"index": index, "function": {"arguments": pieces[n]}}]},
                n == last,
            )
        )
    return out


def encode_event(chunk: dict[str, Any]) -> bytes:
    """One or more ``data:`` events for ``chunk``, none longer than :data:`MAX_LINE`."""
    data = orjson.dumps(chunk)
    if len(data) <= MAX_LINE - 8:
        return b"data: " + data + b"\n\n"
    pieces = _split_delta(chunk)
    if not pieces:
        return b"data: " + data + b"\n\n"  # nothing splittable; send as is
    return b"".join(encode_event(p) for p in pieces)


class ClientGone(Exception):
    """The client closed the connection: nothing more can be sent to it."""


class SSEWriter:
    """Owns the client's streaming response: commit once, then events, with a keep-alive comment whenever
    the client has had nothing for ``keepalive_s`` (while the request waits for a model or its first token,
    and while a stage holds reply text back, e.g. a reply that may still turn out to be a JSON tool call).

    A failed write raises :class:`ClientGone` (never ``ConnectionError``, so the caller can tell a client
    that left from an adapter whose upstream connection broke). A keep-alive that finds the client gone
    cancels the task that committed the stream, so a wait for a model start or a slow first token ends at
    once even where aiohttp does not cancel handlers itself (``handler_cancellation=False``, its default
    for embedding apps).
    """

    def __init__(self, request: web.Request, request_id: str, keepalive_s: float = 5.0) -> None:
        self.request = request
        self.request_id = request_id
        self.keepalive_s = keepalive_s
        self.response: web.StreamResponse | None = None
        self.data_started = False
        self.first_data_at: float | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._owner: asyncio.Task[Any] | None = None
        #: event-loop time of the last bytes sent to the client (the clock is the loop's, set on commit)
        self._clock = time.monotonic
        self._last_write = 0.0
        self._ended = False

    @property
    def committed(self) -> bool:
        return self.response is not None

    async def commit(self) -> None:
        """Send 200 and the SSE headers (idempotent)."""
        if self.response is not None:
            return
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Request-Id": self.request_id,
            },
        )
        self.response = resp  # set first: the handler returns it even when the client is already gone
        self._owner = asyncio.current_task()
        self._clock = asyncio.get_running_loop().time
        self._last_write = self._clock()
        try:
            await resp.prepare(self.request)
        except ConnectionError:
            raise ClientGone() from None

    async def commit_and_keep_alive(self) -> None:
        """Commit now, send a keep-alive comment at once (before any data), and keep the stream alive."""
        await self.commit()
        if not self.data_started:
            await self._write(KEEPALIVE)
        self.arm_keepalive()

    async def _write(self, data: bytes) -> None:
        self._last_write = self._clock()
        try:
            await self.response.write(data)  # type: ignore[union-attr]
        except ConnectionError:
            raise ClientGone() from None

    def arm_keepalive(self) -> None:
        """Send ``: keep-alive`` once the client has had nothing for ``keepalive_s``, until the stream
        ends (a timer that re-arms itself, not a task; a busy stream only moves its deadline)."""
        if self._timer is None and not self._ended and self.response is not None:
            self._timer = asyncio.get_running_loop().call_at(self._last_write + self.keepalive_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._ended or self.response is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._last_write + self.keepalive_s:  # data went out meanwhile: not idle yet
            self.arm_keepalive()
            return
        self._keepalive = loop.create_task(self._write_keepalive())

    async def _write_keepalive(self) -> None:
        self._last_write = self._clock()
        try:
            await self.response.write(KEEPALIVE)  # type: ignore[union-attr]
        except ConnectionError:
            # The client left while the request waits (model start, prefill): stop waiting for it.
            owner, self._owner = self._owner, None
            if owner is not None and not owner.done():
                owner.cancel()
            return
        except RuntimeError:
            return  # the stream already ended
        self.arm_keepalive()

    async def _stop_keepalive(self) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._keepalive = self._keepalive, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait((task,))  # unlike awaiting it, lets a cancellation of our own task through

    async def send(self, chunk: dict[str, Any]) -> None:
        if not self.data_started:
            self.data_started = True
            self.first_data_at = time.perf_counter()
        self._last_write = self._clock()
        try:
            await self.response.write(encode_event(chunk))  # type: ignore[union-attr]
        except ConnectionError:
            raise ClientGone() from None

    async def send_error(self, error: ProxyError) -> None:
        """In-band error event, then [DONE]."""
        await self._stop_keepalive()
        await self.commit()
        await self._write(b"data: " + orjson.dumps(error.payload(self.request_id)) + b"\n\n" + DONE)

    async def finish(self) -> None:
        await self._stop_keepalive()
        try:
            await self.response.write(DONE)  # type: ignore[union-attr]
            await self.response.write_eof()  # type: ignore[union-attr]
        except ConnectionError:
            raise ClientGone() from None

    async def close(self) -> None:
        self._owner = None
        await self._stop_keepalive()
