"""One owner process per vLLM state file: an exclusive POSIX record lock (``lockf``) on
``<CHAT_PROXY_VLLM_STATE_PATH>.lock``.

A proxy takes it when it starts, before any adapter looks at vLLM, and holds it for its whole life;
``imageworks-loader`` takes it while it acts directly. Whoever comes second learns who holds it (the lock
file names the holder's pid, program and URL) and touches nothing. The kernel drops the lock when the
holder's process ends, however it ends, so a crash never leaves a stale lock behind, and the vLLM
processes a proxy starts never inherit it. The file itself is never deleted (deleting a lock file lets two
processes lock two different files).

A POSIX lock belongs to the process, not to one open file: two apps built in one process (tests, an
embedding host) do not exclude each other, and the first of them to stop releases it for both. Two apps in
one process that both orchestrate vLLM need their own state paths.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Any

import orjson


class StateLockHeld(RuntimeError):
    """Another process holds the state file; ``holder`` is what it wrote into the lock file (may be
    ``{}`` when it had not written yet). The message is one line for the user."""

    def __init__(self, state_path: str, holder: dict[str, Any]) -> None:
        who = holder.get("program") or "another process"
        details = ", ".join(
            str(x) for x in (f"pid {holder['pid']}" if holder.get("pid") else None, holder.get("url")) if x
        )
        super().__init__(
            f"{who}{f' ({details})' if details else ''} already uses the vLLM state file {state_path}; "
            "only one proxy may manage it. Stop that one, or give this one its own "
            "CHAT_PROXY_VLLM_STATE_PATH."
        )
        self.state_path = state_path
        self.holder = holder


def lock_path(state_path: str) -> str:
    return state_path + ".lock"


def read_holder(state_path: str) -> dict[str, Any]:
    """What the current holder wrote into the lock file (``{}`` when nothing readable is there)."""
    try:
        with open(lock_path(state_path), "rb") as fh:
            data = orjson.loads(fh.read() or b"{}")
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class StateLock:
    """The lock on one state file. :meth:`acquire` never waits; :meth:`release` is idempotent."""

    def __init__(self, state_path: str) -> None:
        self.state_path = state_path
        self.path = lock_path(state_path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, holder: dict[str, Any]) -> None:
        """Take the lock and write ``holder`` (pid, program, url) into the file for whoever comes next.

        Raises :class:`StateLockHeld` when another process holds it; ``OSError`` when the folder cannot be
        created or the file opened.
        """
        if self._fd is not None:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise StateLockHeld(self.state_path, read_holder(self.state_path)) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, orjson.dumps(holder) + b"\n", 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing it drops the lock
