"""The vLLM supervisor with an NVML stand-in: the free-memory warning before a start and the wait for the
stopped process group's GPU memory (real GPU: tests/device/check_vram_release.py)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.testing import free_port
from imageworks_proxy.upstream import process
from imageworks_proxy.vllm.supervisor import VllmSupervisor
from tests.orch_helpers import orch_settings, vllm_entry

GIB = 1 << 30


class FakeGpu:
    """What imageworks_proxy.gpu.nvml.Gpu answers on an 80 GiB card with 10 GiB free."""

    available = True

    def __init__(self) -> None:
        self.holding: set[int] = set()
        self.queries = 0

    def devices(self):
        return [{"index": 0, "name": "Fake H100", "memory_total_bytes": 80 * GIB,
                 "memory_used_bytes": 70 * GIB, "memory_free_bytes": 10 * GIB}]

    def pids_holding_memory(self) -> set[int]:
        self.queries += 1
        return set(self.holding)


async def test_a_start_warns_when_the_gpu_lacks_the_memory_vllm_will_claim_and_a_stop_waits_for_vram(
        tmp_path, make_config, caplog):
    cfg = make_config(**orch_settings(free_port()))
    entry = parse_entry(vllm_entry("alpha", tmp_path))
    gpu = FakeGpu()
    caplog.set_level(logging.INFO, "imageworks_proxy")
    async with aiohttp.ClientSession() as session:
        sup = VllmSupervisor(cfg, lambda: session, gpu)
        inst = await sup.ensure(entry)
        assert "has 10.0 GiB free, but 'alpha' will claim 60.0 GiB" in caplog.text
        # the driver still lists the process for a moment after it exited
        gpu.holding = {inst.pid}
        asyncio.get_running_loop().call_later(0.3, gpu.holding.clear)
        await sup.stop("test")
        assert gpu.holding == set()  # stop returned only once NVML let go of the pid
        assert "GPU released True" in caplog.text
        await sup.close()


async def test_without_nvml_nothing_is_asked_of_the_gpu(tmp_path, make_config, caplog):
    cfg = make_config(**orch_settings(free_port()))
    gpu = FakeGpu()
    gpu.available = False
    caplog.set_level(logging.INFO, "imageworks_proxy")
    async with aiohttp.ClientSession() as session:
        sup = VllmSupervisor(cfg, lambda: session, gpu)
        await sup.ensure(parse_entry(vllm_entry("alpha", tmp_path)))
        await sup.stop("test")
        await sup.close()
    assert gpu.queries == 0 and "GiB free" not in caplog.text
    assert "GPU released n/a (no NVML)" in caplog.text


class SleepyGpu:
    """An 80 GiB card whose memory is what the listed processes hold (as NVML reports it per pid)."""

    available = True

    def __init__(self) -> None:
        self.holding: dict[int, int] = {}

    def _held(self) -> int:
        return sum(n for pid, n in self.holding.items() if process.pid_alive(pid))

    def devices(self):
        used = self._held()
        return [{"index": 0, "name": "Fake H100", "memory_total_bytes": 80 * GIB,
                 "memory_used_bytes": used, "memory_free_bytes": 80 * GIB - used}]

    def memory_by_pid(self) -> dict[int, int]:
        return {pid: n for pid, n in self.holding.items() if process.pid_alive(pid)}

    def pids_holding_memory(self) -> set[int]:
        return set(self.memory_by_pid())


async def test_before_a_start_nvml_must_show_the_sleepers_memory_given_back(tmp_path, make_config, caplog):
    cfg = make_config(**orch_settings(free_port(), VLLM_SLEEP_LEVEL="1"))
    alpha, beta, gamma = (parse_entry(vllm_entry(n, tmp_path)) for n in ("alpha", "beta", "gamma"))
    gpu = SleepyGpu()
    caplog.set_level(logging.INFO, "imageworks_proxy")
    async with aiohttp.ClientSession() as session:
        sup = VllmSupervisor(cfg, lambda: session, gpu)
        a = await sup.ensure(alpha)
        gpu.holding[a.pid] = 60 * GIB
        # alpha's sleep gives its memory back a moment after /sleep answered: beta's start waits for it
        asyncio.get_running_loop().call_later(0.3, gpu.holding.__setitem__, a.pid, GIB // 2)
        b = await sup.ensure(beta)
        assert [s.pid for s in sup.sleepers] == [a.pid] and "still holding" not in caplog.text
        gpu.holding[b.pid] = 60 * GIB  # beta sleeps, but NVML shows it never let go of its memory
        await sup.ensure(gamma)
        assert [s.pid for s in sup.sleepers] == [a.pid]  # beta was stopped to make room, alpha kept
        assert not process.pid_alive(b.pid) and process.pid_alive(a.pid)
        assert f"'beta' (pid {b.pid}) sleeps but NVML shows it still holding 60.0 GiB" in caplog.text
        await sup.close()
    assert not process.pid_alive(a.pid)
