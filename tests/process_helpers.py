"""Helpers for tests that run the real server as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from imageworks_proxy.testing import free_port

PROXY = str(Path(sys.executable).parent / "imageworks-chat-proxy")


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


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any proxy setting, plus ``settings``; Ollama points at a closed port."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHAT_PROXY_") and k != "IMAGEWORKS_REGISTRY_DIR"
    }
    env["CHAT_PROXY_OLLAMA_BASE_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing answers there
    env.update(settings)
    return env


class ServedProxy:
    """``imageworks-chat-proxy`` started in the background in ``cwd``, logging to a file there."""

    def __init__(self, cwd: Path, *args: str, port: int | None = None, **settings: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"proxy-{self.port}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [PROXY, "--port", str(self.port), *args],
                env=clean_env(**settings),
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )

    def get(self, path: str) -> Any:
        return wait_for_json(self.proc, self.url + path)

    def post(self, path: str, body: Any, timeout_s: float = 60.0) -> Any:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.load(resp)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{text!r} never logged:\n{self.log()}"
            time.sleep(0.05)
        return self.log()

    def stop(self) -> str:
        """SIGTERM, wait for a clean exit (code 0), return the log."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the proxy did not stop on SIGTERM") from None
        assert self.proc.returncode == 0, self.log()
        return self.log()
