"""The one vLLM process on ``CHAT_PROXY_VLLM_PORT``: launch, readiness, stop, adoption and crash
detection. Scheduling (who may use it, when to switch) is :mod:`imageworks_proxy.gpu.scheduler`'s job;
this class only makes "model X is running and healthy" or "nothing is running" true, one operation at a
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from collections.abc import Callable

import aiohttp
import attrs

from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.nvml import Gpu
from imageworks_proxy.upstream import process
from imageworks_proxy.upstream.process import safe_name
from imageworks_proxy.vllm.command import VllmCommand, build_command
from imageworks_proxy.vllm.state import StateFile, VllmState

log = logging.getLogger("imageworks_proxy.orchestrator")

MONITOR_S = 0.25


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

    def poll(self) -> bool:
        """Whether the process still runs (our own exited child is reaped and its code kept)."""
        if not self.adopted and self.returncode is None:
            code = process.reap(self.pid)
            if code is not None:
                self.returncode = code
                return False
        return process.pid_alive(self.pid)

    @property
    def flags(self) -> tuple[str, ...]:
        return self.command[self.prefix_len:]

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
        )


def log_path_for(config: Config, name: str) -> str:
    return os.path.join(config.vllm_log_dir, safe_name(name) + ".log")


class VllmSupervisor:
    """Owns the single vLLM process. ``session`` returns the HTTP client session used for health polls;
    ``on_exit(instance, exit_code, log_line)`` is called when a ready process dies on its own."""

    def __init__(
        self,
        config: Config,
        session: Callable[[], aiohttp.ClientSession],
        gpu: Gpu | None = None,
        on_exit: Callable[[Instance, int | None, str | None], None] | None = None,
    ) -> None:
        self.config = config
        self._session = session
        self.gpu = gpu
        self.on_exit = on_exit
        self.state_file = StateFile(config.vllm_state_path)
        self.instance: Instance | None = None
        #: The logical name being started right now (for ``loading`` status).
        self.starting: str | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self.launches = 0

    # -- lifecycle -----------------------------------------------------------------------------
    async def adopt(self) -> Instance | None:
        """Adopt the live process the state file names (a restarted proxy, or ``imageworks-loader``
        started it); clear a stale or corrupt file. Never starts anything."""
        async with self._lock:
            state = await asyncio.to_thread(self.state_file.load_live)
            if state is None:
                return None
            inst = Instance(
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
            )
            if not process.pid_alive(state.pid):
                # Only leftovers of its process group remain (e.g. an orphaned engine core holding VRAM).
                self.instance = inst
                await self._stop_locked("leftover processes of a dead vLLM")
                return None
            self.instance = inst
            inst.ready = await self._healthy(inst)
            if inst.ready:
                inst.ready_at = time.monotonic()
            log.info(
                "vLLM: adopted running model %r (pid %d, port %d, %s) from %s",
                inst.logical_name,
                inst.pid,
                inst.port,
                "healthy" if inst.ready else "not healthy yet",
                self.state_file.path,
            )
            return inst

    def start_monitor(self) -> None:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="vllm-monitor")

    async def close(self, *, keep: bool = False) -> None:
        """Stop the monitor and the process (unless ``keep``: leave it recorded for the next proxy)."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        inst = self.instance
        if inst is None:
            return
        if keep and inst.ready and not inst.stopping and process.pid_alive(inst.pid):
            log.info(
                "vLLM: leaving %r (pid %d) running for the next proxy (CHAT_PROXY_VLLM_KEEP_ON_EXIT=1)",
                inst.logical_name,
                inst.pid,
            )
            self.instance = None
            return
        await self.stop("proxy shutting down")

    # -- queries -------------------------------------------------------------------------------
    def status_of(self, name: str) -> str:
        inst = self.instance
        if inst is not None and inst.logical_name == name and not inst.stopping:
            return "loaded" if inst.ready else "loading"
        if self.starting == name:
            return "loading"
        return "stopped"

    def alive(self) -> bool:
        inst = self.instance
        return inst is not None and process.pid_alive(inst.pid)

    # -- operations ----------------------------------------------------------------------------
    async def ensure(self, entry: Entry) -> Instance:
        """Make ``entry`` the running, healthy model: reuse a matching process (ours or adopted), else
        stop whatever runs and launch it. Raises ``ProxyError`` 503 ``model_start_failed`` (with the log
        line that explains it) or 504 ``model_start_timeout``."""
        cmd = build_command(self.config, entry)
        async with self._lock:
            inst = self.instance
            if inst is not None and not inst.poll():
                await self._stop_locked("process is gone")
                inst = None
            if inst is not None and inst.logical_name == entry.name and inst.flags == cmd.flags:
                if not inst.ready:
                    await self._wait_ready(inst, self._deadline_for(inst))
                return inst
            if inst is not None:
                reason = (
                    "registry entry changed"
                    if inst.logical_name == entry.name
                    else f"switching to {entry.name!r}"
                )
                await self._stop_locked(reason)
            return await self._launch(entry, cmd)

    async def stop(self, reason: str = "requested") -> None:
        async with self._lock:
            await self._stop_locked(reason)

    async def check(self) -> bool:
        """Look at the process now (after a failed upstream call); handle an unexpected exit. Returns
        whether a ready process is still there."""
        inst = self.instance
        if inst is None:
            return False
        if inst.poll():
            return True
        await self._handle_exit(inst)
        return False

    # -- internals -----------------------------------------------------------------------------
    def _deadline_for(self, inst: Instance) -> float:
        elapsed = max(0.0, time.time() - inst.started_at)
        remaining = max(
            self.config.vllm_start_timeout_s - elapsed, min(5.0, self.config.vllm_start_timeout_s)
        )
        return time.monotonic() + remaining

    async def _healthy(self, inst: Instance) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=min(2.0, self.config.vllm_health_timeout_s))
            async with self._session().get(inst.root_url + "/health", timeout=timeout) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    def _warn_gpu_memory(self, entry: Entry, cmd: VllmCommand) -> None:
        if self.gpu is None or not self.gpu.available:
            return
        devices = self.gpu.devices()
        if not devices:
            return
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        dev = next((d for d in devices if str(d["index"]) == visible), devices[0])
        wanted = dev["memory_total_bytes"] * cmd.gpu_memory_utilization
        if dev["memory_free_bytes"] < wanted:
            gib = 1 << 30
            log.warning(
                "vLLM: GPU %d (%s) has %.1f GiB free, but %r will claim %.1f GiB "
                "(--gpu-memory-utilization %.2f of %.1f GiB); the start may fail. "
                "Lower CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION or free the GPU.",
                dev["index"],
                dev["name"],
                dev["memory_free_bytes"] / gib,
                entry.name,
                wanted / gib,
                cmd.gpu_memory_utilization,
                dev["memory_total_bytes"] / gib,
            )

    async def _launch(self, entry: Entry, cmd: VllmCommand) -> Instance:
        cfg = self.config
        bind_host = cmd.host or "0.0.0.0"
        if not await process.wait_port_free(bind_host, cmd.port, min(5.0, cfg.vllm_stop_timeout_s)):
            raise ProxyError(
                503,
                "model_start_failed",
                f"Cannot start model {entry.name!r}: port {cmd.port} on {cmd.host} is in use by another "
                "process "
                "(not one this proxy started). Stop it or change CHAT_PROXY_VLLM_PORT.",
                headers={"Retry-After": "10"},
            )
        self._warn_gpu_memory(entry, cmd)
        path = log_path_for(cfg, entry.name)
        header = f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} imageworks-proxy: {shlex.join(cmd.argv)}\n"
        self.starting = entry.name
        self.last_error = None
        t0 = time.monotonic()
        try:
            try:
                pid = await asyncio.to_thread(process.spawn, cmd.argv, path, None, header)
            except OSError as exc:
                raise self._failed(
                    entry.name, f"cannot run {cmd.argv[0]!r}: {exc.strerror or exc}", path
                ) from None
            self.launches += 1
            inst = Instance(
                entry.name,
                cmd.served_model_id,
                cmd.host,
                cmd.port,
                pid,
                pid,
                cmd.argv,
                cmd.prefix_len,
                time.time(),
                path,
                adopted=False,
            )
            self.instance = inst
            log.info("vLLM: starting %r (pid %d) on port %d; log %s", entry.name, pid, cmd.port, path)
            await asyncio.to_thread(self.state_file.write, inst.to_state())
            try:
                await self._wait_ready(inst, t0 + cfg.vllm_start_timeout_s)
            except BaseException:
                # failed, timed out or cancelled (shutdown): never leave a half-started process behind
                await asyncio.shield(self._stop_locked("start did not complete"))
                raise
            log.info("vLLM: %r ready in %.1fs (pid %d)", entry.name, time.monotonic() - t0, pid)
            return inst
        finally:
            self.starting = None

    def _failed(self, name: str, why: str, path: str | None, code: int | None = None) -> ProxyError:
        exit_text = f" (exit code {code})" if code is not None else ""
        self.last_error = f"{name}: {why}"
        return ProxyError(
            503,
            "model_start_failed",
            f"vLLM could not start model {name!r}{exit_text}: {why}",
            hint=f"Full log: {path}" if path else None,
            headers={"Retry-After": str(max(1, round(self.config.vllm_failure_backoff_s)))},
        )

    async def _wait_ready(self, inst: Instance, deadline: float) -> None:
        def exited() -> int | bool | None:
            return False if inst.poll() else inst.returncode

        try:
            await process.wait_ready(
                self._session(),
                inst.root_url + "/health",
                deadline=deadline,
                try_timeout=self.config.vllm_health_timeout_s,
                exited=exited,
                log_path=inst.log_path,
            )
        except process.StartFailed as exc:
            why = exc.line or "the process exited before it became healthy"
            log.warning(
                "vLLM: %r exited during start-up (code %s): %s", inst.logical_name, exc.returncode, why
            )
            raise self._failed(inst.logical_name, why, inst.log_path, exc.returncode) from None
        except process.StartTimeout:
            tail = process.log_tail(inst.log_path, 5) if inst.log_path else []
            self.last_error = f"{inst.logical_name}: not healthy within {self.config.vllm_start_timeout_s:g}s"
            log.warning(
                "vLLM: %r not healthy within %gs", inst.logical_name, self.config.vllm_start_timeout_s
            )
            raise ProxyError(
                504,
                "model_start_timeout",
                f"vLLM did not become healthy within {self.config.vllm_start_timeout_s:g}s "
                f"(CHAT_PROXY_VLLM_START_TIMEOUT_S) for model {inst.logical_name!r}."
                + (" Last log lines: " + " | ".join(tail) if tail else ""),
                hint=f"Full log: {inst.log_path}" if inst.log_path else None,
            ) from None
        inst.ready = True
        inst.ready_at = time.monotonic()

    async def _stop_locked(self, reason: str) -> None:
        inst = self.instance
        if inst is None:
            return
        inst.stopping = True
        gpu = self.gpu if self.gpu is not None and self.gpu.available else None
        result = await process.stop_group(
            inst.pgid,
            term_timeout=self.config.vllm_stop_timeout_s,
            host=inst.host or "0.0.0.0",
            port=inst.port,
            gpu_pids=gpu.pids_holding_memory if gpu is not None else None,
        )
        inst.poll()
        # the file first: whoever sees "stopped" must not find a stale record
        await asyncio.to_thread(self._clear_state_if_ours, inst)
        if self.instance is inst:
            self.instance = None
        level = logging.INFO if result["exited"] and result["port_free"] is not False else logging.WARNING
        log.log(
            level,
            "vLLM: stopped %r (pid %d, %s) in %.2fs: signal %s, exited %s, port free %s, GPU released %s",
            inst.logical_name,
            inst.pid,
            reason,
            result["seconds"],
            result["signal"],
            result["exited"],
            result["port_free"],
            "n/a (no NVML)" if result["gpu_released"] is None else result["gpu_released"],
        )

    def _clear_state_if_ours(self, inst: Instance) -> None:
        try:
            state = self.state_file.read_raw()
        except (ValueError, OSError):
            state = None
        if state is None or state.pid == inst.pid:
            self.state_file.clear()

    async def _handle_exit(self, inst: Instance) -> None:
        async with self._lock:
            if self.instance is not inst or inst.stopping:
                return
            inst.poll()
            code = inst.returncode
            line = process.explaining_line(process.log_tail(inst.log_path)) if inst.log_path else None
            log.warning(
                "vLLM: %r (pid %d) exited unexpectedly (code %s): %s; the next request restarts it",
                inst.logical_name,
                inst.pid,
                code,
                line,
            )
            self.last_error = f"{inst.logical_name} exited unexpectedly: {line}"
            await self._stop_locked("exited unexpectedly")  # also takes down leftover engine processes
        if self.on_exit is not None:
            self.on_exit(inst, code, line)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_S)
            inst = self.instance
            if inst is None or not inst.ready or inst.stopping:
                continue
            try:
                if not inst.poll():
                    await self._handle_exit(inst)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("vLLM monitor error")
