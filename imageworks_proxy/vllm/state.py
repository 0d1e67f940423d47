"""The vLLM state file (``CHAT_PROXY_VLLM_STATE_PATH``): every vLLM process the orchestrator (or
``imageworks-loader``) started and that is still resident, awake or asleep.

Each process is one JSON object: logical name, served id, host/port, pid/pgid, start time, command and log
path, and for a sleeping one (sleep mode, docs/vllm.md) ``sleep_level`` and ``asleep_since``. One awake
process is written as that object plus ``"format": 1`` (the file of versions without sleep mode, which
they still read); several, or a sleeping one, as ``{"format": 2, "instances": [...]}``, least recently
used sleeper first. Written atomically (temp file, fsync, rename) so a reader never sees half a file. A
proxy that starts next to live processes matching the file adopts them; an entry naming a dead process,
or a pid now running something else, is stale and dropped; a file that does not parse is corrupt and
cleared.

The ``format`` envelope is kept apart from :class:`VllmState` (:func:`encode_states`/:func:`decode_states`),
so how one instance is read or written does not depend on how many there are.
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

from imageworks_proxy.catalogue.entry import (
    InvalidValue,
    describe,
    opt_int,
    opt_number,
    opt_str,
    required,
    text,
)
from imageworks_proxy.upstream import process

log = logging.getLogger("imageworks_proxy.orchestrator")

FORMAT = 1
#: Several instances, or a sleeping one.
FORMAT_MANY = 2
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
    #: 0 while awake, else the level it was put to sleep with (1 or 2).
    sleep_level: int = 0
    #: When it was put to sleep (``time.time()``); None while awake.
    asleep_since: float | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        return self.command[self.prefix_len:]

    @property
    def asleep(self) -> bool:
        return self.sleep_level > 0


def _host(value: Any, _: Any = None) -> str:
    return opt_str(value) or DEFAULT_HOST


_integer = required(opt_int, "an integer")
_number = required(opt_number, "a number")


def _time(value: Any, _: Any = None) -> float:
    return float(_number(value))


def _command(value: Any, _: Any = None) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise InvalidValue("expected a non-empty list of strings")


def _level(value: Any, _: Any = None) -> int:
    number = opt_int(value) or 0
    if number not in (0, 1, 2):
        raise InvalidValue(f"expected 0, 1 or 2, got {value!r}")
    return number


def _opt_time(value: Any, _: Any = None) -> float | None:
    number = opt_number(value)
    return None if number is None else float(number)


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
        logical_name=override(struct_hook=text),
        served_model_id=override(struct_hook=text),
        host=override(struct_hook=_host),
        port=override(struct_hook=_integer),
        pid=override(struct_hook=_integer),
        pgid=override(struct_hook=_integer),
        started_at=override(struct_hook=_time),
        command=override(struct_hook=_command),
        prefix_len=override(struct_hook=lambda v, _: opt_int(v) or 0),
        log_path=override(struct_hook=opt_str),
        sleep_level=override(struct_hook=_level),
        asleep_since=override(struct_hook=_opt_time),
    )
    conv.register_structure_hook(VllmState, _instance(fields))
    return conv


_SLEEP_FIELDS = ("sleep_level", "asleep_since")


def encode_state(converter: Converter, state: VllmState) -> bytes:
    """The state file's bytes for one awake instance: ``{"format": 1, <fields>}``, indented."""
    fields = {k: v for k, v in converter.unstructure(state).items() if k not in _SLEEP_FIELDS}
    return orjson.dumps({"format": FORMAT, **fields}, option=orjson.OPT_INDENT_2)


def encode_states(converter: Converter, states: list[VllmState]) -> bytes:
    """The state file's bytes for ``states``: format 1 for a single awake instance, else
    ``{"format": 2, "instances": [...]}``."""
    if len(states) == 1 and not states[0].asleep:
        return encode_state(converter, states[0])
    doc = {"format": FORMAT_MANY, "instances": [converter.unstructure(s) for s in states]}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def _structure(converter: Converter, value: Any, where: str = "") -> VllmState:
    try:
        return converter.structure(value, VllmState)
    except (ClassValidationError, InvalidValue) as exc:
        raise ValueError(where + "; ".join(describe(exc))) from None


def decode_states(converter: Converter, data: bytes) -> list[VllmState]:
    """The instances recorded in ``data`` (format 1 or 2); raises ``ValueError`` saying what is wrong
    (and where)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format", FORMAT)
    if fmt == FORMAT:
        return [_structure(converter, {k: v for k, v in doc.items() if k != "format"})]
    if fmt != FORMAT_MANY:
        raise ValueError(f"format {doc['format']!r} is not one this version reads ({FORMAT}, {FORMAT_MANY})")
    items = doc.get("instances")
    if not isinstance(items, list):
        raise ValueError("instances: expected a list")
    return [_structure(converter, item, f"instances[{i}]: ") for i, item in enumerate(items)]


def decode_state(converter: Converter, data: bytes) -> VllmState:
    """The first instance recorded in ``data``; raises ``ValueError`` when it is corrupt or empty."""
    states = decode_states(converter, data)
    if not states:
        raise ValueError("instances: empty")
    return states[0]


class StateFile:
    """Read, write and clear the state file at ``path``.

    ``converter`` is :func:`make_state_converter`'s, built here when ``None``.
    """

    def __init__(self, path: str, converter: Converter | None = None) -> None:
        self.path = path
        self.converter = converter or make_state_converter()

    def read_all(self) -> list[VllmState]:
        """Every recorded instance (empty when there is no file). Raises ``ValueError`` when it is corrupt."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        return decode_states(self.converter, data)

    def read_raw(self) -> VllmState | None:
        """The first recorded instance, ``None`` when there is no file. Raises ``ValueError`` when it is
        corrupt."""
        states = self.read_all()
        return states[0] if states else None

    def write(self, state: VllmState) -> None:
        self.write_all([state])

    def write_all(self, states: list[VllmState]) -> None:
        """Record exactly ``states`` (no file when there are none)."""
        if not states:
            self.clear()
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".active_vllm.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(encode_states(self.converter, states))
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
        """The first instance :meth:`load_all_live` returns, or ``None``."""
        states = self.load_all_live()
        return states[0] if states else None

    def load_all_live(self) -> list[VllmState]:
        """The recorded instances whose process is alive and still runs the recorded command.

        A corrupt file is cleared; entries naming a dead pid, or a pid that now runs something else (pid
        reuse), are dropped from the file. No process is ever signalled here.
        """
        try:
            states = self.read_all()
        except (ValueError, OSError) as exc:
            log.warning("vLLM state file %s is corrupt (%s); clearing it", self.path, exc)
            self.clear()
            return []
        live = [state for state in states if self._live(state)]
        if len(live) != len(states):
            self.write_all(live)
        return live

    def _live(self, state: VllmState) -> bool:
        if not process.pid_alive(state.pid):
            if process.group_alive(state.pgid) and state.pgid == state.pid:
                # The API server died but engine processes of its group linger: still ours to stop.
                log.warning(
                    "vLLM %r (pid %d) is gone but its process group still runs", state.logical_name, state.pid
                )
                return True
            log.info("vLLM state file %s names pid %d, which is gone; dropping it", self.path, state.pid)
            return False
        if not process.cmdline_matches(state.pid, state.flags):
            log.warning(
                "vLLM state file %s names pid %d, which now runs something else; dropping it from the file "
                "and leaving that process alone",
                self.path,
                state.pid,
            )
            return False
        return True
