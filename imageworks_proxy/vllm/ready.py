"""Noticing that a starting vLLM is ready, within a few tens of milliseconds of it.

vLLM (uvicorn) logs ``Application startup complete.`` the moment it serves; the log file is read for that
line every :data:`WATCH_S` (a stat and a read of what was appended: microseconds), and the line is
confirmed by ``GET /health``. ``/health`` is also polled on its own, quickly at first and then more
slowly, for a launcher whose output lacks the line. A process that exits first fails the wait with the
log line that explains why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from imageworks_proxy.upstream import process

READY_LINE = b"Application startup complete"
#: How often the log is read for :data:`READY_LINE` (and the process looked at).
WATCH_S = 0.02
#: ``/health`` polls without the line: the first at once, then each 1.5x later, at most this far apart.
FIRST_POLL_S = 0.05
MAX_POLL_S = 1.0


class LogWatch:
    """Reads what is appended to ``path`` after ``offset`` and says when :data:`READY_LINE` shows up."""

    def __init__(self, path: str, offset: int) -> None:
        self.path = path
        self.offset = offset
        self._tail = b""
        self._fh = None

    def seen(self) -> bool:
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open across calls, closed by close()
            except OSError:
                return False
            self._fh.seek(self.offset)
        data = self._fh.read()
        if not data:
            return False
        text = self._tail + data
        if READY_LINE in text:
            return True
        self._tail = text[-len(READY_LINE):]
        return False

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


async def _healthy(session: aiohttp.ClientSession, url: str, timeout: float) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=max(0.05, timeout))) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def wait_ready(
    session: aiohttp.ClientSession,
    url: str,
    *,
    deadline: float,
    try_timeout: float,
    exited: Callable[[], int | bool | None],
    log_path: str | None,
    log_offset: int = 0,
) -> float:
    """Wait until the server at ``url`` (its ``/health``) is ready; return when it became ready
    (``time.monotonic()``: when the ready line appeared, else when ``/health`` first answered 200).

    ``exited()`` returns ``False`` while the process runs, else its exit code (or ``None`` if unknown).
    Raises ``process.StartFailed`` (with the explaining log line) when it exits first and
    ``process.StartTimeout`` when ``deadline`` (monotonic) passes.
    """
    watch = LogWatch(log_path, log_offset) if log_path else None
    line_at: float | None = None
    delay = FIRST_POLL_S
    next_poll = time.monotonic()
    try:
        while True:
            code = exited()
            if code is not False:
                lines = process.log_tail(log_path) if log_path else []
                why = process.explaining_line(lines)
                raise process.StartFailed(code if isinstance(code, int) else None, why)
            now = time.monotonic()
            if now >= deadline:
                raise process.StartTimeout()
            if line_at is None and watch is not None and watch.seen():
                line_at = next_poll = now
            if now >= next_poll:
                if await _healthy(session, url, min(try_timeout, deadline - now)):
                    return line_at if line_at is not None else time.monotonic()
                delay = FIRST_POLL_S if line_at is not None else min(delay * 1.5, MAX_POLL_S)
                next_poll = time.monotonic() + delay
            await asyncio.sleep(min(WATCH_S, max(0.0, deadline - time.monotonic())))
    finally:
        if watch is not None:
            watch.close()
