#!/usr/bin/env python3
"""Device check for vLLM sleep mode's hand-over (run by hand on a GPU machine; pytest skips it).

What the orchestrator relies on when it puts one model to sleep and starts or wakes another
(imageworks_proxy/vllm/sleepers.py): that the memory a sleeping process gives back shows up free in NVML
before the next model claims it, that NVML's per-process readings (``Gpu.memory_by_pid``) tell a sleeper
that gave its memory back from one that did not, and how long the hand-over takes.

A "sleeper" here is a small HTTP server holding real GPU memory (PyTorch) that frees it on ``POST /sleep``
(``del`` + ``torch.cuda.empty_cache()``; vLLM's allocator unmaps its pool the same way) and allocates it
again on ``POST /wake_up``, like vLLM's sleep API. Each holder takes ``FRACTION`` of the card, so two cannot
hold their memory at once. Steps:

  1. A allocates; NVML: used memory, A's per-pid reading.
  2. A sleeps: time until /sleep answers, until NVML shows the memory back (used within 5 % of the card of
     the baseline), and A's residual per-pid reading (its CUDA context) once settled.
  3. B starts at once and allocates the same amount (the next model's start): ok, and the hand-over time
     from A's /sleep request to B holding its memory.
  4. A is woken while B holds the GPU: it must fail (an out-of-memory error), not hang or succeed.
  5. B sleeps, A wakes: the wake-up time, and NVML showing A holding its memory again.
  6. The check the proxy makes before a wake-up or start: free memory >= the claim (less what the waking
     process holds), read at every step.

Usage (from the repository root): python3 tests/device/check_sleep_release.py [FRACTION, default 0.55]
Needs: PyTorch with CUDA, nvidia-ml-py (pynvml). Loads the proxy's two modules it uses by file path
(devicekit.py), so the proxy's other dependencies are not needed. Writes the report to
$OUT/sleep_release.json too when $OUT is set.
Exit code 0 when every step behaved as the orchestrator assumes (verdict PASS), else 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from devicekit import device_summary, free_port, log_dir, mib, process, run_check

FRACTION = float(sys.argv[1]) if len(sys.argv) > 1 else 0.55
POLL_S = 0.005

HOLDER = r"""
import http.server, json, sys, time, torch
n, port = int(sys.argv[1]), int(sys.argv[2])
state = {"x": None}
def alloc():
    x = torch.empty(n, dtype=torch.uint8, device="cuda"); x.fill_(1); torch.cuda.synchronize(); state["x"] = x
def free():
    state["x"] = None; torch.cuda.synchronize(); torch.cuda.empty_cache()
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self):
        self.answer(200, {"is_sleeping": state["x"] is None})
    def do_POST(self):
        t0 = time.monotonic()
        try:
            if self.path.startswith("/sleep"):
                free()
            elif self.path.startswith("/wake_up"):
                alloc()
        except Exception as exc:
            state["x"] = None; torch.cuda.empty_cache()
            return self.answer(500, {"error": f"{type(exc).__name__}: {exc}"[:300]})
        self.answer(200, {"seconds": round(time.monotonic() - t0, 4)})
alloc()
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
"""


def post(port: int, path: str, timeout: float = 600.0) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), time.monotonic() - t0


class Card:
    """NVML readings of GPU 0, in bytes."""

    def __init__(self, gpu) -> None:
        self.gpu = gpu

    def dev(self) -> dict:
        return self.gpu.devices()[0]

    def held_by(self, pid: int) -> int:
        usage = self.gpu.memory_by_pid()
        return sum(usage.get(p, 0) for p in process.group_pids(pid))

    def room_for(self, claim: int, waking: int | None = None) -> bool:
        """The proxy's check before a wake-up or start: free >= claim less what the waking process holds."""
        own = self.held_by(waking) if waking else 0
        return self.dev()["memory_free_bytes"] >= claim - own

    def wait(self, predicate, timeout: float = 60.0) -> float | None:
        t0 = time.monotonic()
        while not predicate():
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(POLL_S)
        return time.monotonic() - t0


def start_holder(nbytes: int, logs: Path, name: str) -> tuple[int, int]:
    port = free_port()
    pid = process.spawn([sys.executable, "-c", HOLDER, str(nbytes), str(port)], str(logs / f"{name}.log"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/is_sleeping", timeout=2):
                return pid, port
        except (urllib.error.URLError, OSError):
            if not process.pid_alive(pid):
                tail = process.log_tail(str(logs / f"{name}.log"), 5)
                raise RuntimeError(f"holder {name} exited: {tail}") from None
            time.sleep(0.05)
    raise RuntimeError(f"holder {name} never became ready")


def run(card: Card, logs: Path) -> dict:
    total = card.dev()["memory_total_bytes"]
    nbytes = int(total * FRACTION)
    base = card.dev()["memory_used_bytes"]
    slack = 0.05 * total
    report: dict = {"claim_mib": mib(nbytes), "baseline_used_mib": mib(base), "steps": {}}
    steps = report["steps"]

    a_pid, a_port = start_holder(nbytes, logs, "a")
    steps["1_a_awake"] = {"used_over_baseline_mib": mib(card.dev()["memory_used_bytes"] - base),
                          "a_per_pid_mib": mib(card.held_by(a_pid)),
                          "room_for_another": card.room_for(nbytes)}

    t_sleep = time.monotonic()
    code, body, answered = post(a_port, "/sleep?level=1")
    back = card.wait(lambda: card.dev()["memory_used_bytes"] - base < slack)
    time.sleep(0.5)
    steps["2_a_asleep"] = {"status": code, "sleep_answered_s": round(answered, 4),
                           "nvml_back_after_request_s": None if back is None else round(answered + back, 4),
                           "a_residual_per_pid_mib": mib(card.held_by(a_pid)),
                           "used_over_baseline_mib": mib(card.dev()["memory_used_bytes"] - base),
                           "room_for_another": card.room_for(nbytes)}

    b_pid, b_port = start_holder(nbytes, logs, "b")
    steps["3_b_started"] = {"ok": card.held_by(b_pid) >= 0.9 * nbytes,
                            "handover_s": round(time.monotonic() - t_sleep, 3),
                            "b_per_pid_mib": mib(card.held_by(b_pid)),
                            "room_to_wake_a": card.room_for(nbytes, a_pid)}

    code, body, took = post(a_port, "/wake_up")
    steps["4_wake_a_into_held_gpu"] = {"status": code, "error": body.get("error"), "seconds": round(took, 3),
                                       "a_alive": process.pid_alive(a_pid)}

    code, _, b_slept = post(b_port, "/sleep?level=1")
    released = card.wait(lambda: card.room_for(nbytes, a_pid))
    code, body, woke = post(a_port, "/wake_up")
    steps["5_b_asleep_a_woken"] = {"b_sleep_s": round(b_slept, 4),
                                   "room_shown_after_s": None if released is None else round(released, 4),
                                   "wake_status": code, "wake_s": round(woke, 4),
                                   "a_per_pid_mib": mib(card.held_by(a_pid)),
                                   "b_residual_per_pid_mib": mib(card.held_by(b_pid))}

    for pid in (a_pid, b_pid):
        asyncio.run(process.stop_group(pid, term_timeout=3, gpu_pids=card.gpu.pids_holding_memory))
    s = steps
    report["verdict"] = "PASS" if (
        not s["1_a_awake"]["room_for_another"]
        and s["2_a_asleep"]["status"] == 200 and s["2_a_asleep"]["nvml_back_after_request_s"] is not None
        and s["2_a_asleep"]["room_for_another"]
        and s["2_a_asleep"]["a_residual_per_pid_mib"] < 0.1 * s["1_a_awake"]["a_per_pid_mib"]
        and s["3_b_started"]["ok"] and not s["3_b_started"]["room_to_wake_a"]
        and s["4_wake_a_into_held_gpu"]["status"] == 500
        and s["5_b_asleep_a_woken"]["wake_status"] == 200
        and s["5_b_asleep_a_woken"]["a_per_pid_mib"] >= 0.9 * mib(nbytes)
    ) else "FAIL"
    return report


def check(gpu) -> dict:
    card = Card(gpu)
    report = {"device": device_summary(card.dev()), "fraction": FRACTION}
    try:
        report.update(run(card, log_dir("sleep_release")))
    except Exception as exc:  # report what happened rather than a traceback alone
        report.update({"error": f"{type(exc).__name__}: {exc}", "verdict": "FAIL"})
    return report


if __name__ == "__main__":
    sys.exit(run_check("sleep_release", check))
