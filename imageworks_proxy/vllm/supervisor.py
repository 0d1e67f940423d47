"""The vLLM processes the proxy runs: at most one awake and, with sleep mode (``CHAT_PROXY_VLLM_SLEEP_LEVEL``
1 or 2), up to ``CHAT_PROXY_VLLM_MAX_ASLEEP`` asleep, each on its own port from ``CHAT_PROXY_VLLM_PORT`` on.

Scheduling (who may use the GPU, when to switch) is :mod:`imageworks_proxy.gpu.scheduler`'s job; this class
only makes "model X is awake and healthy", "X is asleep" or "nothing runs" true, one operation at a time:
launch, readiness, sleep, wake-up, stop, adoption of what a previous proxy left running, and crash
detection. A sleep that fails becomes a stop; a wake-up that fails becomes a stop and a cold start. The
budgets for sleepers (how many, how much host memory, and GPU memory they must really have given back)
are in :mod:`imageworks_proxy.vllm.sleepers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
import attrs

from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.config import Config
from imageworks_proxy.gpu.nvml import Gpu
from imageworks_proxy.upstream import process
from imageworks_proxy.vllm import sleepmode
from imageworks_proxy.vllm.command import build_command, without_port
from imageworks_proxy.vllm.instance import Instance
from imageworks_proxy.vllm.launcher import Launcher, log_path_for
from imageworks_proxy.vllm.sleepers import SleeperPolicy
from imageworks_proxy.vllm.sleepmode import SleepFailed
from imageworks_proxy.vllm.state import StateFile

__all__ = ["Instance", "Outcome", "VllmSupervisor", "log_path_for"]

log = logging.getLogger("imageworks_proxy.orchestrator")

MONITOR_S = 0.25


@attrs.frozen
class Outcome:
    """What an operation did. ``action``: ``"cold"`` (launched), ``"wake"``, ``"reuse"`` (it was running
    already), ``"sleep"``, ``"stop"`` or ``"none"``; ``engine_s``: the time spent waiting for vLLM itself
    (its start-up, sleep, wake-up or exit), the rest of the operation being the proxy's own."""

    instance: Instance | None
    action: str
    engine_s: float = 0.0


class VllmSupervisor:
    """Owns the vLLM processes. ``session`` returns the HTTP client session used for health polls and the
    sleep API; ``on_exit(instance, exit_code, log_line)`` is called when a ready process dies on its own."""

    def __init__(
        self,
        config: Config,
        session: Callable[[], aiohttp.ClientSession],
        gpu: Gpu | None = None,
        on_exit: Callable[[Instance, int | None, str | None], None] | None = None,
    ) -> None:
        self.config = config
        self._session = session
        self.gpu = gpu
        self.on_exit = on_exit
        self.launcher = Launcher(config, session, gpu)
        self.state_file = StateFile(config.vllm_state_path)
        #: Every resident process, awake or asleep.
        self.instances: list[Instance] = []
        #: The logical name being launched right now (for ``loading`` status).
        self.starting: str | None = None
        self.wakes = 0
        self.sleeps = 0
        self.policy = SleeperPolicy(self)
        self._lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None

    # -- queries -------------------------------------------------------------------------------
    @property
    def sleep_level(self) -> int:
        return self.config.vllm_sleep_level

    @property
    def instance(self) -> Instance | None:
        """The awake instance (or the one waking up), if any."""
        return next((i for i in self.instances if not i.asleep or i.transition == "waking"), None)

    @property
    def sleepers(self) -> list[Instance]:
        """The sleeping instances, least recently used first."""
        asleep = [i for i in self.instances if i.asleep and i.transition is None and not i.stopping]
        return sorted(asleep, key=lambda i: i.asleep_since or 0.0)

    @property
    def last_error(self) -> str | None:
        return self.launcher.last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self.launcher.last_error = value

    @property
    def launches(self) -> int:
        return self.launcher.launches

    def status_of(self, name: str) -> str:
        """``loaded``, ``loading`` (starting or waking), ``asleep`` or ``stopped``."""
        for inst in self.instances:
            if inst.logical_name != name or inst.stopping:
                continue
            if inst.transition == "waking" or not inst.ready:
                return "loading"
            return "asleep" if inst.asleep else "loaded"
        return "loading" if self.starting == name else "stopped"

    def alive(self) -> bool:
        inst = self.instance
        return inst is not None and process.pid_alive(inst.pid)

    # -- lifecycle -----------------------------------------------------------------------------
    async def adopt(self) -> list[Instance]:
        """Adopt the live processes the state file names (a restarted proxy, or ``imageworks-loader``
        started them), asking each sleeper whether it still sleeps; drop stale entries. Never starts
        anything. Returns the adopted instances. With sleep mode off, adopted sleepers are stopped."""
        async with self._lock:
            states = await asyncio.to_thread(self.state_file.load_all_live)
            for state in states:
                inst = Instance.from_state(state)
                self.instances.append(inst)
                if not process.pid_alive(state.pid):
                    # Only leftovers of its process group remain (e.g. an orphaned engine core holding VRAM).
                    await self._stop_locked(inst, "leftover processes of a dead vLLM")
                elif not await self._inspect(inst):
                    await self._stop_locked(inst, "recorded asleep but its sleep API does not answer")
            if not self.sleep_level:
                for inst in self.sleepers:
                    await self._stop_locked(inst, "sleep mode is off (CHAT_PROXY_VLLM_SLEEP_LEVEL=0)")
            await self.policy.cap()
            await self._record()
            return list(self.instances)

    async def _inspect(self, inst: Instance) -> bool:
        """Find out whether an adopted ``inst`` is ready or asleep; False: it cannot be used."""
        if inst.asleep or "--enable-sleep-mode" in inst.flags:
            try:
                sleeping = await sleepmode.is_sleeping(self._session(), inst.root_url)
            except SleepFailed:
                if inst.asleep:
                    return False
                sleeping = False  # recorded awake and not answering yet: still starting
            if sleeping and not inst.asleep:
                # put to sleep by a proxy that stopped before recording it: the level is unknown, and a
                # wake-up from level 2 needs the weights reloaded (harmless after level 1)
                inst.sleep_level, inst.asleep_since = 2, time.time()
            elif not sleeping:
                inst.sleep_level, inst.asleep_since = 0, None
        inst.ready = inst.asleep or await self.launcher.healthy(inst)
        if inst.ready:
            inst.ready_at = time.monotonic()
        log.info(
            "vLLM: adopted model %r (pid %d, port %d, %s) from %s",
            inst.logical_name,
            inst.pid,
            inst.port,
            f"asleep at level {inst.sleep_level}"
            if inst.asleep
            else "healthy" if inst.ready else "not healthy yet",
            self.state_file.path,
        )
        return True

    def start_monitor(self) -> None:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="vllm-monitor")

    async def close(self, *, keep: bool = False) -> None:
        """Stop the monitor and every process, awake or asleep (unless ``keep``: leave the ready ones
        recorded for the next proxy)."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if keep:
            async with self._lock:
                kept = [i for i in self.instances if i.ready and not i.stopping and process.pid_alive(i.pid)]
                await self._stop_many([i for i in self.instances if i not in kept], "proxy shutting down")
                for inst in kept:
                    log.info(
                        "vLLM: leaving %r (pid %d, %s) running for the next proxy "
                        "(CHAT_PROXY_VLLM_KEEP_ON_EXIT=1)",
                        inst.logical_name,
                        inst.pid,
                        "asleep" if inst.asleep else "awake",
                    )
                self.instances = []
            return
        await self.stop_all("proxy shutting down")

    # -- operations ----------------------------------------------------------------------------
    async def ensure(self, entry: Entry) -> Instance:
        """:meth:`bring_up` ``entry``; returns its instance."""
        outcome = await self.bring_up(entry)
        assert outcome.instance is not None
        return outcome.instance

    async def bring_up(self, entry: Entry) -> Outcome:
        """Make ``entry`` the awake, healthy model: reuse a matching process (ours or adopted), wake it if it
        sleeps, else launch it, after putting the awake one to sleep (sleep mode) or stopping it. Raises
        ``ProxyError`` 503 ``model_start_failed`` (with the log line that explains it) or 504
        ``model_start_timeout``."""
        identity = without_port(build_command(self.config, entry).flags)
        async with self._lock:
            for inst in [i for i in self.instances if not i.stopping and not i.poll()]:
                await self._stop_locked(inst, "process is gone")
            awake = self.instance
            if awake is not None and awake.logical_name == entry.name and awake.identity == identity:
                return await self._reuse(awake)
            if awake is not None:
                same = awake.logical_name == entry.name
                reason = "registry entry changed" if same else f"switching to {entry.name!r}"
                await self._evict_locked(awake, reason, sleep=not same, keep=entry.name)
            sleeper = next((i for i in self.sleepers if i.logical_name == entry.name), None)
            if sleeper is not None and sleeper.identity != identity:
                await self._stop_locked(sleeper, "registry entry changed")
            elif sleeper is not None:
                try:
                    return Outcome(sleeper, "wake", await self._wake_locked(sleeper))
                except SleepFailed as exc:
                    log.warning("vLLM: waking %r (pid %d) failed (%s); stopping it and starting it cold",
                                sleeper.logical_name, sleeper.pid, exc)
                    await self._stop_locked(sleeper, "wake-up failed")
            return await self._launch(entry)

    async def evict(self, name: str, reason: str, *, sleep: bool = True, keep: str | None = None) -> Outcome:
        """Free the GPU of model ``name``: put it to sleep (when ``sleep`` and sleep mode allow it and the
        sleep works), else stop it. ``keep`` names the model the GPU is freed for: making room for this
        sleeper never stops it. ``"none"`` when ``name`` is not awake."""
        async with self._lock:
            inst = next((i for i in self.instances if i.logical_name == name and not i.asleep), None)
            if inst is None or inst.stopping:
                return Outcome(None, "none")
            return await self._evict_locked(inst, reason, sleep=sleep, keep=keep)

    async def stop(self, reason: str = "requested") -> None:
        """Stop the awake process (sleepers stay)."""
        async with self._lock:
            inst = self.instance
            if inst is not None:
                await self._stop_locked(inst, reason)

    async def stop_model(self, name: str, reason: str = "requested") -> bool:
        """Stop model ``name``, awake or asleep; returns whether it ran."""
        async with self._lock:
            found = [i for i in self.instances if i.logical_name == name and not i.stopping]
            await self._stop_many(found, reason)
            return bool(found)

    async def stop_all(self, reason: str = "requested") -> None:
        """Stop every process, awake or asleep, at the same time."""
        async with self._lock:
            await self._stop_many(list(self.instances), reason)

    async def check(self) -> bool:
        """Look at the awake process now (after a failed upstream call); handle an unexpected exit. Returns
        whether a ready process is still there."""
        inst = self.instance
        if inst is None:
            return False
        if inst.poll():
            return True
        await self._handle_exit(inst)
        return False

    # -- internals -----------------------------------------------------------------------------
    async def _reuse(self, inst: Instance) -> Outcome:
        t0 = time.monotonic()
        if not inst.ready:
            await self.launcher.wait_ready(inst, self.launcher.deadline_for(inst))
        return Outcome(inst, "reuse", time.monotonic() - t0)

    async def _launch(self, entry: Entry) -> Outcome:
        cfg = self.config
        cmd = build_command(cfg, entry, port=await self.policy.free_port() if self.sleep_level else None)
        await self.policy.gpu_room(cmd.gpu_memory_utilization, None)
        self.starting = entry.name
        try:
            t0 = time.monotonic()
            inst, offset = await self.launcher.spawn(entry, cmd)
            spawned = time.monotonic()
            self.instances.append(inst)
            await self._record()
            try:
                ready_at = await self.launcher.wait_ready(inst, t0 + cfg.vllm_start_timeout_s, offset)
            except BaseException:
                # failed, timed out or cancelled (shutdown): never leave a half-started process behind
                await asyncio.shield(self._stop_locked(inst, "start did not complete"))
                raise
            log.info("vLLM: %r ready in %.1fs (pid %d)", entry.name, time.monotonic() - t0, inst.pid)
            return Outcome(inst, "cold", max(0.0, ready_at - spawned))
        finally:
            self.starting = None

    async def _evict_locked(
        self, inst: Instance, reason: str, *, sleep: bool, keep: str | None = None
    ) -> Outcome:
        level = self.sleep_level
        if sleep and level and inst.ready and await self.policy.make_room(inst, level, keep):
            try:
                return Outcome(inst, "sleep", await self._sleep_locked(inst, self.sleep_level))
            except SleepFailed as exc:
                log.warning("vLLM: putting %r (pid %d) to sleep failed (%s); stopping it instead",
                            inst.logical_name, inst.pid, exc)
        return Outcome(None, "stop", await self._stop_locked(inst, reason))

    async def _sleep_locked(self, inst: Instance, level: int) -> float:
        inst.transition = "sleeping"
        t0 = time.monotonic()
        try:
            await sleepmode.put_to_sleep(
                self._session(), inst.root_url, level, self.config.vllm_stop_timeout_s
            )
        finally:
            inst.transition = None
        seconds = time.monotonic() - t0
        inst.sleep_level, inst.asleep_since = level, time.time()
        self.sleeps += 1
        log.info("vLLM: %r (pid %d) asleep at level %d in %.2fs", inst.logical_name, inst.pid, level, seconds)
        await self._record()
        return seconds

    async def _wake_locked(self, inst: Instance) -> float:
        await self.policy.gpu_room(inst.gpu_memory_utilization(self.config.vllm_gpu_memory_utilization), inst)
        inst.transition = "waking"
        t0 = time.monotonic()
        try:
            await sleepmode.wake_up(
                self._session(), inst.root_url, inst.sleep_level, self.config.vllm_start_timeout_s
            )
        finally:
            inst.transition = None
        seconds = time.monotonic() - t0
        log.info("vLLM: woke %r (pid %d) from level %d in %.2fs", inst.logical_name, inst.pid,
                 inst.sleep_level, seconds)
        inst.sleep_level, inst.asleep_since, inst.host_bytes = 0, None, None
        inst.ready_at = time.monotonic()
        self.wakes += 1
        await self._record()
        return seconds

    async def _stop_locked(self, inst: Instance, reason: str) -> float:
        """Stop ``inst`` and forget it; returns how long it took."""
        result = await self.launcher.stop(inst, reason)
        await self._record(without=[inst])  # the file first: whoever sees "stopped" finds no stale record
        if inst in self.instances:
            self.instances.remove(inst)
        return float(result["seconds"])  # type: ignore[arg-type]

    async def _stop_many(self, insts: list[Instance], reason: str) -> None:
        if not insts:
            return
        await asyncio.gather(*(self.launcher.stop(i, reason) for i in insts))
        await self._record(without=insts)
        self.instances = [i for i in self.instances if i not in insts]

    async def _record(self, without: list[Instance] | tuple[()] = ()) -> None:
        states = [i.to_state() for i in self.instances if i not in without]
        await asyncio.to_thread(self.state_file.write_all, states)

    async def _handle_exit(self, inst: Instance) -> None:
        async with self._lock:
            if inst not in self.instances or inst.stopping:
                return
            inst.poll()
            code = inst.returncode
            line = process.explaining_line(process.log_tail(inst.log_path)) if inst.log_path else None
            log.warning(
                "vLLM: %r (pid %d%s) exited unexpectedly (code %s): %s; the next request restarts it",
                inst.logical_name,
                inst.pid,
                ", asleep" if inst.asleep else "",
                code,
                line,
            )
            self.last_error = f"{inst.logical_name} exited unexpectedly: {line}"
            await self._stop_locked(inst, "exited unexpectedly")  # also takes down leftover engine processes
        if self.on_exit is not None:
            self.on_exit(inst, code, line)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_S)
            for inst in list(self.instances):
                if not inst.ready or inst.stopping or inst.transition is not None:
                    continue
                try:
                    if not inst.poll():
                        await self._handle_exit(inst)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("vLLM monitor error")
