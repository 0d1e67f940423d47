"""Human log configuration for the command-line server."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading


class _ThreadQueueHandler(logging.handlers.QueueHandler):
    """Hands the record to the writer thread untouched: the message is formatted there, off the event
    loop (``QueueHandler.prepare`` would format it here, which only matters for queues that pickle)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _Formatter(logging.Formatter):
    """The standard format, with the date-time text built once per second rather than per record."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, super().formatTime(record, datefmt).rsplit(",", 1)[0]
        return f"{self._text},{int(record.msecs):03d}"


class LogWriter:
    """Formats queued records and writes them to stderr from a thread, a batch every ``interval_s``.

    The thread sleeps between batches instead of waking for every record, so a busy server pays for a
    log line with a queue append, not with a thread switch and a write per line.
    """

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord], formatter: logging.Formatter,
                 interval_s: float = 0.05) -> None:
        self.records = records
        self.formatter = formatter
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

    def _drain(self) -> None:
        lines = []
        while True:
            try:
                record = self.records.get_nowait()
            except queue.Empty:
                break
            try:
                lines.append(self.formatter.format(record))
            except Exception as exc:  # a bad %-format must not lose the rest of the batch
                lines.append(f"<unformattable log record from {record.name}: {record.msg!r} ({exc})>")
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
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = LogWriter(records, _Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.addHandler(_ThreadQueueHandler(records))
    writer.start()
    atexit.register(writer.stop)
    # aiohttp's access log would duplicate our per-request line and could log credentials in URLs.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return writer
