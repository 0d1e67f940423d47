"""Human log configuration for the command-line server."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue


def configure_logging(level: str) -> logging.handlers.QueueListener:
    """Log to stderr through a queue: the event loop only enqueues records, a thread formats and writes them
    (a slow terminal or pipe never stalls requests). The listener is stopped (and drained) at exit."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.addHandler(logging.handlers.QueueHandler(records))
    listener.start()
    atexit.register(listener.stop)
    # aiohttp's access log would duplicate our per-request line and could log credentials in URLs.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return listener
