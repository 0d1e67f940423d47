"""The budgets of sleeping vLLM models (sleep mode, docs/vllm.md).

- At most ``CHAT_PROXY_VLLM_MAX_ASLEEP`` sleep; to put one more to sleep the least recently used sleeper
  is stopped.
- Level 1 keeps a sleeper's weights in host memory: the sleepers' weights (their size on disk) must fit in
  ``CHAT_PROXY_VLLM_SLEEP_MAX_HOST_BYTES`` (default half the machine's memory) and in the memory available
  now; least recently used sleepers are stopped to make room, and a model whose weights still do not fit is
  stopped instead of put to sleep.
- Before a wake-up or a start, NVML must show the memory the sleepers gave back as free: what the model will
  claim (``--gpu-memory-utilization`` of the GPU, less what the waking model still holds). The supervisor
  waits briefly for it, then stops sleepers that still hold GPU memory, the biggest first. Without NVML
  this check is skipped.
- Each instance has its own port: the lowest free one of ``CHAT_PROXY_VLLM_PORT`` …
  ``CHAT_PROXY_VLLM_PORT + CHAT_PROXY_VLLM_MAX_ASLEEP``.

All of it runs inside the supervisor's operations, under its lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from imageworks_proxy.upstream import process
from imageworks_proxy.vllm import budget
from imageworks_proxy.vllm.instance import Instance

if TYPE_CHECKING:
    from imageworks_proxy.vllm.supervisor import VllmSupervisor

log = logging.getLogger("imageworks_proxy.orchestrator")

GIB = 1 << 30
#: Before a wake-up or a start: how long NVML may take to show the sleepers' memory as free.
RELEASE_WAIT_S = 5.0
POLL_S = 0.02


class SleeperPolicy:
    """Budget decisions for ``supervisor``'s sleepers."""

    def __init__(self, supervisor: VllmSupervisor) -> None:
        self.sup = supervisor

    @property
    def config(self):
        return self.sup.config

    async def cap(self) -> None:
        """Stop the least recently used sleepers beyond ``CHAT_PROXY_VLLM_MAX_ASLEEP``."""
        limit = self.config.vllm_max_asleep
        while len(self.sup.sleepers) > limit:
            await self.sup._stop_locked(self.sup.sleepers[0], f"more than {limit} asleep")

    def _others(self, keep: str | None) -> list[Instance]:
        return [s for s in self.sup.sleepers if s.logical_name != keep]

    async def make_room(self, inst: Instance, level: int, keep: str | None = None) -> bool:
        """Make room for ``inst`` to sleep at ``level``, never stopping sleeping model ``keep`` (it is about
        to be woken, and then sleeps no more); False when ``inst`` must be stopped instead."""
        limit = self.config.vllm_max_asleep
        if limit <= 0:
            return False
        while len(self._others(keep)) >= limit:
            why = f"least recently used of {limit} asleep (CHAT_PROXY_VLLM_MAX_ASLEEP)"
            await self.sup._stop_locked(self._others(keep)[0], why)
        if level != 1:
            return True
        inst.host_bytes = need = await asyncio.to_thread(budget.weights_bytes, inst.model_source)
        if need is None:
            return True  # size unknown: only the number of sleepers limits it
        allowed = budget.host_budget(self.config.vllm_sleep_max_host_bytes)
        while True:
            held = sum(s.host_bytes or 0 for s in self.sup.sleepers)
            available = budget.meminfo().get("MemAvailable")
            if (allowed is None or held + need <= allowed) and (available is None or need <= available):
                return True
            if (allowed is not None and need > allowed) or not self._others(keep):
                log.info(
                    "vLLM: %r's weights (%.1f GiB) do not fit in the host memory for sleeping models "
                    "(CHAT_PROXY_VLLM_SLEEP_MAX_HOST_BYTES %s, available %s); stopping it instead of putting "
                    "it to sleep",
                    inst.logical_name, need / GIB, _gib(allowed), _gib(available),
                )
                return False
            await self.sup._stop_locked(self._others(keep)[0], "host memory for sleeping models is short")

    async def free_port(self) -> int:
        """The port for a new instance: the lowest free one of the range (the least recently used
        sleeper's when every one is taken)."""
        cfg = self.config
        host = cfg.vllm_host or "0.0.0.0"
        taken = {i.port for i in self.sup.instances}
        ports = [p for p in range(cfg.vllm_port, cfg.vllm_port + cfg.vllm_max_asleep + 1) if p <= 65535]
        for port in ports:
            if port not in taken and process.port_free(host, port):
                return port
        if self.sup.sleepers:
            lru = self.sup.sleepers[0]
            await self.sup._stop_locked(lru, "its port is needed")
            return lru.port
        return next((p for p in ports if p not in taken), cfg.vllm_port)  # the launch says who holds it

    async def gpu_room(self, utilization: float, own: Instance | None) -> None:
        """Before waking ``own`` (or starting a model, ``own`` None) that claims ``utilization`` of the
        GPU: wait until NVML shows that much free, then stop sleepers still holding memory, biggest first."""
        launcher = self.sup.launcher
        gpu = launcher.nvml
        others = [s for s in self.sup.sleepers if s is not own]
        if gpu is None or not others or launcher.device() is None:
            return
        own_pids = set(process.group_pids(own.pgid)) if own is not None else set()

        def shortfall() -> float:
            dev = launcher.device()
            if dev is None:
                return 0.0
            usage = gpu.memory_by_pid()
            need = dev["memory_total_bytes"] * utilization - sum(usage.get(p, 0) for p in own_pids)
            return need - dev["memory_free_bytes"]

        deadline = time.monotonic() + min(RELEASE_WAIT_S, self.config.vllm_stop_timeout_s)
        while (gap := shortfall()) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if gap <= 0:
            return
        usage = gpu.memory_by_pid()
        held = {id(s): sum(usage.get(p, 0) for p in process.group_pids(s.pgid)) for s in others}
        if sum(held.values()) < gap:
            return  # the sleepers are not what fills the GPU; the start warns about it
        for sleeper in sorted(others, key=lambda s: held[id(s)], reverse=True):
            log.warning(
                "vLLM: %r (pid %d) sleeps but NVML shows it still holding %.1f GiB of GPU memory; "
                "stopping it to make room", sleeper.logical_name, sleeper.pid, held[id(sleeper)] / GIB,
            )
            await self.sup._stop_locked(sleeper, "asleep but still holding GPU memory")
            if shortfall() <= 0:
                return


def _gib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / GIB:.1f} GiB"
