"""Helpers for tests that run the real server as a subprocess."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from typing import Any


def wait_for_json(proc: subprocess.Popen[str], url: str, timeout_s: float = 30.0) -> Any:
    """Poll ``url`` until the process answers it with JSON; fail with its stderr if it exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.load(resp)
        except OSError:
            assert time.monotonic() < deadline, "the proxy did not start listening"
            time.sleep(0.1)
