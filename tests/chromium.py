"""A headless Chromium for the browser tests, driven over the Chrome DevTools protocol with aiohttp.

``find_chromium()`` finds Debian's ``chromium``; ``Chromium.launch(tmp)`` starts it on a free debugging port
(read from the ``DevToolsActivePort`` file it writes), ``open(url)`` loads a page in a new tab, and a
:class:`Tab` evaluates JavaScript, waits for a condition, emulates a phone or dark mode and takes
screenshots. Every uncaught exception and console error on the page is kept in ``Tab.errors``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp

#: Flags a container without a display, GPU or network needs; nothing is fetched from outside.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-default-browser-check", "--hide-scrollbars",
)
START_TIMEOUT_S = 60.0


def find_chromium() -> str | None:
    """The Chromium executable (``CHROMIUM`` overrides the search), or None when none is installed."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class CdpError(RuntimeError):
    pass


class Chromium:
    """One browser process and its DevTools websocket."""

    def __init__(self, proc: asyncio.subprocess.Process, http: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse) -> None:
        self.proc = proc
        self.http = http
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tabs: dict[str, Tab] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def launch(cls, executable: str, tmp: Path, flags: tuple[str, ...] = ()) -> Chromium:
        """Start the browser; ``flags`` are added to :data:`FLAGS` (e.g. ``--host-resolver-rules``)."""
        profile = tmp / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        log = (tmp / "chromium.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            executable, *FLAGS, *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        port_file = profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.returncode is not None or loop.time() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                log_text = (tmp / "chromium.log").read_text()[-2000:]
                raise CdpError(f"chromium did not start; its log: {log_text}")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        return cls(proc, http, ws)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
            elif "method" in data and data.get("sessionId") in self._tabs:
                self._tabs[data["sessionId"]].on_event(data["method"], data.get("params", {}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session is not None:
            msg["sessionId"] = session
        await self.ws.send_json(msg)
        reply = await asyncio.wait_for(fut, 60)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def open(self, url: str, *, width: int = 1280, height: int = 900, mobile: bool = False,
                   dark: bool = False) -> Tab:
        """A new tab showing ``url`` once its load event fired, at the given viewport size."""
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        tab = Tab(self, attached["sessionId"])
        self._tabs[tab.session] = tab
        for domain in ("Page", "Runtime", "Log"):
            await tab.send(f"{domain}.enable")
        await tab.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                       deviceScaleFactor=2 if mobile else 1, mobile=mobile)
        await tab.send("Emulation.setEmulatedMedia", features=[
            {"name": "prefers-color-scheme", "value": "dark" if dark else "light"},
        ])
        loaded = tab.expect("Page.loadEventFired")
        await tab.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, 30)
        return tab

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 10)
        await self.ws.close()
        await self.http.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            await self.proc.wait()


class Tab:
    """One page in the browser."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session
        #: Uncaught exceptions and console/log errors, as text.
        self.errors: list[str] = []
        self._waiting: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.errors.append(params["entry"].get("text", ""))
        for fut in self._waiting.pop(method, []):
            if not fut.done():
                fut.set_result(params)

    def expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(method, []).append(fut)
        return fut

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, self.session, **params)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Evaluate ``expression`` until it is truthy and return its value; ``TimeoutError`` otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> bytes:
        """A PNG of the whole page (not just the viewport), written to ``path``."""
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        return data
