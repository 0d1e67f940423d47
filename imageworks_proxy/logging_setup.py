"""Human log configuration for the command-line server."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from typing import TextIO


class _BurstFlushHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes records as the listener thread drains them, flushing once a burst is written rather than
    after every line."""

    def __init__(self, stream: TextIO, pending: queue.SimpleQueue[logging.LogRecord]) -> None:
        super().__init__(stream)
        self._pending = pending

    def flush(self) -> None:
        if self._pending.empty():
            super().flush()


class _ThreadQueueHandler(logging.handlers.QueueHandler):
    """Hands the record to the listener thread untouched: the message is formatted there, off the event
    loop (``QueueHandler.prepare`` would format it here, which only matters for queues that pickle)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def configure_logging(level: str) -> logging.handlers.QueueListener:
    """Log to stderr through a queue: the event loop only enqueues records; a thread formats and writes
    them, so a slow terminal or pipe never stalls requests. The listener is stopped (drained) at exit.

    This is process-wide setup for the command-line server only; an app embedded elsewhere logs through
    whatever logging its host configured.
    """
    # Per-record facts nobody reads in these lines (the logging HOWTO's "Optimization" section).
    logging._srcfile = None  # type: ignore[attr-defined]  # no caller lookup (stack walk) per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _BurstFlushHandler(sys.stderr, records)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.addHandler(_ThreadQueueHandler(records))
    listener.start()
    atexit.register(listener.stop)
    # aiohttp's access log would duplicate our per-request line and could log credentials in URLs.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return listener
