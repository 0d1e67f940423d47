"""Writes made together at the end of the event loop's tick.

A write to a socket whose reader sleeps wakes that reader. When the reader's CPU is idle, the wake-up is
an interrupt sent to that CPU, and in a virtual machine each one costs the writer tens of microseconds.
A busy server writes once per request (the upstream request, the answer), its writes spread over the
tick by the work between them, so nearly every one finds its reader asleep again. So while the loop is
busy a tick's writes are held to its end, to leave back to back: the first wakes the reader, the rest
find it awake. While it is quiet the tick's first writer writes at once: alone, it waits for nothing
(docs/benchmarks.md, "Writes made together").

A tick is what the loop runs between two polls for I/O, so a held write waits for work already queued,
never for the network. The server's client connections (http/server.py) and the data plane's upstream
connections (upstream/client.py) write through :class:`BatchedTransport`.
"""

from __future__ import annotations

import asyncio
from typing import Any

#: Bytes a transport holds before it writes at once: flow control (the real transport's buffer limits)
#: keeps working for a large answer written in one go.
MAX_HELD = 64 * 1024


class WriteBatch:
    """The transports of one event loop that hold writes this tick; one callback writes them all.

    While the loop is quiet (the last batch had fewer than two writers), the tick's first writer writes at
    once, for the rest of the tick too: alone (one request at a time) it waits for nothing, and a streamed
    answer's head and first chunk leave together. While it is busy, every write is held, so the tick's
    writes wake the reader once rather than twice (the direct write, then the batch).
    """

    __slots__ = ("_busy", "_direct", "_held", "_loop", "_open")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[BatchedTransport] = []
        self._open = False  # something was written this tick: the callback is scheduled
        self._direct: BatchedTransport | None = None  # the quiet tick's first writer
        self._busy = False

    def direct(self, transport: BatchedTransport) -> bool:
        """Whether ``transport`` writes at once: the loop is quiet and it is this tick's first writer."""
        if not self._open:
            self._open = True
            self._loop.call_soon(self.flush)
            if not self._busy:
                self._direct = transport
                return True
            return False
        return self._direct is transport

    def hold(self, transport: BatchedTransport) -> None:
        self._held.append(transport)

    def flush(self) -> None:
        held, self._held = self._held, []
        self._busy = len(held) + (self._direct is not None) >= 2
        self._open = False
        self._direct = None
        for transport in held:
            transport.flush()


class BatchedTransport(asyncio.Transport):
    """A transport whose writes wait for its :class:`WriteBatch` to flush, unless the batch lets them go
    at once (a quiet tick's first writer).

    Everything else goes straight to the wrapped transport. Closing writes what is held first; aborting
    drops it. Writes keep their order, and more than :data:`MAX_HELD` bytes held go out at once.
    """

    __slots__ = ("_batch", "_chunks", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, batch: WriteBatch) -> None:
        super().__init__()
        self._transport = transport
        self._batch = batch
        self._chunks: list[bytes] = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._chunks:
            if self._batch.direct(self):
                self._transport.write(data)
                return
            self._batch.hold(self)
        self._chunks.append(bytes(data))  # a copy only of buffers the caller may reuse
        self._size += len(data)
        if self._size > MAX_HELD:
            self.flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Write what is held now."""
        chunks = self._chunks
        if not chunks:
            return
        self._chunks, self._size = [], 0
        if not self._transport.is_closing():  # closed meanwhile: the connection's end says so already
            self._transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._chunks, self._size = [], 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    @property
    def _sendfile_compatible(self) -> Any:
        # asyncio's loop.sendfile() reads this to choose how to send a file. Raising NotImplementedError
        # here makes it raise that, which aiohttp's FileResponse (like uvloop's missing sendfile) answers
        # by writing the file through write(), so a file answer keeps its place among the held writes.
        raise NotImplementedError("writes are batched: files go through write()")
