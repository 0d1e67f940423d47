#!/usr/bin/env python3
"""Device check for the vLLM orchestrator's stop logic (run by hand on a GPU machine; pytest skips it).

Runs the orchestrator's own ``stop_group`` (imageworks_proxy/upstream/process.py: SIGTERM to the process
group, SIGKILL after the timeout, then wait for the port and for NVML to stop listing the group's pids)
against processes that really hold GPU memory (PyTorch), and prints one JSON report with NVML readings
and timings. Scenarios:

  graceful   the holder exits 0.5 s after SIGTERM (a vLLM API server shutting down cleanly)
  engine     a parent without GPU memory plus an "engine core" child in its process group that holds the
             memory and ignores SIGTERM: only the group SIGKILL frees it (vLLM's EngineCore case)
  orphan     the parent alone is SIGKILLed first (what a naive supervisor does): the child keeps the memory
             and the port-free test alone would pass; stop_group on the group must still free it

For each: NVML used memory before/while/after, the pids NVML lists, the group's pids, stop_group's result,
and whether the same amount can be allocated again the moment stop_group returns (the next model start).
Usage (from the repository root): python3 tests/device/check_vram_release.py [GiB, default 8]
Needs: PyTorch with CUDA, nvidia-ml-py (pynvml). Does not need the proxy's other dependencies: the two
modules it uses are loaded by file path (devicekit.py). Writes the report to $OUT/vram_release.json too when
$OUT is set.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from devicekit import device_summary, free_port, log_dir, mib, process, run_check

GIB = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
TERM_TIMEOUT_S = 3.0

HOLDER = r"""
import signal, sys, time, torch
n = int(float(sys.argv[1]) * (1 << 30))
x = torch.empty(n, dtype=torch.uint8, device="cuda"); x.fill_(1); torch.cuda.synchronize()
mode = sys.argv[2]
if mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def term(*_):
        time.sleep(0.5)
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
print("ready", flush=True)
while True:
    time.sleep(1)
"""

PARENT = r"""
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], "ignore"])  # same process group
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("child", child.pid, flush=True)
while True:
    time.sleep(1)
"""


def used(gpu) -> int:
    return gpu.devices()[0]["memory_used_bytes"]


def wait_held(gpu, base: int, timeout: float = 120.0) -> float:
    t0 = time.monotonic()
    while used(gpu) - base < GIB * (1 << 30) * 0.9:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("the holder never allocated its memory")
        time.sleep(0.05)
    return time.monotonic() - t0


def reallocate_ok() -> bool:
    code = HOLDER.replace(
        'print("ready", flush=True)\nwhile True:\n    time.sleep(1)', 'print("ready", flush=True)'
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(GIB), "graceful"], capture_output=True, text=True, timeout=300
    )
    return out.returncode == 0 and "ready" in out.stdout


def trial(gpu, scenario: str, logs: Path) -> dict:
    base = used(gpu)
    log = str(logs / f"{scenario}.log")
    if scenario == "graceful":
        pid = process.spawn([sys.executable, "-c", HOLDER, str(GIB), "graceful"], log)
    else:
        pid = process.spawn([sys.executable, "-c", PARENT, HOLDER, str(GIB)], log)
    alloc_s = wait_held(gpu, base)
    held = used(gpu) - base
    listed = sorted(gpu.pids_holding_memory())
    members = sorted(process.group_pids(pid))
    report = {
        "scenario": scenario,
        "leader_pid": pid,
        "alloc_s": round(alloc_s, 2),
        "held_mib": mib(held),
        "nvml_listed_pids": listed,
        "group_pids": members,
        "holder_listed_by_nvml": bool(set(listed) & set(members)),
    }
    if scenario == "orphan":
        os.kill(pid, signal.SIGKILL)  # the leader only
        t0 = time.monotonic()
        while process.pid_alive(pid):
            time.sleep(0.01)
        gone_s = time.monotonic() - t0
        time.sleep(1.0)  # give a (wrongly) released GPU time to show up
        report["after_leader_sigkill"] = {
            "leader_gone_s": round(gone_s, 3),
            "held_mib": mib(used(gpu) - base),
            "group_alive": process.group_alive(pid),
            "group_pids": sorted(process.group_pids(pid)),
        }
    port = free_port()
    t0 = time.monotonic()
    result = asyncio.run(
        process.stop_group(
            pid,
            term_timeout=TERM_TIMEOUT_S,
            host="127.0.0.1",
            port=port,
            gpu_pids=gpu.pids_holding_memory,
            release_timeout=30.0,
        )
    )
    report["stop_group"] = result
    report["stop_group_wall_s"] = round(time.monotonic() - t0, 3)
    report["used_over_baseline_mib_when_stop_returned"] = mib(used(gpu) - base)
    report["nvml_listed_pids_after"] = sorted(gpu.pids_holding_memory())
    t1 = time.monotonic()
    report["reallocate_same_amount_ok"] = reallocate_ok()
    report["reallocate_s"] = round(time.monotonic() - t1, 2)
    return report


def check(gpu) -> dict:
    dev = gpu.devices()[0]
    t = time.perf_counter()
    for _ in range(200):
        gpu.pids_holding_memory()
    pids_query_us = (time.perf_counter() - t) / 200 * 1e6
    claim = dev["memory_total_bytes"] * 0.75
    report = {
        "device": device_summary(dev),
        "gib_per_holder": GIB,
        "term_timeout_s": TERM_TIMEOUT_S,
        "pids_holding_memory_query_us": round(pids_query_us, 1),
        "start_warning_at_default_0.75_would_fire": dev["memory_free_bytes"] < claim,
        "trials": [],
    }
    logs = log_dir("vram_release")
    for scenario in ("graceful", "engine", "orphan"):
        try:
            report["trials"].append(trial(gpu, scenario, logs))
        except Exception as exc:  # report and go on with the next scenario
            report["trials"].append({"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"})
    ok = all(
        t.get("stop_group", {}).get("gpu_released") and t.get("reallocate_same_amount_ok")
        for t in report["trials"]
    )
    report["verdict"] = "PASS" if ok else "FAIL"
    return report


if __name__ == "__main__":
    sys.exit(run_check("vram_release", check))
