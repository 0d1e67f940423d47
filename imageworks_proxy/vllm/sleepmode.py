"""vLLM's sleep API, as the orchestrator calls it (docs/vllm.md, "Sleep mode").

A server started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` answers ``POST
/sleep?level=N`` (level 1 moves the weights to CPU memory and drops the KV cache, level 2 drops the weights
too), ``POST /wake_up`` and ``GET /is_sleeping`` → ``{"is_sleeping": bool}``; after level 2 the weights are
reloaded with ``POST /collective_rpc {"method": "reload_weights"}`` and the prefix cache reset with ``POST
/reset_prefix_cache``. Every call here raises :class:`SleepFailed` saying what went wrong; the caller falls
back to stopping the process (and a cold start).
"""

from __future__ import annotations

import aiohttp
import orjson


class SleepFailed(Exception):
    """A sleep or wake-up did not happen; the message says which call failed and how."""


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, timeout: float, json: object = None
) -> bytes:
    try:
        async with session.request(
            method, url, json=json, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                text = body[:300].decode(errors="replace").strip()
                raise SleepFailed(f"{method} {url} answered {resp.status}: {text or resp.reason}")
            return body
    except TimeoutError:
        raise SleepFailed(f"{method} {url} did not answer within {timeout:g}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise SleepFailed(f"{method} {url} failed: {type(exc).__name__}: {exc}") from None


async def is_sleeping(session: aiohttp.ClientSession, root_url: str, timeout: float = 5.0) -> bool:
    """What ``GET /is_sleeping`` says; raises :class:`SleepFailed` when it says nothing usable."""
    body = await _call(session, "GET", root_url + "/is_sleeping", timeout)
    try:
        value = orjson.loads(body).get("is_sleeping")
    except (orjson.JSONDecodeError, AttributeError):
        value = None
    if not isinstance(value, bool):
        raise SleepFailed(f"GET {root_url}/is_sleeping answered {body[:200]!r}")
    return value


async def put_to_sleep(session: aiohttp.ClientSession, root_url: str, level: int, timeout: float) -> None:
    """``POST /sleep?level=N``, confirmed by ``GET /is_sleeping``."""
    await _call(session, "POST", f"{root_url}/sleep?level={level}", timeout)
    if not await is_sleeping(session, root_url):
        raise SleepFailed(f"POST {root_url}/sleep?level={level} answered 200 but /is_sleeping says false")


async def wake_up(session: aiohttp.ClientSession, root_url: str, level: int, timeout: float) -> None:
    """``POST /wake_up`` (and after level 2 the weight reload and prefix-cache reset), confirmed by
    ``GET /is_sleeping``."""
    await _call(session, "POST", root_url + "/wake_up", timeout)
    if level == 2:
        await _call(session, "POST", root_url + "/collective_rpc", timeout, {"method": "reload_weights"})
        await _call(session, "POST", root_url + "/reset_prefix_cache", timeout)
    if await is_sleeping(session, root_url):
        raise SleepFailed(f"POST {root_url}/wake_up answered 200 but /is_sleeping still says true")
