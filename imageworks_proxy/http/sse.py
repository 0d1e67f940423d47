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
_PIECE_BYTES = 32 * 1024  # of logprob entries per piece
_SPLIT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def _piece(
    chunk: dict[str, Any],
    choice: dict[str, Any],
    delta: dict[str, Any],
    last: bool,
    logprobs: Any = None,
) -> dict[str, Any]:
    """One piece of a split chunk: finish_reason and usage stay on the last piece, logprobs go only where
    they are given (never repeated on every piece)."""
    out = {k: v for k, v in chunk.items() if k != "choices" and (last or k != "usage")}
    piece = {k: v for k, v in choice.items() if k != "logprobs"}
    piece["delta"] = delta
    piece["finish_reason"] = choice.get("finish_reason") if last else None
    if logprobs is not None:
        piece["logprobs"] = logprobs
    out["choices"] = [piece]
    return out


def _cut(text: str) -> list[str]:
    return [text[i : i + _PIECE_CHARS] for i in range(0, len(text), _PIECE_CHARS)]


def _per_choice(chunk: dict[str, Any], choices: list[Any]) -> list[dict[str, Any]]:
    """A chunk of several choices as one chunk per choice (usage on the last)."""
    last = len(choices) - 1
    rest = {k: v for k, v in chunk.items() if k != "choices"}
    return [
        {**{k: v for k, v in rest.items() if n == last or k != "usage"}, "choices": [c]}
        for n, c in enumerate(choices)
    ]


def _batches(entries: list[Any]) -> list[list[Any]]:
    """``entries`` in consecutive batches of about :data:`_PIECE_BYTES` of JSON each."""
    out: list[list[Any]] = [[]]
    size = 0
    for entry in entries:
        n = len(orjson.dumps(entry, default=str))
        if out[-1] and size + n > _PIECE_BYTES:
            out.append([])
            size = 0
        out[-1].append(entry)
        size += n
    return out


def _split_logprobs(chunk: dict[str, Any], choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The delta without its logprobs, then the logprobs' lists (``content``, ``refusal``) in batches, each
    in a chunk with an empty delta and the other keys null; ``None`` when that makes nothing smaller."""
    logprobs = choice["logprobs"]
    delta = choice.get("delta") or {}
    nulls = dict.fromkeys(logprobs)
    groups: list[dict[str, Any]] = []
    for key, value in logprobs.items():
        if isinstance(value, list) and value:
            groups.extend({**nulls, key: batch} for batch in _batches(value))
    if not groups or (not delta and len(groups) == 1):
        return None
    groups[0].update((k, v) for k, v in logprobs.items() if not isinstance(v, list) or not v)
    pieces = [_piece(chunk, choice, delta, False)] if delta else []
    last = len(groups) - 1
    pieces += [_piece(chunk, choice, {}, n == last, logprobs=g) for n, g in enumerate(groups)]
    return pieces


def _split(chunk: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Pieces of an oversized chunk: one per choice, logprobs apart from the text, long text fields and
    tool-call arguments in fragments; ``None`` when nothing can be split."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    if len(choices) > 1:
        return _per_choice(chunk, choices)
    choice = choices[0]
    if not isinstance(choice, dict):
        return None
    if isinstance(choice.get("logprobs"), dict):
        pieces = _split_logprobs(chunk, choice)
        if pieces:
            return pieces
    return _split_delta(chunk, choice)


def _split_delta(chunk: dict[str, Any], choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Split an oversized single-choice chunk: long text fields into pieces, several tool calls into one
    chunk each, long tool-call arguments into fragments (the way clients concatenate them). Logprobs, if
    any, ride on the first piece."""
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        return None
    lp = choice.get("logprobs")
    for field in _SPLIT_FIELDS:
        text = delta.get(field)
        if isinstance(text, str) and len(text) > _PIECE_CHARS:
            pieces = _cut(text)
            last = len(pieces) - 1
            return [
                _piece(chunk, choice, {**delta, field: p} if n == 0 else {field: p}, n == last,
                       lp if n == 0 else None)
                for n, p in enumerate(pieces)
            ]
    calls = delta.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return None
    if len(calls) > 1:  # parallel calls sent whole in one delta: one chunk per call, then split each
        last = len(calls) - 1
        return [
            _piece(chunk, choice, {**delta, "tool_calls": [c]} if n == 0 else {"tool_calls": [c]}, n == last,
                   lp if n == 0 else None)
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
            lp,
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
    """One or more ``data:`` events for ``chunk``, none longer than :data:`MAX_LINE` where the chunk can be
    split (per choice, logprobs apart, text and arguments in fragments)."""
    data = orjson.dumps(chunk)
    if len(data) <= MAX_LINE - 8:
        return b"data: " + data + b"\n\n"
    pieces = _split(chunk)
    if not pieces:
        return b"data: " + data + b"\n\n"  # nothing splittable; send as is
    return b"".join(encode_event(p) for p in pieces)


class ClientGone(Exception):
    """The client closed the connection: nothing more can be sent to it."""


class ClientStalled(ClientGone):
    """The client stopped reading: a write did not complete within the stall timeout, so the proxy hung
    up on it (logged as 499 ``client_stalled``)."""


class SSEWriter:
    """Owns the client's streaming response: commit once, then events, with a keep-alive comment whenever
    the client has had nothing for ``keepalive_s`` (while the request waits for a model or its first token,
    and while a stage holds reply text back, e.g. a reply that may still turn out to be a JSON tool call).

    A failed write raises :class:`ClientGone` (never ``ConnectionError``, so the caller can tell a client
    that left from an adapter whose upstream connection broke). A write that does not complete within
    ``stall_s`` (a client that stopped reading; ``None``: no limit) gets the connection aborted by a
    watchdog timer, and that write or the next raises :class:`ClientStalled`, so the caller closes the
    upstream stream and releases what it holds. (A timer per stream, checking every quarter of ``stall_s``,
    rather than a timeout around every write: writes are the streaming hot path.) A keep-alive that finds
    the client gone cancels the task that committed the stream, so a wait for a model start or a slow first
    token ends at once even where aiohttp does not cancel handlers itself (``handler_cancellation=False``,
    its default for embedding apps).
    """

    def __init__(
        self, request: web.Request, request_id: str, keepalive_s: float = 5.0, *, stall_s: float | None = None
    ) -> None:
        self.request = request
        self.request_id = request_id
        self.keepalive_s = keepalive_s
        self.stall_s = stall_s
        self.response: web.StreamResponse | None = None
        self.data_started = False
        self.first_data_at: float | None = None
        #: The client stopped reading and was hung up on.
        self.stalled = False
        self._keepalive: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._owner: asyncio.Task[Any] | None = None
        #: event-loop time of the last bytes sent to the client (the clock is the loop's, set on commit)
        self._clock = time.monotonic
        self._last_write = 0.0
        #: when the oldest write still in progress began (None: no write in progress)
        self._writing_since: float | None = None
        self._ended = False
        self._loop: asyncio.AbstractEventLoop | None = None  # set on commit
        #: encoded chunks not written yet (see :meth:`hold`)
        self._held: list[bytes] = []

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
        # kept: asyncio.get_running_loop() costs a getpid system call per call on Python 3.11
        self._loop = asyncio.get_running_loop()
        self._clock = self._loop.time
        self._last_write = self._clock()
        try:
            await resp.prepare(self.request)
        except ConnectionError:
            raise ClientGone() from None
        self._arm_watchdog()

    async def commit_and_keep_alive(self) -> None:
        """Commit now, send a keep-alive comment at once (before any data), and keep the stream alive."""
        await self.commit()
        if not self.data_started:
            await self._write(KEEPALIVE)
        self.arm_keepalive()

    async def _write(self, data: bytes, eof: bool = False) -> None:
        resp = self.response
        assert resp is not None
        self._last_write = now = self._clock()
        first = self._writing_since is None  # a keep-alive may go out while a data write waits
        if first:
            self._writing_since = now
        try:
            await resp.write(data)
            if eof:
                await resp.write_eof()
        except ConnectionError:
            raise (ClientStalled() if self.stalled else ClientGone()) from None
        finally:
            if first:
                self._writing_since = None
        if self.stalled:  # hung up while this write was waiting: it returned, but nobody took the data
            raise ClientStalled()

    def _arm_watchdog(self) -> None:
        if self.stall_s is not None and self._watchdog is None and not self.stalled:
            self._watchdog = self._loop.call_later(max(0.01, self.stall_s / 4), self._watch)

    def _watch(self) -> None:
        """Timer: hang up on the client when the write in progress has waited longer than ``stall_s``."""
        self._watchdog = None
        since = self._writing_since
        if since is not None and self._clock() - since >= self.stall_s:  # type: ignore[operator]
            self._hang_up()
        else:
            self._arm_watchdog()

    def _hang_up(self) -> None:
        """Drop a client that stopped reading: what is buffered for it is discarded with the connection,
        and the write waiting for it returns (aiohttp wakes it when the connection is lost)."""
        self.stalled = True
        self._ended = True  # no more keep-alives for it
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    def arm_keepalive(self) -> None:
        """Send ``: keep-alive`` once the client has had nothing for ``keepalive_s``, until the stream
        ends (a timer that re-arms itself, not a task; a busy stream only moves its deadline)."""
        if self._timer is None and not self._ended and self.response is not None:
            self._timer = self._loop.call_at(self._last_write + self.keepalive_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._ended or self.response is None:
            return
        loop = self._loop
        if loop.time() < self._last_write + self.keepalive_s:  # data went out meanwhile: not idle yet
            self.arm_keepalive()
            return
        self._keepalive = loop.create_task(self._write_keepalive())

    async def _write_keepalive(self) -> None:
        try:
            await self._write(KEEPALIVE)
        except ClientGone:
            # The client left (or stopped reading) while the request waits (model start, prefill): stop
            # waiting for it.
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

    def hold(self, chunk: dict[str, Any]) -> None:
        """Encode ``chunk`` for the next :meth:`flush` (chunks that arrived together go out in one write)."""
        self._held.append(encode_event(chunk))

    async def flush(self) -> None:
        """Write the held chunks, if any."""
        if self._held:
            await self._write(self._take_held())

    def _take_held(self, end: bytes = b"") -> bytes:
        """The held chunks' bytes followed by ``end``; the first data marks :attr:`first_data_at`."""
        held = self._held
        if not held:
            return end
        if not self.data_started:
            self.data_started = True
            self.first_data_at = time.perf_counter()
        data = held[0] + end if len(held) == 1 else b"".join(held) + end
        held.clear()
        return data

    async def send_error(self, error: ProxyError) -> None:
        """The held chunks, an in-band error event, then [DONE]."""
        await self._stop_keepalive()
        await self.commit()
        event = b"data: " + orjson.dumps(error.payload(self.request_id)) + b"\n\n"
        await self._write(self._take_held(event + DONE))

    async def finish(self) -> None:
        """The held chunks and ``[DONE]``, in one write, and the end of the response."""
        await self._stop_keepalive()
        await self._write(self._take_held(DONE), eof=True)

    async def close(self) -> None:
        self._owner = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await self._stop_keepalive()
