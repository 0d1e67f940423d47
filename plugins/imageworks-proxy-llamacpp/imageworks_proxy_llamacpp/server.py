"""One ``llama-server`` process at a time on the proxy's single model port.

:class:`LlamaServerSlot` owns the process: it builds the command line from a registry entry, starts the
server in its own process group with its output in a log file, waits for ``/health``, counts the requests
using it, and stops it (SIGTERM to the group, then SIGKILL). Starting is single-flight: concurrent
requests for the same model join one start; a request for another model waits for the requests in flight
to finish, then the slot switches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
import attrs

from imageworks_proxy import Config, Entry, ProxyError

log = logging.getLogger("imageworks_proxy_llamacpp")

COMMAND_ENV = "IMAGEWORKS_LLAMACPP_COMMAND"
LOG_DIR_ENV = "IMAGEWORKS_LLAMACPP_LOG_DIR"
_POLL_FIRST_S = 0.05
_POLL_MAX_S = 0.5


@attrs.frozen
class LlamaCppSettings:
    """Where and how ``llama-server`` runs. Port, bind address and timeouts are the proxy's vLLM ones
    (``CHAT_PROXY_VLLM_PORT`` etc.): the llama.cpp server takes the same single model port."""

    command: tuple[str, ...]
    log_dir: Path
    host: str
    port: int
    start_timeout_s: float
    stop_timeout_s: float
    health_timeout_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str], config: Config) -> LlamaCppSettings:
        command = tuple(shlex.split(environ.get(COMMAND_ENV, "") or "llama-server"))
        default_logs = Path(config.vllm_log_dir).parent / "llamacpp"
        return cls(
            command=command,
            log_dir=Path(environ.get(LOG_DIR_ENV) or default_logs),
            host=config.vllm_host,
            port=config.vllm_port,
            start_timeout_s=config.vllm_start_timeout_s,
            stop_timeout_s=config.vllm_stop_timeout_s,
            health_timeout_s=config.vllm_health_timeout_s,
        )

    @property
    def root_url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"  # bound on every interface: talk to it over loopback
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def start_failed(message: str) -> ProxyError:
    return ProxyError(503, "model_start_failed", message, headers={"Retry-After": "10"})


def model_file(entry: Entry) -> Path:
    """The ``.gguf`` file to load: ``backend_config.model_path``, else ``download_path``.

    A directory is searched for its model file: the only ``.gguf`` that is not a multimodal projector
    (``mmproj*``), or the first shard (``*-00001-of-000NN.gguf``) of a split model.
    """
    raw = entry.backend_config.model_path or entry.download_path
    if not raw:
        raise start_failed(
            f"Model {entry.name!r} has no backend_config.model_path or download_path to give llama-server."
        )
    path = Path(os.path.expanduser(raw))
    if not path.is_dir():
        return path
    ggufs = sorted(p for p in path.glob("*.gguf") if not p.name.lower().startswith("mmproj"))
    first_shards = [p for p in ggufs if "-00001-of-" in p.name]
    if len(ggufs) == 1:
        return ggufs[0]
    if len(first_shards) == 1:
        return first_shards[0]
    found = ", ".join(p.name for p in ggufs) or "none"
    raise start_failed(
        f"Model {entry.name!r}: cannot tell which .gguf in {path} to load (found: {found}); "
        "set backend_config.model_path to the file."
    )


def projector_file(entry: Entry, model: Path) -> Path | None:
    """A vision entry's ``mmproj*.gguf`` beside the model, unless ``extra_args`` already names one."""
    if (
        not entry.vision
        or "--mmproj" in entry.backend_config.extra_args
        or "-mm" in entry.backend_config.extra_args
    ):
        return None
    found = sorted(model.parent.glob("mmproj*.gguf"))
    return found[0] if found else None


def served_name(entry: Entry) -> str:
    """The name llama-server answers to (``--alias``); the proxy sends it as the request's ``model``."""
    return entry.upstream_model


def build_argv(settings: LlamaCppSettings, entry: Entry) -> list[str]:
    """The ``llama-server`` argv for ``entry``.

    ``<command> -m <model> --host <host> --port <port> --alias <served id> [--mmproj <file>] <extra_args>``
    """
    model = model_file(entry)
    argv = [*settings.command, "-m", str(model), "--host", settings.host, "--port", str(settings.port)]
    argv += ["--alias", served_name(entry)]
    projector = projector_file(entry, model)
    if projector is not None:
        argv += ["--mmproj", str(projector)]
    argv += list(entry.backend_config.extra_args)
    return argv


def explaining_line(log_path: Path, limit: int = 8192) -> str:
    """The log line most likely to say why the server died: the last one that mentions an error."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            lines = [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if any(word in line.lower() for word in ("error", "failed", "cannot", "unable", "exception")):
            return line
    return lines[-1] if lines else ""


class LlamaServerSlot:
    """The single llama-server of one app. All methods run on the app's event loop."""

    def __init__(self, settings: LlamaCppSettings, http: Callable[[], aiohttp.ClientSession]) -> None:
        self.settings = settings
        self._http = http
        self._proc: asyncio.subprocess.Process | None = None
        self._active: str | None = None
        self._ready = False
        self._lock = asyncio.Lock()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- state ---------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.settings.root_url + "/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def serving(self, name: str) -> bool:
        return self._active == name and self._ready and self._alive()

    def status(self, name: str) -> str:
        if self._active != name or not self._alive():
            return "stopped"
        return "loaded" if self._ready else "loading"

    # -- requests ------------------------------------------------------------------------------
    async def acquire(self, entry: Entry, waiting: Callable[[], object] | None = None) -> Callable[[], None]:
        """Make ``entry`` the running model (starting or switching if needed) and hold it.

        Returns the release function (idempotent); call it when the response is over. ``waiting`` is
        awaited before any wait for a start or a switch (``ChatCall.waiting``).
        """
        if self.serving(entry.name) and not self._lock.locked():
            return self._hold()
        if waiting is not None:
            await waiting()  # type: ignore[misc]
        async with self._lock:
            await self._ensure(entry)
            return self._hold()

    async def ensure_started(self, entry: Entry) -> None:
        """Start ``entry`` unless it is already running (the GPU tenancy's ``start`` callback)."""
        async with self._lock:
            await self._ensure(entry)

    async def stop(self, name: str | None = None) -> None:
        """Stop the server (only if it runs ``name``, when given). The tenancy's ``stop`` callback."""
        async with self._lock:
            if name is None or self._active == name:
                await self._stop_locked()

    async def recover(self, entry: Entry) -> bool:
        """Restart ``entry``'s server if its process has died (a crash seen as a refused connection).

        Returns True when a fresh server is ready, False when the server is alive (or runs another model)
        and a retry would not help.
        """
        if self._lock.locked():
            # A switch is waiting for the requests in flight, this one included: waiting for it would
            # deadlock.
            return False
        async with self._lock:
            proc = self._proc
            if self._active != entry.name or proc is None:
                return False
            if proc.returncode is None:
                try:  # the exit may not have been reaped yet
                    await asyncio.wait_for(proc.wait(), 0.5)
                except TimeoutError:
                    return False
            log.warning(
                "llama-server for %s exited with code %s; starting it again", entry.name, proc.returncode
            )
            await self._stop_locked()
            await self._start_locked(entry)
            return True

    def _hold(self) -> Callable[[], None]:
        self._inflight += 1
        self._idle.clear()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

        return release

    async def _ensure(self, entry: Entry) -> None:
        if self.serving(entry.name):
            return
        if self._alive() and self._active != entry.name:
            await self._idle.wait()  # requests on the previous model finish first
        await self._stop_locked()
        await self._start_locked(entry)

    # -- process -------------------------------------------------------------------------------
    async def _start_locked(self, entry: Entry) -> None:
        argv = build_argv(self.settings, entry)
        log_path = self.settings.log_dir / f"{entry.name.replace('/', '_')}.log"
        started = time.perf_counter()
        log.info(
            "starting llama-server for %s on port %d: %s", entry.name, self.settings.port, shlex.join(argv)
        )
        try:
            self._proc = await _spawn(argv, log_path)
        except FileNotFoundError:
            raise start_failed(
                f"Cannot start {argv[0]!r} for model {entry.name!r}: command not found. Install llama.cpp's "
                f"llama-server or point {COMMAND_ENV} at it."
            ) from None
        except OSError as exc:
            raise start_failed(f"Cannot start {argv[0]!r} for model {entry.name!r}: {exc}") from None
        self._active = entry.name
        self._ready = False
        try:
            await self._wait_ready(entry, log_path)
        except BaseException:
            await self._stop_locked()
            raise
        self._ready = True
        log.info(
            "llama-server for %s ready in %.1f s (pid %d)",
            entry.name,
            time.perf_counter() - started,
            self._proc.pid,
        )

    async def _wait_ready(self, entry: Entry, log_path: Path) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout_s
        exited = loop.create_task(self._proc.wait())
        interval = _POLL_FIRST_S
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ProxyError(
                        504,
                        "model_start_timeout",
                        f"llama-server for model {entry.name!r} was not ready within "
                        f"{self.settings.start_timeout_s:g} s (CHAT_PROXY_VLLM_START_TIMEOUT_S); "
                        f"log: {log_path}",
                    )
                if await self._healthy(min(self.settings.health_timeout_s, remaining)):
                    return
                await asyncio.wait({exited}, timeout=min(interval, max(remaining, 0.01)))
                if exited.done():
                    line = explaining_line(log_path)
                    raise start_failed(
                        f"llama-server for model {entry.name!r} exited with code {exited.result()} "
                        "while starting"
                        + (f": {line}" if line else "")
                        + f" (log: {log_path})"
                    )
                interval = min(interval * 2, _POLL_MAX_S)
        finally:
            if not exited.done():
                exited.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await exited

    async def _healthy(self, timeout: float) -> bool:
        try:
            async with self._http().get(
                self.settings.root_url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status == 200  # llama-server answers 503 while it loads the model
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _stop_locked(self) -> None:
        proc, name = self._proc, self._active
        self._proc, self._active, self._ready = None, None, False
        if proc is None or proc.returncode is not None:
            return
        started = time.perf_counter()
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.settings.stop_timeout_s)
        except TimeoutError:
            log.warning(
                "llama-server for %s ignored SIGTERM for %g s; killing it", name, self.settings.stop_timeout_s
            )
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        log.info("stopped llama-server for %s in %.1f s", name, time.perf_counter() - started)


def _open_log(log_path: Path):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return open(log_path, "ab")


async def _spawn(argv: list[str], log_path: Path) -> asyncio.subprocess.Process:
    """Start ``argv`` in its own process group (so stop reaches its children) with output to ``log_path``."""
    logf = await asyncio.to_thread(_open_log, log_path)
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=logf,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        logf.close()  # the child has its own copy of the descriptor


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
