"""Host memory for sleeping vLLM models (sleep level 1 keeps a sleeper's weights in CPU memory).

A sleeper's weights take about their size on disk; the budget is ``CHAT_PROXY_VLLM_SLEEP_MAX_HOST_BYTES``,
or half the machine's memory when that is unset.
"""

from __future__ import annotations

import os

from imageworks_proxy.catalogue.templates import hub_snapshot_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_bytes(model: str | None) -> int | None:
    """The size on disk of the weights vLLM loads for ``--model``: a directory (its weight files), a file,
    or a hub id found in the local Hugging Face cache. ``None`` when it cannot be told."""
    if not model:
        return None
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        return os.path.getsize(path)
    if not os.path.isdir(path):
        path = hub_snapshot_dir(model) or ""
        if not path:
            return None
    total = 0
    try:
        with os.scandir(path) as entries:
            for item in entries:
                if item.name.endswith(WEIGHT_SUFFIXES) and item.is_file():  # follows the cache's symlinks
                    total += item.stat().st_size
    except OSError:
        return None
    return total or None


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """``MemTotal`` and ``MemAvailable`` in bytes (empty where /proc/meminfo is missing)."""
    out: dict[str, int] = {}
    try:
        with open(path) as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    out[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def host_budget(configured: int | None) -> int | None:
    """The host memory level-1 sleepers may take together: ``configured``, else half of ``MemTotal``
    (``None`` when neither is known: no limit but the number of sleepers)."""
    if configured is not None:
        return configured
    total = meminfo().get("MemTotal")
    return total // 2 if total else None
