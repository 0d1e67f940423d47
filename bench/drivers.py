"""Load runs: ``wrk`` with ``wrk_bench.lua`` when installed, else ``loadgen.py``; each its own process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_bench.lua"
LOADGEN = HERE / "loadgen.py"
INSTALL_HINT = (
    "wrk is not installed; using the slower Python load generator. For real numbers: apt-get install wrk"
)


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    ttfb_p50_ms: float | None = None
    #: CPU time the server under test spent per request (user + system), filled in by the caller.
    cpu_us: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @classmethod
    def from_summary(cls, s: dict) -> LoadResult:
        errors = sum(
            int(s.get(k, 0)) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")
        )
        ttfb = s.get("ttfb_p50_us")
        return cls(
            requests=int(s["requests"]),
            seconds=s["duration_us"] / 1e6,
            p50_ms=s["p50_us"] / 1e3,
            p99_ms=s["p99_us"] / 1e3,
            mean_ms=float(s["mean_us"]) / 1e3,
            errors=errors,
            ttfb_p50_ms=ttfb / 1e3 if ttfb is not None else None,
        )


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "wrk"


def _affinity(cpus: set[int] | None):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def _parse(output: str, what: str) -> LoadResult:
    for line in output.splitlines():
        if line.startswith("BENCH_RESULT "):
            return LoadResult.from_summary(json.loads(line.split(" ", 1)[1]))
    raise RuntimeError(f"{what} printed no result:\n{output[-2000:]}")


class Driver:
    """Runs one load against one URL, with wrk or the Python generator."""

    def __init__(self, use_wrk: bool, cpus: set[int] | None = None) -> None:
        self.wrk = wrk_path() if use_wrk else None
        self.cpus = cpus

    @property
    def name(self) -> str:
        return wrk_version(self.wrk) if self.wrk else "bench/loadgen.py (Python, asyncio)"

    def run(
        self, url: str, *, concurrency: int, seconds: float, method: str = "POST", body: bytes = b""
    ) -> LoadResult:
        if self.wrk:
            return self._wrk(url, concurrency, seconds, method, body)
        return self.loadgen(url, concurrency=concurrency, seconds=seconds, method=method, body=body)

    def _wrk_command(
        self, url: str, concurrency: int, seconds: float, method: str, body: bytes
    ) -> tuple[list[str], dict[str, str]]:
        """wrk's argv and environment (``bench/wrk_bench.lua`` reads the method and body from it)."""
        env = dict(os.environ, BENCH_METHOD=method, BENCH_BODY=body.decode())
        argv = [self.wrk, "-t1", f"-c{concurrency}", f"-d{max(1, math.ceil(seconds))}s", "--timeout", "10s",
                "-s", str(WRK_SCRIPT), url]
        return argv, env

    def _wrk(self, url: str, concurrency: int, seconds: float, method: str, body: bytes) -> LoadResult:
        argv, env = self._wrk_command(url, concurrency, seconds, method, body)
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=_affinity(self.cpus),
            timeout=seconds + 60,
            check=False,
        )
        return _parse(out.stdout + out.stderr, "wrk")

    def loadgen(
        self,
        url: str,
        *,
        concurrency: int,
        seconds: float = 0.0,
        requests: int = 0,
        method: str = "POST",
        body: bytes = b"",
    ) -> LoadResult:
        argv = [sys.executable, str(LOADGEN), url, "--concurrency", str(concurrency), "--method", method]
        argv += ["--duration", str(seconds)] if seconds else ["--requests", str(requests)]
        if body:
            argv += ["--body", body.decode()]
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            preexec_fn=_affinity(self.cpus),
            timeout=(seconds or 60) + 60,
            check=False,
        )
        return _parse(out.stdout + out.stderr, "loadgen")

    def start_background(
        self, url: str, *, concurrency: int, seconds: float, body: bytes, log: Path
    ) -> subprocess.Popen[bytes]:
        """A long load (the soak) run while the caller samples memory; wait() on it, then read ``log``."""
        if self.wrk:
            argv, env = self._wrk_command(url, concurrency, seconds, "POST", body)
        else:
            env = None
            argv = [
                sys.executable,
                str(LOADGEN),
                url,
                "--concurrency",
                str(concurrency),
                "--duration",
                str(seconds),
                "--body",
                body.decode(),
            ]
        with open(log, "wb") as fh:
            return subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_affinity(self.cpus)
            )


def read_background(log: Path) -> LoadResult:
    return _parse(log.read_text(errors="replace"), str(log))
