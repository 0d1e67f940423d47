"""The active-vLLM state file (``CHAT_PROXY_VLLM_STATE_PATH``).

One JSON object describing the process the orchestrator (or ``imageworks-loader``) started: logical name,
served id, host/port, pid/pgid, start time, command and log path, plus ``"format": 1``. Written atomically
(temp file, fsync, rename) so a reader never sees half a file. A proxy that starts next to a live process
matching the file adopts it; a file naming a dead process, or a pid now running something else, is stale
and cleared; a file that does not parse is corrupt and cleared.

The ``format`` envelope is kept apart from :class:`VllmState` (:func:`encode_state`/:func:`decode_state`),
so a later format can hold several instances without touching how one instance is read or written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import attrs
import orjson
from cattrs import Converter
from cattrs.errors import ClassValidationError
from cattrs.gen import make_dict_structure_fn, override
from cattrs.preconf.orjson import make_converter

from imageworks_proxy.catalogue.entry import InvalidValue, describe, opt_int, opt_number, opt_str
from imageworks_proxy.upstream import process

log = logging.getLogger("imageworks_proxy.orchestrator")

FORMAT = 1
DEFAULT_HOST = "127.0.0.1"


@attrs.frozen
class VllmState:
    """One vLLM process as recorded in the state file."""

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


def _text(value: Any, _: Any = None) -> str:
    if isinstance(value, str) and value:
        return value
    raise InvalidValue(f"expected a non-empty string, got {value!r}")


def _host(value: Any, _: Any = None) -> str:
    return opt_str(value) or DEFAULT_HOST


def _integer(value: Any, _: Any = None) -> int:
    number = opt_int(value)
    if number is None:
        raise InvalidValue(f"expected an integer, got {value!r}")
    return number


def _time(value: Any, _: Any = None) -> float:
    number = opt_number(value)
    if number is None:
        raise InvalidValue(f"expected a number, got {value!r}")
    return float(number)


def _command(value: Any, _: Any = None) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise InvalidValue("expected a non-empty list of strings")


def _instance(fields: Any) -> Any:
    def structure(value: Any, cls: Any) -> VllmState:
        if not isinstance(value, Mapping):
            raise InvalidValue(f"expected a JSON object, got {type(value).__name__}")
        state = fields({"host": None, **value}, cls)  # older files may lack the host
        if not 0 <= state.prefix_len < len(state.command):
            raise InvalidValue(f"out of range for a command of {len(state.command)} words", path="prefix_len")
        return state

    return structure


def make_state_converter() -> Converter:
    """Build the converter for :class:`VllmState`; build it once and pass it on (``StateFile`` holds one).

    ``structure`` raises ``cattrs.ClassValidationError`` or :class:`InvalidValue` for a bad value.
    """
    conv = make_converter(detailed_validation=True)
    fields = make_dict_structure_fn(
        VllmState,
        conv,
        logical_name=override(struct_hook=_text),
        served_model_id=override(struct_hook=_text),
        host=override(struct_hook=_host),
        port=override(struct_hook=_integer),
        pid=override(struct_hook=_integer),
        pgid=override(struct_hook=_integer),
        started_at=override(struct_hook=_time),
        command=override(struct_hook=_command),
        prefix_len=override(struct_hook=lambda v, _: opt_int(v) or 0),
        log_path=override(struct_hook=opt_str),
    )
    conv.register_structure_hook(VllmState, _instance(fields))
    return conv


def encode_state(converter: Converter, state: VllmState) -> bytes:
    """The state file's bytes for ``state``: ``{"format": 1, <fields>}``, indented."""
    return orjson.dumps({"format": FORMAT, **converter.unstructure(state)}, option=orjson.OPT_INDENT_2)


def decode_state(converter: Converter, data: bytes) -> VllmState:
    """The state recorded in ``data``; raises ``ValueError`` saying what is wrong (and where)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("format", FORMAT) != FORMAT:
        raise ValueError(f"format {doc['format']!r} is not one this version reads ({FORMAT})")
    try:
        return converter.structure({k: v for k, v in doc.items() if k != "format"}, VllmState)
    except (ClassValidationError, InvalidValue) as exc:
        raise ValueError("; ".join(describe(exc))) from None


class StateFile:
    """Read, write and clear the state file at ``path``.

    ``converter`` is :func:`make_state_converter`'s, built here when ``None``.
    """

    def __init__(self, path: str, converter: Converter | None = None) -> None:
        self.path = path
        self.converter = converter or make_state_converter()

    def read_raw(self) -> VllmState | None:
        """The recorded state, ``None`` when there is no file. Raises ``ValueError`` when it is corrupt."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return decode_state(self.converter, data)

    def write(self, state: VllmState) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".active_vllm.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(encode_state(self.converter, state))
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
