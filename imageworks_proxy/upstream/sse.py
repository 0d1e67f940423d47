"""Server-sent events from an upstream: an incremental parser fed with whatever the socket delivered.

Reading the upstream line by line costs two awaited ``readline`` calls per event; feeding the parser
each network read and splitting in one pass is the streaming hot path's cheapest form (bench/ measures it).
"""

from __future__ import annotations

#: The most an upstream may send without a newline (aiohttp's line reader allowed twice its 4 MiB buffer).
MAX_PENDING = 8 * 1024 * 1024


class EventTooLong(ValueError):
    """The upstream sent more than :data:`MAX_PENDING` bytes without ending a line."""


class SSEParser:
    """Feed raw bytes, get the ``data`` payloads of complete events.

    An event's ``data:`` lines (surrounding whitespace removed) are joined with ``\\n`` and the event
    ends at a blank line. Comments and other fields (``event:``, ``id:``, ``retry:``) are ignored, and so
    are blank lines with no data before them. Lines end at ``\\n``; a ``\\r`` before it is whitespace.
    Data not yet followed by a blank line waits for the next :meth:`feed` (and is dropped at the end of
    the stream, as a line reader would drop it).
    """

    __slots__ = ("_data", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._pending + chunk if self._pending else chunk
        events: list[bytes] = []
        data = self._data
        start = 0
        find = buf.find
        while (end := find(b"\n", start)) >= 0:
            line = buf[start:end]
            start = end + 1
            if line.startswith(b"data:"):
                data.append(line[5:].strip())
            elif data and not line.strip():
                events.append(data[0] if len(data) == 1 else b"\n".join(data))
                data.clear()
        self._pending = buf[start:] if start < len(buf) else b""
        if len(self._pending) > MAX_PENDING:
            raise EventTooLong(f"a stream line is longer than {MAX_PENDING} bytes")
        return events
