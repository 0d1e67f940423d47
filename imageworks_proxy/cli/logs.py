"""Human log configuration for the command-line server."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


class _ThreadQueueHandler(logging.handlers.QueueHandler):
    """Hands the record to the writer thread untouched: the message is formatted there, off the event
    loop (``QueueHandler.prepare`` would format it here, which only matters for queues that pickle)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


#: Every line: ``2026-01-01 12:00:02,667 INFO imageworks_proxy.access: <message>``.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: A line queued without a LogRecord: (time.time(), level, logger name, %-format, its arguments).
Line = tuple[float, int, str, str, tuple[Any, ...]]


class _Formatter(logging.Formatter):
    """:data:`FORMAT`, with the date-time text built once per second rather than per record."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._asctime(record.created)

    def _asctime(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._text},{int((created - second) * 1000):03d}"

    def line(self, line: Line) -> str:
        """What :meth:`format` makes of a record with these fields, without the record."""
        created, level, name, msg, args = line
        return f"{self._asctime(created)} {logging.getLevelName(level)} {name}: {msg % args}"


class LogWriter:
    """Formats queued records and writes them to stderr from a thread, a batch every ``interval_s``.

    The thread sleeps between batches instead of waking for every record, so a busy server pays for a
    log line with a queue append, not with a thread switch and a write per line.
    """

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord | Line], formatter: _Formatter,
                 handler: logging.Handler, interval_s: float = 0.05) -> None:
        self.records = records
        self.formatter = formatter
        #: The root handler that feeds ``records``.
        self.handler = handler
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued and end the thread (idempotent)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._drain()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._drain()

    def direct(self, logger: logging.Logger) -> Callable[[int, str, tuple[Any, ...]], bool]:
        """A cheaper ``logger.log(level, msg, *args)`` for a line logged on every request.

        The returned function queues ``(time, level, name, msg, args)`` for this thread to format as
        :data:`FORMAT`, skipping the LogRecord, the logger's handler walk and the handler lock, and
        returns True; or does nothing and returns False when the line would go anywhere but here (a
        filter, a handler of its own, a handler added beside ours), so the caller logs it the usual way.
        The caller has checked ``logger.isEnabledFor(level)``.
        """
        put, now = self.records.put_nowait, time.time

        def log(level: int, msg: str, args: tuple[Any, ...]) -> bool:
            if not self._only_destination(logger, level):
                return False
            put((now(), level, logger.name, msg, args))
            return True

        return log

    def _only_destination(self, logger: logging.Logger, level: int) -> bool:
        """Whether ``logger.log(level, ...)`` would reach this writer's handler and nothing else."""
        if logger.filters or logger.disabled:
            return False
        mine = self.handler
        found = False
        current: logging.Logger | None = logger
        while current is not None:
            for handler in current.handlers:
                if handler is not mine or found or handler.filters or level < handler.level:
                    return False
                found = True
            if not current.propagate:
                break
            current = current.parent
        return found

    def _drain(self) -> None:
        lines = []
        while True:
            try:
                record = self.records.get_nowait()
            except queue.Empty:
                break
            try:
                if type(record) is tuple:
                    lines.append(self.formatter.line(record))
                else:
                    lines.append(self.formatter.format(record))
            except Exception as exc:  # a bad %-format must not lose the rest of the batch
                name, msg = (record[2], record[3]) if type(record) is tuple else (record.name, record.msg)
                lines.append(f"<unformattable log record from {name}: {msg!r} ({exc})>")
        if lines:
            try:
                sys.stderr.write("\n".join(lines) + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr closed: nowhere left to say so


def configure_logging(level: str) -> LogWriter:
    """Log to stderr through a queue: the event loop only enqueues records; a thread formats and writes
    them in batches, so neither a slow terminal or pipe nor per-line writes slow requests down. The
    writer is stopped (drained) at exit.

    This is process-wide setup for the command-line server only; an app embedded elsewhere logs through
    whatever logging its host configured.
    """
    # Per-record facts nobody reads in these lines (the logging HOWTO's "Optimization" section).
    logging._srcfile = None  # type: ignore[attr-defined]  # no caller lookup (stack walk) per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    records: queue.SimpleQueue[logging.LogRecord | Line] = queue.SimpleQueue()
    handler = _ThreadQueueHandler(records)
    writer = LogWriter(records, _Formatter(), handler)
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.addHandler(handler)
    writer.start()
    atexit.register(writer.stop)
    # aiohttp's access log would duplicate our per-request line and could log credentials in URLs.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return writer
