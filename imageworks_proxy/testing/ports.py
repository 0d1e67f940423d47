"""Loopback ports for servers a test starts itself (a fake backend process, the orchestrator's model port)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it; it may be taken again
    by the time the caller binds it, which a test run on one machine does not meet in practice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
