"""The JSONL request log: one line per chat request, written off the event loop (its fields:
docs/observability.md).

A request hands its record to :meth:`RequestLog.submit`, which only appends to an in-memory queue (a
list and an :class:`asyncio.Event`) and never waits. A background task lets a batch gather for a few
milliseconds, then takes everything queued and encodes and writes it in one call to a worker thread, so
under load one thread hop covers many records. When the queue is full the record is dropped and
counted; a disk error is counted and logged, never raised.
Before a line would take the file past ``max_bytes`` the file is renamed to ``<path>.1`` (replacing the
previous generation) and a new one starts.

Records are bounded, so a client cannot wipe the log with a few giant requests: top-level strings are cut
to :data:`MAX_FIELD_CHARS`, and a record still over its byte limit loses its large values (prompts, reply)
and says so with ``record_truncated: true``. A file deleted or moved aside from outside (an operator, a
log rotator) is noticed once per batch and the log starts a new file at its path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

import orjson
from aiohttp import web

from imageworks_proxy.wire.content import (
    decoded_size,
    describe_data_url,
    image_url_of,
    is_image_part,
    with_image_url,
)

log = logging.getLogger("imageworks_proxy.observability.requestlog")

#: Records waiting for the writer before new ones are dropped (about 10 MB of typical records).
DEFAULT_MAX_QUEUE = 10_000
#: After the first record of a quiet spell, wait this long so a batch can gather: under load this is
#: one thread hop (and one write) per interval rather than per request.
DEFAULT_BATCH_DELAY_S = 0.05
#: Top-level string values (``model``, ``error_code``, ...) longer than this are cut.
MAX_FIELD_CHARS = 512
#: The most one record may take: 1 MiB, and never more than an eighth of a log generation.
MAX_RECORD_BYTES = 1024 * 1024


class RequestLog:
    """A size-rotated JSONL file fed through a bounded queue by a background writer.

    An empty ``path`` disables the log: :meth:`submit` then does nothing. Counters (read them from the
    event loop): ``written``, ``dropped`` (queue full, or submitted while the writer is not running),
    ``write_errors`` (records lost to a failing disk) and ``rotations``.
    """

    def __init__(
        self,
        path: str,
        max_bytes: int,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_delay_s: float = DEFAULT_BATCH_DELAY_S,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_record_bytes = max(4096, min(MAX_RECORD_BYTES, max_bytes // 8))
        self.max_queue = max_queue
        self.batch_delay_s = batch_delay_s
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self.rotations = 0
        self._pending: list[dict[str, Any]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._idle: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        # Only the writer thread touches these (one batch at a time).
        self._fh: BinaryIO | None = None
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the open file
        self._size = 0
        self._failing = False
        self._iso_second = -1
        self._iso_prefix = ""

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks. ``record["ts"]`` may be a POSIX timestamp (written as ISO-8601
        UTC).

        The record must not be changed after it is submitted (the writer thread serialises it later).
        """
        if self._wake is None or len(self._pending) >= self.max_queue:
            if self.path:
                self.dropped += 1
            return
        self._pending.append(record)
        self._wake.set()
        self._idle.clear()  # type: ignore[union-attr]

    async def start(self) -> None:
        if not self.path or self._task is not None:
            return
        self._stopping = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()
        await asyncio.to_thread(self._open_quietly)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="request-log-writer")

    async def stop(self) -> None:
        """Write everything still queued, then close the file."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        assert self._wake is not None and self._hurry is not None
        self._hurry.set()
        self._wake.set()
        try:
            await task
        finally:
            self._task = None
            self._wake = None
            self._idle = None
            self._hurry = None
            await asyncio.to_thread(self._close)

    async def flush(self) -> None:
        """Wait until every record submitted so far has been handed to the file (or counted as lost)."""
        if self._idle is not None and self._hurry is not None:
            self._hurry.set()
            try:
                await self._idle.wait()
            finally:
                if self._hurry is not None and not self._stopping:
                    self._hurry.clear()

    async def _run(self) -> None:
        assert self._wake is not None and self._hurry is not None
        while True:
            await self._wake.wait()
            if self.batch_delay_s > 0 and not self._hurry.is_set():
                try:
                    async with asyncio.timeout(self.batch_delay_s):
                        await self._hurry.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            if self._pending:
                batch, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self._write_batch, batch)
                except Exception:  # never let the writer die; the batch is lost and counted
                    self.write_errors += len(batch)
                    log.exception("request log writer failed")
                if self._pending:
                    continue  # records arrived while we wrote
            assert self._idle is not None
            self._idle.set()
            if self._stopping:
                return

    # --- writer thread -------------------------------------------------------------------------

    def _iso(self, ts: float) -> str:
        """ISO-8601 UTC with milliseconds; the date-time part is formatted once per second."""
        second = int(ts)
        if second != self._iso_second:
            self._iso_second = second
            self._iso_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._iso_prefix}.{int((ts - second) * 1000):03d}Z"

    def _encode(self, record: dict[str, Any]) -> bytes | None:
        ts = record.get("ts")
        if isinstance(ts, float):
            record["ts"] = self._iso(ts)
        try:
            line = orjson.dumps(record, default=str) + b"\n"
            # A string over the limit makes the line longer than the limit: only then look for one.
            if len(line) > MAX_FIELD_CHARS and self._cut_strings(record):
                line = orjson.dumps(record, default=str) + b"\n"
            if len(line) > self.max_record_bytes:
                line = orjson.dumps(self._shrunk(record, len(line)), default=str) + b"\n"
            return line
        except (TypeError, orjson.JSONEncodeError) as exc:
            log.warning("request log: cannot encode a record (%s)", exc)
            return None

    @staticmethod
    def _cut_strings(record: dict[str, Any]) -> bool:
        """Cut top-level strings to :data:`MAX_FIELD_CHARS`; whether any was."""
        cut = False
        for key, value in record.items():
            if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
                record[key] = value[:MAX_FIELD_CHARS] + "..."
                cut = True
        return cut

    def _shrunk(self, record: dict[str, Any], size: int) -> dict[str, Any]:
        """``record`` without its lists and objects (the prompts, the reply): it was ``size`` bytes."""
        note = f"<omitted: the record was {size} bytes, over the {self.max_record_bytes}-byte limit>"
        out = {k: note if isinstance(v, (dict, list, tuple)) else v for k, v in record.items()}
        out["record_truncated"] = True
        return out

    def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        lines = [line for line in map(self._encode, batch) if line is not None]
        self.write_errors += len(batch) - len(lines)
        done = 0
        try:
            fh = self._open()
            segment: list[bytes] = []
            for line in lines:
                if self._size and self._size + len(line) > self.max_bytes:
                    if segment:
                        fh.write(b"".join(segment))
                        done += len(segment)
                        segment = []
                    fh = self._rotate()
                segment.append(line)
                self._size += len(line)
            if segment:
                fh.write(b"".join(segment))
            fh.flush()
            done = len(lines)
        except OSError as exc:
            self.write_errors += len(lines) - done
            self._close()
            if not self._failing:
                log.warning("request log %s is not writable, records are being lost: %s", self.path, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("request log %s is writable again", self.path)
            self._failing = False
        self.written += done

    def _open(self) -> BinaryIO:
        if self._fh is not None and not self._still_at_path():
            log.info("request log %s was deleted or moved aside; starting a new file there", self.path)
            self._close()
        if self._fh is None:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            fh = open(self.path, "ab")  # noqa: SIM115 - kept open across batches, closed in _close
            st = os.fstat(fh.fileno())
            self._size, self._file_id = st.st_size, (st.st_dev, st.st_ino)
            self._fh = fh
        return self._fh

    def _still_at_path(self) -> bool:
        """Is the open file still the one at ``path``? (One stat per batch, not per record.)"""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._file_id

    def _open_quietly(self) -> None:
        try:
            self._open()
        except OSError as exc:
            log.warning("request log %s cannot be opened (will retry on each write): %s", self.path, exc)
            self._failing = True

    def _rotate(self) -> BinaryIO:
        self._close()
        os.replace(self.path, self.path + ".1")
        self.rotations += 1
        return self._open()

    def _close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError as exc:
                log.warning("request log %s: close failed: %s", self.path, exc)


async def lifetime(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the app's request log writer runs while the app runs."""
    from imageworks_proxy import keys

    request_log = keys.request_log(app)
    await request_log.start()
    try:
        yield
    finally:
        await request_log.stop()


# --- prompt redaction ----------------------------------------------------------------------------


def _redact_part(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if is_image_part(part):
        url = image_url_of(part)
        summary = describe_data_url(url) if url else None
        return with_image_url(part, summary) if summary is not None else part
    if kind == "input_audio":
        audio = part.get("input_audio")
        if isinstance(audio, dict) and isinstance(audio.get("data"), str):
            fmt = audio.get("format") or "audio"
            size = decoded_size(audio["data"])
            return {**part, "input_audio": {**audio, "data": f"<audio/{fmt} {size} bytes>"}}
        return part
    if kind == "file":
        file = part.get("file")
        if isinstance(file, dict) and isinstance(file.get("file_data"), str):
            data = file["file_data"]
            summary = describe_data_url(data) or f"<file {len(data)} chars>"
            return {**part, "file": {**file, "file_data": summary}}
    return part


def redact_messages(messages: Any) -> Any:
    """A copy of ``messages`` with inline image/audio/file data replaced by a short description.

    Text is kept (this runs only when the operator asked for prompts in the log); http(s) image URLs are
    kept as they are. Anything that is not a list of message objects is returned unchanged.
    """
    if not isinstance(messages, list):
        return messages
    out = []
    for msg in messages:
        if isinstance(msg, dict):
            content = msg.get("content")
            if isinstance(content, list):
                msg = {**msg, "content": [_redact_part(p) for p in content]}
            images = msg.get("images")  # Ollama-style base64 list, should one arrive
            if isinstance(images, list) and images:
                msg = {
                    **msg,
                    "images": [
                        f"<image {decoded_size(i)} bytes>" if isinstance(i, str) else i for i in images
                    ],
                }
        out.append(msg)
    return out
