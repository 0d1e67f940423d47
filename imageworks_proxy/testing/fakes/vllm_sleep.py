"""The sleep-mode endpoints of the fake vLLM (:mod:`imageworks_proxy.testing.fakes.vllm`).

Like vLLM, they exist only when the server was started with ``--enable-sleep-mode`` and the environment
variable ``VLLM_SERVER_DEV_MODE=1`` (404 otherwise): ``POST /sleep?level=1|2``, ``POST /wake_up``,
``GET /is_sleeping`` → ``{"is_sleeping": bool}``, ``POST /collective_rpc {"method": "reload_weights"}``
and ``POST /reset_prefix_cache``.

The fake's ``--fake-lock`` file stands for GPU memory: it is held while the engine is awake and released
while it sleeps, so a wake while another engine holds the GPU fails loudly (an ``overlap`` event and a
500 "CUDA out of memory", as a real wake into a full GPU would). A chat request to a sleeping engine is
refused (503, an ``asleep_request`` event); after a level 2 sleep the weights are gone until
``reload_weights``, and answers are garbage meanwhile (a ``no_weights`` event).

Test controls (flags of the fake):
  --fake-sleep-delay S     seconds a /sleep takes (default 0)
  --fake-wake-delay S      seconds a /wake_up takes (default 0)
  --fake-sleep-fail MODE   error: /sleep answers 500; ignore: /sleep answers 200 but the engine stays awake
  --fake-wake-fail         /wake_up answers 500 and the engine stays asleep
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--fake-sleep-delay", type=float, default=0.0)
    p.add_argument("--fake-wake-delay", type=float, default=0.0)
    p.add_argument("--fake-sleep-fail", choices=["error", "ignore"])
    p.add_argument("--fake-wake-fail", action="store_true")


def _error(status: int, message: str, kind: str = "InternalServerError") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class SleepMode:
    """The engine's sleep state and the routes that change it. ``event(name, **fields)`` records an event;
    ``lock_fd()`` is the fake's GPU lock file descriptor (None without ``--fake-lock``)."""

    def __init__(
        self, args: argparse.Namespace, event: Callable[..., None], lock_fd: Callable[[], int | None]
    ) -> None:
        self.args = args
        self.event = event
        self.lock_fd = lock_fd
        self.enabled = bool(args.enable_sleep_mode) and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        self.asleep = False
        self.level = 0
        self.weights_lost = False

    def add_routes(self, app: web.Application) -> None:
        if not self.enabled:
            return
        app.router.add_post("/sleep", self.sleep)
        app.router.add_post("/wake_up", self.wake_up)
        app.router.add_get("/is_sleeping", self.is_sleeping)
        app.router.add_post("/collective_rpc", self.collective_rpc)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)

    def refuse_chat(self) -> web.Response | None:
        """The answer to a chat request while asleep (None when the engine can serve it)."""
        if not self.asleep:
            return None
        self.event("asleep_request")
        print("fake_vllm: ERROR a generate request reached a sleeping engine", file=sys.stderr, flush=True)
        return _error(503, "The engine is sleeping; call /wake_up first.", "ServiceUnavailableError")

    def garbage(self) -> bool:
        """Whether answers are garbage now (level 2 sleep woken without reloading the weights)."""
        if self.weights_lost:
            self.event("no_weights")
        return self.weights_lost

    # -- routes ------------------------------------------------------------------------------------
    async def sleep(self, request: web.Request) -> web.Response:
        try:
            level = int(request.query.get("level", "1"))
        except ValueError:
            return _error(400, f"invalid sleep level {request.query.get('level')!r}", "BadRequestError")
        if level not in (1, 2):
            return _error(400, f"sleep level must be 1 or 2, got {level}", "BadRequestError")
        began = time.monotonic()
        if self.args.fake_sleep_fail == "error":
            return _error(500, "RuntimeError: fake sleep failure")
        await asyncio.sleep(self.args.fake_sleep_delay)
        if self.args.fake_sleep_fail == "ignore" or self.asleep:
            return web.Response(status=200)
        fd = self.lock_fd()
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)  # the GPU memory is given back
        self.asleep, self.level = True, level
        self.event("sleep", level=level, began=began)
        return web.Response(status=200)

    async def wake_up(self, request: web.Request) -> web.Response:
        began = time.monotonic()
        if not self.asleep:
            return web.Response(status=200)
        if self.args.fake_wake_fail:
            return _error(500, "RuntimeError: fake wake-up failure")
        fd = self.lock_fd()
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.event("overlap")
                print("fake_vllm: ERROR woken while another fake vLLM holds the GPU lock", file=sys.stderr,
                      flush=True)
                return _error(500, "torch.OutOfMemoryError: CUDA out of memory (another engine holds it)")
        await asyncio.sleep(self.args.fake_wake_delay)
        self.asleep = False
        self.weights_lost = self.level == 2
        self.event("wake", level=self.level, began=began)
        return web.Response(status=200)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.asleep})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except ValueError:
            return _error(400, "invalid JSON body", "BadRequestError")
        method = body.get("method") if isinstance(body, dict) else None
        if not isinstance(method, str):
            return _error(400, "'method' must be a string", "BadRequestError")
        if method == "reload_weights":
            self.weights_lost = False
        self.event("collective_rpc", method=method)
        return web.json_response({"results": [None]})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        self.event("reset_prefix_cache")
        return web.Response(status=200)
