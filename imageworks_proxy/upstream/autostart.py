"""Autostart for backends the proxy does not orchestrate.

With ``CHAT_PROXY_AUTOSTART_ENABLED=1`` and ``CHAT_PROXY_AUTOSTART_MAP`` naming a command for a logical
model, an adapter that finds its upstream unreachable calls :func:`ensure_started`: the command runs once
(concurrent requests join the same start), readiness is polled until
``CHAT_PROXY_AUTOSTART_GRACE_PERIOD_S``, and the adapter then retries its request. Orchestrated vLLM
entries ignore the map (the orchestrator starts them). Commands run in their own process group with
output in ``<dir of CHAT_PROXY_LOG_PATH>/autostart/<name>.log`` and are stopped with the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.upstream import process
from imageworks_proxy.upstream.process import safe_name
from imageworks_proxy.upstream.urls import apply_loopback_alias, entry_base_url

if TYPE_CHECKING:
    from imageworks_proxy.config import Config

log = logging.getLogger("imageworks_proxy.upstream.autostart")

_STOP_TIMEOUT_S = 10.0


def _argv(command: str | Sequence[str]) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return list(command)


def readiness_url(app: web.Application, entry: Entry) -> str | None:
    """Where to poll for readiness: the adapter's ``health_url(entry)`` when it has one, else
    ``<root>/health`` for vLLM, ``<root>/api/version`` for Ollama and ``<base>/models`` for the rest."""
    try:
        adapter = keys.models(app).adapter_for(entry)
    except ProxyError:
        adapter = None
    custom = getattr(adapter, "health_url", None)
    if callable(custom):
        url = custom(entry)
        if url:
            return url
    config = keys.config(app)
    if entry.backend == "ollama":
        base = entry_base_url(entry, default_port=11434, default_url=config.ollama_base_url)
    else:
        base = entry_base_url(entry, default_port=None, default_url=None, path="/v1")
    if not base:
        return None
    base = apply_loopback_alias(base, config.loopback_alias)
    parts = urlsplit(base)
    root = f"{parts.scheme}://{parts.netloc}"
    if entry.backend == "ollama":
        return root + "/api/version"
    if entry.backend == "vllm":
        return root + "/health"
    return base.rstrip("/") + "/models"


class _Started:
    def __init__(self, pid: int, log_path: str) -> None:
        self.pid = pid
        self.log_path = log_path
        self.returncode: int | None = None

    def poll(self) -> bool:
        if self.returncode is None:
            code = process.reap(self.pid)
            if code is not None:
                self.returncode = code
        return self.returncode is None and process.pid_alive(self.pid)


class Autostarter:
    """One per app: the commands it launched and the starts in progress."""

    def __init__(self, app: web.Application, config: Config) -> None:
        self.app = app
        self.config = config
        self._procs: dict[str, _Started] = {}
        self._starts: dict[str, asyncio.Task[bool]] = {}
        self.log_dir = os.path.join(os.path.dirname(config.log_path) or ".", "autostart")

    def command_for(self, entry: Entry) -> str | Sequence[str] | None:
        cfg = self.config
        if not cfg.autostart_enabled:
            return None
        command = cfg.autostart_map.get(entry.name)
        if command is None:
            return None
        try:
            adapter = keys.models(self.app).adapter_for(entry)
        except ProxyError:
            return command
        if not adapter.uses_autostart:
            return None  # the adapter starts its own servers (the vLLM orchestrator): the map does not apply
        return command

    async def ensure(self, entry: Entry, call: Any) -> bool:
        command = self.command_for(entry)
        if command is None:
            return False
        task = self._starts.get(entry.name)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(
                self._start(entry, command), name=f"autostart-{entry.name}"
            )
            self._starts[entry.name] = task
        if call is not None:
            await call.waiting()
        t0 = time.monotonic()
        try:
            return await asyncio.shield(task)
        finally:
            if call is not None:
                call.queue_ms += (time.monotonic() - t0) * 1000.0

    async def _start(self, entry: Entry, command: str | Sequence[str]) -> bool:
        cfg = self.config
        url = readiness_url(self.app, entry)
        started = self._procs.get(entry.name)
        path = os.path.join(self.log_dir, safe_name(entry.name) + ".log")
        if started is None or not started.poll():
            argv = _argv(command)
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            header = f"\n===== {now} imageworks-proxy autostart: {shlex.join(argv)}\n"
            try:
                pid = await asyncio.to_thread(process.spawn, argv, path, None, header)
            except OSError as exc:
                raise ProxyError(
                    503,
                    "model_start_failed",
                    f"Autostart command for {entry.name!r} cannot run: {exc.strerror or exc}",
                ) from None
            started = _Started(pid, path)
            self._procs[entry.name] = started
            log.info("autostart: started %r for %r (pid %d); log %s", shlex.join(argv), entry.name, pid, path)
        t0 = time.monotonic()
        deadline = t0 + cfg.autostart_grace_period_s
        session = keys.http(self.app)
        delay = process.POLL_S
        while True:
            if url is not None and await self._ready(session, url, deadline):
                log.info("autostart: %r ready after %.1fs", entry.name, time.monotonic() - t0)
                return True
            if not started.poll() and started.returncode not in (None, 0):
                # A launcher that exits 0 ("systemctl start x", "docker start x") is fine; a failure is not.
                line = process.explaining_line(process.log_tail(path)) or f"exit code {started.returncode}"
                raise ProxyError(
                    503,
                    "model_start_failed",
                    f"Autostart command for {entry.name!r} failed (exit code {started.returncode}): {line}",
                    hint=f"Full log: {path}",
                    headers={"Retry-After": "10"},
                )
            if time.monotonic() >= deadline:
                tail = process.log_tail(path, 5)
                raise ProxyError(
                    504,
                    "model_start_timeout",
                    f"Backend for {entry.name!r} was not ready within {cfg.autostart_grace_period_s:g}s "
                    "(CHAT_PROXY_AUTOSTART_GRACE_PERIOD_S) after running its autostart command."
                    + (" Last log lines: " + " | ".join(tail) if tail else " The command printed nothing."),
                    hint=f"Full log: {path}",
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 1.0)

    @staticmethod
    async def _ready(session: aiohttp.ClientSession, url: str, deadline: float) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=max(0.05, min(2.0, deadline - time.monotonic())))
            async with session.get(url, timeout=timeout) as resp:
                await resp.read()
                return resp.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    def check_map(self) -> None:
        """Log map names that are not in the registry or belong to orchestrated vLLM entries."""
        cfg = self.config
        if not cfg.autostart_enabled or not cfg.autostart_map:
            return
        by_name = keys.models(self.app).store.registry.by_name
        for name in cfg.autostart_map:
            entry = by_name.get(name)
            if entry is None:
                log.warning(
                    "autostart: CHAT_PROXY_AUTOSTART_MAP names %r, which is not in the registry", name
                )
            elif self.command_for(entry) is None:
                log.info(
                    "autostart: ignoring the command for %r: its adapter starts its own servers "
                    "(orchestrated vLLM models are started by the orchestrator)",
                    name,
                )

    async def close(self) -> None:
        for task in self._starts.values():
            task.cancel()
        for task in self._starts.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._starts.clear()
        for name, started in list(self._procs.items()):
            if started.poll():
                result = await process.stop_group(started.pid, term_timeout=_STOP_TIMEOUT_S)
                log.info("autostart: stopped %r (pid %d) in %.2fs", name, started.pid, result["seconds"])
            elif process.group_alive(started.pid):
                await process.stop_group(started.pid, term_timeout=_STOP_TIMEOUT_S)
        self._procs.clear()


AUTOSTART: web.AppKey[Autostarter] = web.AppKey("autostart", Autostarter)


async def ensure_started(app: web.Application, entry: Entry, call: Any) -> bool:
    """Called by an adapter whose upstream for ``entry`` is unreachable (connection refused).

    Returns ``False`` when there is nothing to start (autostart off, no command for the entry, or an
    orchestrated vLLM entry): the adapter then reports 503 ``backend_unavailable``. Returns ``True`` once
    the backend answers its readiness URL: retry the request once. Awaits ``call.waiting()`` before
    waiting (streams get keep-alives). Raises ``ProxyError`` 504 ``model_start_timeout`` (with the
    command's log tail) or 503 ``model_start_failed`` (the command failed).
    """
    starter = app.get(AUTOSTART)
    if starter is None:
        return False
    return await starter.ensure(entry, call)


async def autostart_ctx(app: web.Application):
    """Cleanup context: builds the app's :class:`Autostarter` and stops what it launched."""
    starter = Autostarter(app, keys.config(app))
    app[AUTOSTART] = starter
    starter.check_map()
    try:
        yield
    finally:
        await starter.close()
