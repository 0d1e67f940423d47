"""Server-sent events to the client (SPEC §7): headers, framing, keep-alives, in-band errors, [DONE]."""

from __future__ import annotations

import asyncio
import contextlib
import copy
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


def _split_delta(chunk: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Split an oversized single-choice chunk into several whose string fields are cut in pieces."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return None
    choice = choices[0]
    delta = choice.get("delta") or {}
    for field in _SPLIT_FIELDS:
        text = delta.get(field)
        if isinstance(text, str) and len(text) > _PIECE_CHARS:
            pieces = [text[i:i + _PIECE_CHARS] for i in range(0, len(text), _PIECE_CHARS)]
            out = []
            for n, piece in enumerate(pieces):
                c = {k: v for k, v in chunk.items() if k != "choices"}
                d = dict(delta) if n == 0 else {}
                d[field] = piece
                if n > 0:
                    c.pop("usage", None)
                last = n == len(pieces) - 1
                c["choices"] = [{**choice, "delta": d, "finish_reason": choice.get("finish_reason") if last else None}]
                out.append(c)
            return out
    calls = delta.get("tool_calls")
    if isinstance(calls, list) and len(calls) == 1:
        fn = calls[0].get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str) and len(args) > _PIECE_CHARS:
            out = []
            pieces = [args[i:i + _PIECE_CHARS] for i in range(0, len(args), _PIECE_CHARS)]
            for n, piece in enumerate(pieces):
                call = copy.deepcopy(calls[0]) if n == 0 else {"index": calls[0].get("index", 0)}
                call.setdefault("function", {})["arguments"] = piece
                d = {**delta, "tool_calls": [call]} if n == 0 else {"tool_calls": [call]}
                last = n == len(pieces) - 1
                c = {k: v for k, v in chunk.items() if k != "choices"}
                c["choices"] = [{**choice, "delta": d, "finish_reason": choice.get("finish_reason") if last else None}]
                out.append(c)
            return out
    return None


def encode_event(chunk: dict[str, Any]) -> bytes:
    """One or more ``data:`` events for ``chunk``, none longer than :data:`MAX_LINE`."""
    data = orjson.dumps(chunk)
    if len(data) <= MAX_LINE - 8:
        return b"data: " + data + b"\n\n"
    pieces = _split_delta(chunk)
    if not pieces:
        return b"data: " + data + b"\n\n"  # nothing splittable; send as is
    return b"".join(encode_event(p) for p in pieces)


class SSEWriter:
    """Owns the client's streaming response: commit once, keep alive until data flows, then events."""

    def __init__(self, request: web.Request, request_id: str, keepalive_s: float = 5.0) -> None:
        self.request = request
        self.request_id = request_id
        self.keepalive_s = keepalive_s
        self.response: web.StreamResponse | None = None
        self.data_started = False
        self.first_data_at: float | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

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
        await resp.prepare(self.request)
        self.response = resp

    async def commit_and_keep_alive(self) -> None:
        """Commit now, send a keep-alive comment at once, and keep sending them until data flows."""
        await self.commit()
        if not self.data_started:
            await self.response.write(KEEPALIVE)  # type: ignore[union-attr]
            self.arm_keepalive()

    def arm_keepalive(self) -> None:
        """Send ``: keep-alive`` every ``keepalive_s`` until the first data event (a timer, not a task)."""
        if self._timer is None and not self.data_started:
            self._timer = asyncio.get_running_loop().call_later(self.keepalive_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.data_started or self.response is None:
            return
        self._keepalive = asyncio.get_running_loop().create_task(self._write_keepalive())

    async def _write_keepalive(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.response.write(KEEPALIVE)  # type: ignore[union-attr]
            self.arm_keepalive()

    async def _stop_keepalive(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._keepalive = self._keepalive, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def send(self, chunk: dict[str, Any]) -> None:
        if not self.data_started:
            self.data_started = True
            self.first_data_at = time.perf_counter()
            await self._stop_keepalive()
        await self.response.write(encode_event(chunk))  # type: ignore[union-attr]

    async def send_error(self, error: ProxyError) -> None:
        """In-band error event, then [DONE]."""
        await self._stop_keepalive()
        await self.commit()
        await self.response.write(b"data: " + orjson.dumps(error.payload(self.request_id)) + b"\n\n" + DONE)  # type: ignore[union-attr]

    async def finish(self) -> None:
        await self._stop_keepalive()
        await self.response.write(DONE)  # type: ignore[union-attr]
        await self.response.write_eof()  # type: ignore[union-attr]

    async def close(self) -> None:
        await self._stop_keepalive()
