"""Optional NVML readings (``nvidia-ml-py``, imported as ``pynvml``). Without a GPU everything still works."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("imageworks_proxy.gpu.nvml")


class Gpu:
    """NVML for the lifetime of an app: device names, memory and the pids holding memory."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self.error: str | None = None

    def open(self) -> bool:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no GPU
            self.error = f"{type(exc).__name__}: {exc}"
            log.debug("NVML unavailable: %s", self.error)
            return False
        self._nvml = pynvml
        return True

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def devices(self) -> list[dict[str, Any]]:
        """One dict per GPU: index, name, memory_total/used/free in bytes. Empty without NVML."""
        nv = self._nvml
        if nv is None:
            return []
        out = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                out.append({
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_total_bytes": int(mem.total),
                    "memory_used_bytes": int(mem.used),
                    "memory_free_bytes": int(mem.free),
                })
        except Exception as exc:
            log.warning("NVML query failed: %s", exc)
        return out

    def pids_holding_memory(self) -> set[int]:
        """Pids NVML lists as compute processes on any GPU (empty without NVML)."""
        nv = self._nvml
        if nv is None:
            return set()
        pids: set[int] = set()
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    pids.add(int(p.pid))
        except Exception as exc:
            log.warning("NVML process query failed: %s", exc)
        return pids

    def memory_by_pid(self) -> dict[int, int]:
        """GPU memory in bytes that each compute process uses, summed over the GPUs (empty without NVML;
        a process whose usage the driver does not report counts 0)."""
        nv = self._nvml
        if nv is None:
            return {}
        out: dict[int, int] = {}
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    used = p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else 0
                    out[int(p.pid)] = out.get(int(p.pid), 0) + used
        except Exception as exc:
            log.warning("NVML process query failed: %s", exc)
        return out
