"""Process primitives for servers the proxy launches: spawn in an own process group with a log file, the
log line that explains a failed start, and a stop that really waits until the server is gone (readiness:
vllm/ready.py).

Why a process group: vLLM keeps the GPU memory in a separate engine-core process; signalling only the API
server can orphan it (the port is freed, the GPU stays full). So every signal goes to the group, and a stop
waits until no process of the group is left, the port can be bound again and (with NVML) none of the
group's pids holds GPU memory any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("imageworks_proxy.orchestrator")

#: How often exits, the port and NVML are polled while waiting.
POLL_S = 0.05
_ERRORISH = re.compile(
    r"(\b\w*(Error|Exception|Exit)\b\s*:|\berror\b|\bfailed\b|out of memory|address already in use|"
    r"no such file|not found|cannot|could not|unrecognized arguments|invalid)",
    re.IGNORECASE,
)
_POINTERS = re.compile(
    r"see (the )?root cause above|see above|traceback \(most recent call last\)", re.IGNORECASE
)


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A logical model name usable as a log file name."""
    return _UNSAFE_NAME.sub("_", name).strip("._") or "model"


# -- spawning ------------------------------------------------------------------------------------
def spawn(
    argv: Sequence[str], log_path: str, env: dict[str, str] | None = None, header: str | None = None
) -> int:
    """Start ``argv`` in a new session (own process group, no controlling terminal), stdin from
    /dev/null, stdout and stderr appended to ``log_path``. Returns the pid (which is also the pgid).

    Uses ``posix_spawnp`` rather than ``subprocess.Popen`` because the process may outlive this proxy
    (a restarted proxy adopts it), so there is no Popen object to keep and no ResourceWarning to silence.
    Raises ``OSError`` when the program cannot be run.
    """
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if header:
            os.write(fd, header.encode(errors="replace"))
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, fd, 1),
            (os.POSIX_SPAWN_DUP2, fd, 2),
        ]
        return os.posix_spawnp(
            argv[0], list(argv), dict(os.environ if env is None else env), file_actions=actions, setsid=True
        )
    finally:
        os.close(fd)


# -- liveness ------------------------------------------------------------------------------------
def reap(pid: int) -> int | None:
    """Reap ``pid`` if it is our exited child; returns its exit code (negative: killed by a signal),
    or ``None`` when it is still running or not our child."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode(errors="replace")
    except OSError:
        return None
    return data.rpartition(")")[2].split()[0] if ")" in data else None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (zombies count as gone; our own exited children are reaped here)."""
    if pid <= 0:
        return False
    reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_state(pid) != "Z"


def reap_group(pgid: int) -> None:
    """Reap every exited child of ours in group ``pgid`` (matters when the proxy runs as PID 1 in a
    container without an init: orphaned engine processes are re-parented to us)."""
    while True:
        try:
            done, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if done == 0:
            return


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group ``pgid``, from /proc; ``[pgid]`` where /proc is missing."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return [pgid] if pid_alive(pgid) else []
    out = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = data.rpartition(")")[2].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            out.append(int(name))
    return out


def group_alive(pgid: int, members: set[int] | None = None) -> bool:
    """Whether any non-zombie process is left in group ``pgid``.

    ``members`` (pids known to be in the group) make the common case cheap: /proc is scanned only when
    none of them runs any more but the kernel still reports the group.
    """
    reap_group(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    if members and any(_proc_state(pid) not in (None, "Z") for pid in members):
        return True
    return bool(group_pids(pgid))


def cmdline(pid: int) -> list[str] | None:
    """The command line of ``pid`` (``None`` when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None
        return _ps_cmdline(pid)
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


def _ps_cmdline(pid: int) -> list[str] | None:  # pragma: no cover - non-Linux fallback
    import subprocess

    try:
        out = subprocess.run(
            ["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split() or None


def cmdline_matches(pid: int, flags: Sequence[str]) -> bool:
    """Whether ``pid`` runs a command whose arguments end with ``flags`` (the recorded vLLM flags).

    The launcher part is not compared: a console script re-executes as ``python /path/vllm ...``.
    """
    actual = cmdline(pid)
    if not actual or not flags:
        return False
    flags = list(flags)
    if len(actual) >= len(flags) and actual[len(actual) - len(flags):] == flags:
        return True
    # ps fallback splits on spaces: compare the joined text.
    return " ".join(actual).endswith(" ".join(flags))


# -- ports ---------------------------------------------------------------------------------------
def connect_host(host: str) -> str:
    """Where to connect to a server bound to ``host`` (a wildcard bind is reached on loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def url_host(host: str) -> str:
    host = connect_host(host)
    return f"[{host}]" if ":" in host else host


def port_free(host: str, port: int) -> bool:
    """Whether a new server could bind ``host:port`` now (SO_REUSEADDR, like vLLM; TIME_WAIT is fine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


async def wait_port_free(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if port_free(host, port):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)


# -- logs ----------------------------------------------------------------------------------------
def log_tail(path: str, max_lines: int = 40, max_bytes: int = 65536) -> list[str]:
    """The last lines of a log file (empty when it is missing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = [ln.rstrip() for ln in data.decode(errors="replace").splitlines()]
    return [ln for ln in lines if ln.strip()][-max_lines:]


def explaining_line(lines: Sequence[str]) -> str | None:
    """The log line that best explains a failed start: the last error-looking line that is not a mere
    pointer ("see root cause above", "Traceback ..."), else the last line."""
    candidates = [ln.strip() for ln in lines if _ERRORISH.search(ln) and not _POINTERS.search(ln)]
    if candidates:
        # Python's final exception line ("FooError: ...") is the most precise; prefer the last one.
        exc_lines = [ln for ln in candidates if re.search(r"\b\w*(Error|Exception)\b\s*:", ln)]
        return (exc_lines or candidates)[-1][:2000]
    return lines[-1].strip()[:2000] if lines else None


# -- readiness (the wait itself: vllm/ready.py) ---------------------------------------------------
class StartFailed(Exception):
    """The process exited before it became ready; ``line`` is the log line that explains why."""

    def __init__(self, returncode: int | None, line: str | None) -> None:
        super().__init__(line or f"exited with code {returncode}")
        self.returncode = returncode
        self.line = line


class StartTimeout(Exception):
    """The process was not ready before its deadline."""


# -- stopping ------------------------------------------------------------------------------------
def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_group_gone(pgid: int, timeout: float, members: set[int]) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.005  # most servers exit within tens of milliseconds: look often at first
    while group_alive(pgid, members):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_S)
    return True


async def stop_group(
    pgid: int,
    *,
    term_timeout: float,
    host: str | None = None,
    port: int | None = None,
    gpu_pids: Callable[[], set[int]] | None = None,
    release_timeout: float | None = None,
) -> dict[str, object]:
    """Stop process group ``pgid``: SIGTERM, wait ``term_timeout``, SIGKILL; then wait until the group
    is gone, ``host:port`` can be bound and, when ``gpu_pids`` (NVML) is given, none of the group's pids
    holds GPU memory. Returns what happened (for logs and tests): ``signal`` (the last one sent, or None
    when the group was already gone), ``exited``, ``port_free``, ``gpu_released``, ``seconds``.
    Depends only on the standard library (the device check loads this module on its own).
    """
    t0 = time.monotonic()
    release_timeout = term_timeout if release_timeout is None else release_timeout
    members = set(await asyncio.to_thread(group_pids, pgid)) | {pgid}
    sent: str | None = None
    if group_alive(pgid, members):
        _killpg(pgid, signal.SIGTERM)
        sent = "SIGTERM"
        if not await _wait_group_gone(pgid, term_timeout, members):
            members |= set(await asyncio.to_thread(group_pids, pgid))
            _killpg(pgid, signal.SIGKILL)
            sent = "SIGKILL"
            await _wait_group_gone(pgid, max(1.0, release_timeout), members)
    exited = not group_alive(pgid, members)
    free: bool | None = None
    if port is not None:
        free = await wait_port_free(host or "127.0.0.1", port, release_timeout)
    released: bool | None = None
    if gpu_pids is not None:
        deadline = time.monotonic() + release_timeout
        while True:
            held = gpu_pids() & members
            if not held:
                released = True
                break
            if time.monotonic() >= deadline:
                released = False
                log.warning(
                    "GPU memory still held by pid(s) %s %.1fs after stopping group %d",
                    sorted(held),
                    time.monotonic() - t0,
                    pgid,
                )
                break
            await asyncio.sleep(POLL_S)
    return {
        "signal": sent,
        "exited": exited,
        "port_free": free,
        "gpu_released": released,
        "seconds": round(time.monotonic() - t0, 3),
    }
