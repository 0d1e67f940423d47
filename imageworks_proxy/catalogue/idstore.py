"""The remembered public ids (``CHAT_PROXY_NAMES_PATH``): which entry each listed id names, so that an id
keeps naming the same model across registry edits and restarts (docs/registry.md, "Stable ids").

The file is one JSON object, ``{"format": 1, "ids": {"<public id>": "<logical name>", ...}}``, written
atomically (temp file, fsync, rename) in a worker thread. A missing file means nothing is remembered yet;
a file that does not parse is logged and treated as empty (the ids are then computed afresh and saved).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping

import orjson

log = logging.getLogger("imageworks_proxy.catalogue")

FORMAT = 1


def read_ids(path: str) -> dict[str, str]:
    """The remembered id -> logical name map at ``path``; ``{}`` when there is none or it is unreadable."""
    try:
        with open(path, "rb") as fh:
            data = orjson.loads(fh.read())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("model ids file %s cannot be read (%s); ids are assigned afresh", path, exc)
        return {}
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, dict):
        log.warning("model ids file %s has no \"ids\" object; ids are assigned afresh", path)
        return {}
    return {str(k): v for k, v in ids.items() if isinstance(v, str)}


def write_ids(path: str, ids: Mapping[str, str]) -> None:
    """Replace the file at ``path`` with ``ids`` atomically (creating its folder)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    body = orjson.dumps({"format": FORMAT, "ids": dict(sorted(ids.items()))}, option=orjson.OPT_INDENT_2)
    fd, tmp = tempfile.mkstemp(prefix=".model_ids.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class IdStore:
    """The remembered ids of one app: read once when it is built, saved when they change.

    :meth:`update` may run before the event loop does (while the app is built); the save then waits for
    :meth:`start`. Saves run one at a time in a worker thread; :meth:`close` waits for the last one.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.ids: dict[str, str] = read_ids(path)
        self._saved: dict[str, str] = dict(self.ids)
        self._started = False
        self._task: asyncio.Task[None] | None = None

    def update(self, ids: Mapping[str, str]) -> None:
        """The ids now assigned; saved (off the event loop) when they differ from the file."""
        self.ids = dict(ids)
        if self._started:
            self._kick()

    async def start(self) -> None:
        """The app started: save what changed while it was being built."""
        self._started = True
        self._kick()

    def _kick(self) -> None:
        if self.ids != self._saved and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._save(), name="model-ids-writer")

    async def _save(self) -> None:
        while self.ids != self._saved:
            ids = dict(self.ids)
            try:
                await asyncio.to_thread(write_ids, self.path, ids)
            except OSError as exc:
                log.warning("cannot save the model ids to %s: %s", self.path, exc)
                return
            self._saved = ids

    async def close(self) -> None:
        """Wait for a save in progress (the last assignments reach the file before the app stops)."""
        self._started = False
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
