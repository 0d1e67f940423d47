"""What the device checks beside this file share (run by hand on a GPU machine; pytest skips them).

The two proxy modules they exercise (``upstream/process.py``, ``gpu/nvml.py``) are loaded by file path, so
a GPU machine needs PyTorch and nvidia-ml-py but none of the proxy's other dependencies. A check is a
function from the open NVML handle to a JSON report with a ``verdict``; :func:`run_check` opens NVML,
prints the report, writes it to ``$OUT/<name>.json`` when ``$OUT`` is set and returns the exit code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


process = _load("iw_process", "imageworks_proxy/upstream/process.py")
nvml = _load("iw_gpu", "imageworks_proxy/gpu/nvml.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mib(n: float) -> int:
    return round(n / (1 << 20))


def device_summary(dev: dict[str, Any]) -> dict[str, Any]:
    """NVML's reading of one device, with its memory figures in MiB."""
    return {k: (mib(v) if k.startswith("memory") else v) for k, v in dev.items()}


def log_dir(name: str) -> Path:
    """Where the processes a check starts write their logs: under ``$OUT`` when set (they come back with
    the report), else under /tmp."""
    path = Path(os.environ.get("OUT") or "/tmp") / f"{name}_logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_check(name: str, check: Callable[[Any], dict[str, Any]]) -> int:
    """Run ``check(gpu)`` with NVML open and report it; 0 when its ``verdict`` is PASS, else 1 (also when
    NVML cannot be opened: that is printed as ``{"error": ...}``)."""
    gpu = nvml.Gpu()
    if not gpu.open():
        print(json.dumps({"error": f"NVML unavailable: {gpu.error}"}))
        return 1
    try:
        report = check(gpu)
    finally:
        gpu.close()
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(text)
    return 0 if report.get("verdict") == "PASS" else 1
