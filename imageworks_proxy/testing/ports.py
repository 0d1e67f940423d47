"""Loopback ports for servers a test starts itself (a fake backend process, the orchestrator's model port)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Where Linux says which ports it hands out for outgoing connections.
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: The lowest port handed out; below it, well-known and registered services are more likely.
LOWEST = 10_000
#: Ports checked after the one returned: the orchestrator's sleep mode runs its models on a range starting
#: at ``CHAT_PROXY_VLLM_PORT`` (one more than ``CHAT_PROXY_VLLM_MAX_ASLEEP``).
SPAN = 4


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(span: int = SPAN) -> int:
    """A TCP port that nothing uses right now, with the ``span - 1`` ports after it free too.

    Drawn below the range the OS hands out for outgoing connections: a port the OS picked (``bind`` to port
    0) comes from that range, and any connection a test makes meanwhile may take it, or the port next to
    it that sleep mode will use, before the server binds.
    """
    high = _ephemeral_low() - span
    draw = random.Random()
    for _ in range(500):
        port = draw.randrange(LOWEST, max(LOWEST + 1, high))
        if all(_free(p) for p in range(port, port + span)):
            return port
    raise RuntimeError(f"no {span} free consecutive ports between {LOWEST} and {high}")
