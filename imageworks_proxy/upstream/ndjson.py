"""Newline-delimited JSON from an upstream (Ollama's streams), split from raw socket reads.

aiohttp's line reader caps a line at 128 KiB; a long reasoning trace or a tool call's arguments can be
longer, so the stream is split here instead.
"""

from __future__ import annotations

from typing import Any

import orjson

from imageworks_proxy.errors import ProxyError


class NdjsonSplitter:
    """Splits a byte stream into its non-empty lines; feed it whatever each read returned."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        end = self._buf.rfind(b"\n")
        if end < 0:
            return []
        complete = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return [line for line in complete.split(b"\n") if line.strip()]

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
