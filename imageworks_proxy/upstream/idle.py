"""The idle limit on reading a streamed upstream body (``CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS``).

A timeout around every network read costs a timer armed and cancelled per read, on the streaming hot path.
:class:`IdleDeadline` keeps one timer per stream instead: moving the deadline is a plain assignment, and
the timer, when it fires early, re-arms itself for the deadline as it stands then. Only a read that is
still waiting when the deadline passes fails, with :class:`TimeoutError` raised from the read.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imageworks_proxy.upstream.wire import ResponseReader

#: Event loops may run a timer up to a millisecond early (libuv counts whole milliseconds): that is on time.
_EARLY_S = 0.001


class IdleDeadline:
    """The deadline for the next data from ``content`` (an upstream answer's body), ``idle_s`` after the
    last :meth:`restart` (or after construction).

    Call :meth:`arm` before each read and set :attr:`waiting` to false after it; call :meth:`restart`
    when data that counts arrived and :meth:`cancel` when the stream is done. A read that begins after
    the deadline passed fails as soon as it has to wait (data already buffered is still returned), as
    ``asyncio.timeout_at`` around it would.
    """

    __slots__ = ("_content", "_idle_s", "_loop", "_timer", "deadline", "waiting")

    def __init__(
        self, content: ResponseReader, idle_s: float, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._content = content
        self._idle_s = idle_s
        self._timer: asyncio.TimerHandle | None = None
        #: A read is waiting for data (between :meth:`arm` and its end).
        self.waiting = False
        self.deadline = self._loop.time() + idle_s

    def arm(self) -> None:
        """A read begins: it fails if it is still waiting at the deadline."""
        self.waiting = True
        if self._timer is None:
            self._timer = self._loop.call_at(self.deadline, self._expire)

    def restart(self) -> None:
        """Data arrived: the next is due ``idle_s`` from now."""
        self.deadline = self._loop.time() + self._idle_s

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.deadline - self._loop.time() > _EARLY_S:
            self._timer = self._loop.call_at(self.deadline, self._expire)  # moved on meanwhile
        elif self.waiting:
            self._content.set_exception(TimeoutError())
        # else: the deadline passed between reads; the next read arms a timer that fires at once
