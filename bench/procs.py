"""Processes for the benchmark: the servers under test and the load generators, each its own process.

Every process is started with a CPU set so the server under test never shares its core with the load
generator or the upstream stub (on a machine with at least two CPUs), and is stopped by
:class:`Services` however the run ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_plan(pin: bool) -> dict[str, set[int] | None]:
    """Which CPUs each role gets: the server under test alone on one, the rest shared."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = []
    if not pin or len(cpus) < 2:
        return {"server": None, "stub": None, "load": None}
    others = set(cpus[1:])
    if len(cpus) >= 3:
        return {"server": {cpus[0]}, "stub": {cpus[1]}, "load": set(cpus[2:])}
    return {"server": {cpus[0]}, "stub": others, "load": others}


def _affinity(cpus: set[int] | None):
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (Linux), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time used so far by ``pid`` (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes, float]:
    """(status, body, seconds) for a GET; status 0 when nothing answered."""
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
            return resp.status, body, time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.perf_counter() - started
    except (urllib.error.URLError, OSError):
        return 0, b"", time.perf_counter() - started


def http_post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class Service:
    """One server process with its log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.cpus = cpus
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_affinity(self.cpus),
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        """Wait until ``url`` answers anything over HTTP; fail with the log tail if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, _, _ = http_get(url, timeout=1.0)
            if status:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class Services(contextlib.AbstractContextManager):
    """Starts services and stops every one of them on exit, in reverse order."""

    def __init__(self) -> None:
        self.started: list[Service] = []

    def start(self, service: Service, ready_url: str, timeout: float = 30.0) -> Service:
        service.start()
        self.started.append(service)
        service.wait_ready(ready_url, timeout)
        return service

    def __exit__(self, *exc: object) -> None:
        for service in reversed(self.started):
            service.stop()
