"""One vLLM process the proxy started or adopted: where it listens, how it was launched, and whether it is
awake or asleep (sleep mode, docs/vllm.md)."""

from __future__ import annotations

import attrs

from imageworks_proxy.upstream import process
from imageworks_proxy.vllm.command import flag_value, without_port
from imageworks_proxy.vllm.state import VllmState


@attrs.define(eq=False)
class Instance:
    """A vLLM process we started or adopted."""

    logical_name: str
    served_model_id: str
    host: str
    port: int
    pid: int
    pgid: int
    command: tuple[str, ...]
    prefix_len: int
    started_at: float
    log_path: str | None
    adopted: bool
    ready: bool = False
    stopping: bool = False
    ready_at: float | None = None
    returncode: int | None = None
    #: 0 while awake, else the level it sleeps at (1: weights in CPU memory, 2: weights discarded).
    sleep_level: int = 0
    #: When it was put to sleep (``time.time()``); the oldest sleeper is the least recently used.
    asleep_since: float | None = None
    #: What is being done to it right now: ``"sleeping"``, ``"waking"`` or None.
    transition: str | None = None
    #: Level 1: the host memory its weights take while it sleeps (their size on disk), when known.
    host_bytes: int | None = None

    def poll(self) -> bool:
        """Whether the process still runs (our own exited child is reaped and its code kept)."""
        if not self.adopted and self.returncode is None:
            code = process.reap(self.pid)
            if code is not None:
                self.returncode = code
                return False
        return process.pid_alive(self.pid)

    @property
    def asleep(self) -> bool:
        return self.sleep_level > 0

    @property
    def flags(self) -> tuple[str, ...]:
        return self.command[self.prefix_len:]

    @property
    def identity(self) -> tuple[str, ...]:
        """The flags that say which model runs with which settings (the port aside)."""
        return without_port(self.flags)

    @property
    def model_source(self) -> str | None:
        """What vLLM loaded (``--model``): a directory, a file or a hub id."""
        return flag_value(self.flags, "--model")

    def gpu_memory_utilization(self, default: float) -> float:
        try:
            return float(flag_value(self.flags, "--gpu-memory-utilization") or default)
        except ValueError:
            return default

    @property
    def root_url(self) -> str:
        return f"http://{process.url_host(self.host)}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def to_state(self) -> VllmState:
        return VllmState(
            self.logical_name,
            self.served_model_id,
            self.host,
            self.port,
            self.pid,
            self.pgid,
            self.started_at,
            self.command,
            self.prefix_len,
            self.log_path,
            self.sleep_level,
            self.asleep_since,
        )

    @classmethod
    def from_state(cls, state: VllmState) -> Instance:
        """An adopted instance as the state file records it (``ready`` is for the caller to find out)."""
        return cls(
            state.logical_name,
            state.served_model_id,
            state.host,
            state.port,
            state.pid,
            state.pgid,
            state.command,
            state.prefix_len,
            state.started_at,
            state.log_path,
            adopted=True,
            sleep_level=state.sleep_level,
            asleep_since=state.asleep_since,
        )
