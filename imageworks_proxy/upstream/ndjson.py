"""Newline-delimited JSON from an upstream (Ollama's streams), split from raw socket reads.

aiohttp's line reader caps a line at 128 KiB; a long reasoning trace or a tool call's arguments can be
longer, so the stream is split here instead.
"""

from __future__ import annotations

from typing import Any

import orjson

from imageworks_proxy.errors import ProxyError

#: The most an upstream may send without a newline (the same cap as the SSE parser's).
MAX_LINE = 8 * 1024 * 1024


class NdjsonSplitter:
    """Splits a byte stream into its non-empty lines; feed it whatever each read returned.

    A line longer than :data:`MAX_LINE` is a :class:`ProxyError` 502 naming ``who``: an upstream that never
    ends its line cannot grow the proxy without bound.
    """

    def __init__(self, who: str = "The backend") -> None:
        self._buf = bytearray()
        self._who = who

    def feed(self, data: bytes) -> list[bytes]:
        end = data.rfind(b"\n")  # only the new bytes are searched: a long line is not rescanned per read
        if end < 0:
            self._buf += data
            self._check()
            return []
        complete = bytes(self._buf) + data[:end] if self._buf else data[:end]
        self._buf = bytearray(data[end + 1 :])
        self._check()
        return [line for line in complete.split(b"\n") if line.strip()]

    def _check(self) -> None:
        if len(self._buf) > MAX_LINE:
            self._buf = bytearray()
            raise ProxyError(
                502, "backend_error", f"{self._who} sent a stream line longer than {MAX_LINE} bytes"
            )

    def close(self) -> list[bytes]:
        """Whatever followed the last newline (a final line without ``\\n``)."""
        rest, self._buf = bytes(self._buf), bytearray()
        return [rest] if rest.strip() else []


def decode_line(line: bytes, who: str = "The backend") -> Any:
    """One NDJSON line; :class:`ProxyError` 502 when it is not JSON."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ProxyError(
            502, "backend_error", f"{who} sent a line that is not JSON: {line[:200]!r}"
        ) from None
