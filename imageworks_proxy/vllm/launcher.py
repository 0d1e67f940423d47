"""Starting and stopping one vLLM process: spawn it in its own process group with its log file, wait
until it is ready (with the log line that explains a failed start), stop the whole group and wait until
its port and GPU memory are free. Which processes run, and when, is
:class:`~imageworks_proxy.vllm.supervisor.VllmSupervisor`'s business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from collections.abc import Callable

import aiohttp

from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.nvml import Gpu
from imageworks_proxy.upstream import process
from imageworks_proxy.upstream.process import safe_name
from imageworks_proxy.vllm import ready
from imageworks_proxy.vllm.command import VllmCommand
from imageworks_proxy.vllm.instance import Instance

log = logging.getLogger("imageworks_proxy.orchestrator")


def log_path_for(config: Config, name: str) -> str:
    return os.path.join(config.vllm_log_dir, safe_name(name) + ".log")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class Launcher:
    """Process work for the supervisor. ``session`` returns the HTTP client session for health polls;
    ``gpu`` (NVML) is used when it is available. ``last_error`` is the last start failure, for status."""

    def __init__(
        self, config: Config, session: Callable[[], aiohttp.ClientSession], gpu: Gpu | None = None
    ) -> None:
        self.config = config
        self.session = session
        self.gpu = gpu
        self.last_error: str | None = None
        self.launches = 0

    @property
    def nvml(self) -> Gpu | None:
        """The GPU readings when NVML is there, else None."""
        return self.gpu if self.gpu is not None and self.gpu.available else None

    def device(self) -> dict | None:
        """The GPU vLLM starts on (the first of ``CUDA_VISIBLE_DEVICES``), from NVML; None without it."""
        gpu = self.nvml
        devices = gpu.devices() if gpu is not None else []
        if not devices:
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        return next((d for d in devices if str(d["index"]) == visible), devices[0])

    def warn_gpu_memory(self, entry: Entry, cmd: VllmCommand) -> None:
        dev = self.device()
        if dev is None:
            return
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

    # -- start -----------------------------------------------------------------------------------
    async def spawn(self, entry: Entry, cmd: VllmCommand) -> tuple[Instance, int]:
        """Launch ``cmd`` for ``entry``; returns the instance (not ready yet) and where its start-up output
        begins in the log. Raises ``ProxyError`` 503 when the port is taken or the program cannot run."""
        cfg = self.config
        bind_host = cmd.host or "0.0.0.0"
        if not await process.wait_port_free(bind_host, cmd.port, min(5.0, cfg.vllm_stop_timeout_s)):
            raise ProxyError(
                503,
                "model_start_failed",
                f"Cannot start model {entry.name!r}: port {cmd.port} on {cmd.host} is in use by another "
                "process (not one this proxy started). Stop it or change CHAT_PROXY_VLLM_PORT.",
                headers={"Retry-After": "10"},
            )
        self.warn_gpu_memory(entry, cmd)
        path = log_path_for(cfg, entry.name)
        header = f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} imageworks-proxy: {shlex.join(cmd.argv)}\n"
        self.last_error = None
        offset = _size(path)
        env = {**os.environ, **cmd.env} if cmd.env else None
        try:
            pid = await asyncio.to_thread(process.spawn, cmd.argv, path, env, header)
        except OSError as exc:
            why = f"cannot run {cmd.argv[0]!r}: {exc.strerror or exc}"
            raise self.failed(entry.name, why, path) from None
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
        log.info("vLLM: starting %r (pid %d) on port %d; log %s", entry.name, pid, cmd.port, path)
        return inst, offset

    def deadline_for(self, inst: Instance) -> float:
        """The monotonic deadline of an (adopted) instance's start that began at ``inst.started_at``."""
        elapsed = max(0.0, time.time() - inst.started_at)
        timeout = self.config.vllm_start_timeout_s
        return time.monotonic() + max(timeout - elapsed, min(5.0, timeout))

    async def wait_ready(self, inst: Instance, deadline: float, log_offset: int | None = None) -> float:
        """Wait until ``inst`` is ready; returns when it became ready (``time.monotonic()``). Raises
        ``ProxyError`` 503 ``model_start_failed`` (vLLM's own explanation) or 504 ``model_start_timeout``."""

        def exited() -> int | bool | None:
            return False if inst.poll() else inst.returncode

        offset = log_offset if log_offset is not None else _size(inst.log_path) if inst.log_path else 0
        try:
            ready_at = await ready.wait_ready(
                self.session(),
                inst.root_url + "/health",
                deadline=deadline,
                try_timeout=self.config.vllm_health_timeout_s,
                exited=exited,
                log_path=inst.log_path,
                log_offset=offset,
            )
        except process.StartFailed as exc:
            why = exc.line or "the process exited before it became healthy"
            log.warning(
                "vLLM: %r exited during start-up (code %s): %s", inst.logical_name, exc.returncode, why
            )
            raise self.failed(inst.logical_name, why, inst.log_path, exc.returncode) from None
        except process.StartTimeout:
            raise self._timed_out(inst) from None
        inst.ready = True
        inst.ready_at = time.monotonic()
        return ready_at

    def _timed_out(self, inst: Instance) -> ProxyError:
        timeout = self.config.vllm_start_timeout_s
        tail = process.log_tail(inst.log_path, 5) if inst.log_path else []
        self.last_error = f"{inst.logical_name}: not healthy within {timeout:g}s"
        log.warning("vLLM: %r not healthy within %gs", inst.logical_name, timeout)
        return ProxyError(
            504,
            "model_start_timeout",
            f"vLLM did not become healthy within {timeout:g}s "
            f"(CHAT_PROXY_VLLM_START_TIMEOUT_S) for model {inst.logical_name!r}."
            + (" Last log lines: " + " | ".join(tail) if tail else ""),
            hint=f"Full log: {inst.log_path}" if inst.log_path else None,
        )

    def failed(self, name: str, why: str, path: str | None, code: int | None = None) -> ProxyError:
        exit_text = f" (exit code {code})" if code is not None else ""
        self.last_error = f"{name}: {why}"
        return ProxyError(
            503,
            "model_start_failed",
            f"vLLM could not start model {name!r}{exit_text}: {why}",
            hint=f"Full log: {path}" if path else None,
            headers={"Retry-After": str(max(1, round(self.config.vllm_failure_backoff_s)))},
        )

    async def healthy(self, inst: Instance) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=min(2.0, self.config.vllm_health_timeout_s))
            async with self.session().get(inst.root_url + "/health", timeout=timeout) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    # -- stop ------------------------------------------------------------------------------------
    async def stop(self, inst: Instance, reason: str) -> dict[str, object]:
        """Stop ``inst``'s process group and wait until its port (and, with NVML, its GPU memory) is free.
        Returns ``process.stop_group``'s account of it."""
        inst.stopping = True
        gpu = self.nvml
        result = await process.stop_group(
            inst.pgid,
            term_timeout=self.config.vllm_stop_timeout_s,
            host=inst.host or "0.0.0.0",
            port=inst.port,
            gpu_pids=gpu.pids_holding_memory if gpu is not None else None,
        )
        inst.poll()
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
        return result
