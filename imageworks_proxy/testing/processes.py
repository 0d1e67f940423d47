"""Whether a process a test started (directly or through the proxy) still runs."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (an exited child nobody has waited for yet
    counts as gone); reads ``/proc``, so Linux only. It never reaps, so it does not disturb the process
    owner's wait for its child."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
