"""The active-vLLM state file (``CHAT_PROXY_VLLM_STATE_PATH``, SPEC §11).

One JSON object describing the process the orchestrator (or ``imageworks-loader``) started: logical name,
served id, host/port, pid/pgid, start time, command and log path. Written atomically (temp file, fsync,
rename) so a reader never sees half a file. A proxy that starts next to a live process matching the file
adopts it; a file naming a dead process, or a pid now running something else, is stale and cleared; a file
that does not parse is corrupt and cleared.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import attrs
import orjson

from imageworks_proxy.upstream import process

log = logging.getLogger("imageworks_proxy.orchestrator")

FORMAT = 1


@attrs.frozen
class VllmState:
    logical_name: str
    served_model_id: str
    host: str
    port: int
    pid: int
    pgid: int
    started_at: float
    command: tuple[str, ...]
    #: ``command[:prefix_len]`` is the launcher; the rest is compared when adopting.
    prefix_len: int = 0
    log_path: str | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        return self.command[self.prefix_len:]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "logical_name": self.logical_name,
            "served_model_id": self.served_model_id,
            "host": self.host,
            "port": self.port,
            "pid": self.pid,
            "pgid": self.pgid,
            "started_at": self.started_at,
            "command": list(self.command),
            "prefix_len": self.prefix_len,
            "log_path": self.log_path,
        }

    @classmethod
    def from_json(cls, data: Any) -> VllmState:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            command = data["command"]
            if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
                raise ValueError("command must be a non-empty list of strings")
            prefix_len = int(data.get("prefix_len") or 0)
            if not 0 <= prefix_len < len(command):
                raise ValueError("prefix_len out of range")
            return cls(
                logical_name=str(data["logical_name"]),
                served_model_id=str(data["served_model_id"]),
                host=str(data.get("host") or "127.0.0.1"),
                port=int(data["port"]),
                pid=int(data["pid"]),
                pgid=int(data["pgid"]),
                started_at=float(data["started_at"]),
                command=tuple(command),
                prefix_len=prefix_len,
                log_path=str(data["log_path"]) if data.get("log_path") else None,
            )
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None


class StateFile:
    """Read, write and clear the state file at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read_raw(self) -> VllmState | None:
        """The recorded state, ``None`` when there is no file. Raises ``ValueError`` when it is corrupt."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        try:
            return VllmState.from_json(orjson.loads(data))
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None

    def write(self, state: VllmState) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".active_vllm.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(orjson.dumps(state.to_json(), option=orjson.OPT_INDENT_2))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def load_live(self) -> VllmState | None:
        """The recorded state when its process is alive and still runs the recorded command.

        A corrupt file, a dead pid, or a pid that now runs something else (pid reuse) clears the file
        and returns ``None``; no process is ever signalled here.
        """
        try:
            state = self.read_raw()
        except (ValueError, OSError) as exc:
            log.warning("vLLM state file %s is corrupt (%s); clearing it", self.path, exc)
            self.clear()
            return None
        if state is None:
            return None
        if not process.pid_alive(state.pid):
            if process.group_alive(state.pgid) and state.pgid == state.pid:
                # The API server died but engine processes of its group linger: still ours to stop.
                log.warning(
                    "vLLM %r (pid %d) is gone but its process group still runs", state.logical_name, state.pid
                )
                return state
            log.info("vLLM state file %s names pid %d, which is gone; clearing it", self.path, state.pid)
            self.clear()
            return None
        if not process.cmdline_matches(state.pid, state.flags):
            log.warning(
                "vLLM state file %s names pid %d, which now runs something else; clearing the file and "
                "leaving that process alone",
                self.path,
                state.pid,
            )
            self.clear()
            return None
        return state
