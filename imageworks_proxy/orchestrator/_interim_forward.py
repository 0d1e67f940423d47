"""Stand-in for ``OpenAIPassthroughAdapter.forward`` until the shared implementation lands on main.
Deleted on merge."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from imageworks_proxy.errors import ProxyError, backend_unavailable


async def forward(adapter, call, base_url):
    timeout = aiohttp.ClientTimeout(total=adapter.config.backend_timeout_ms / 1000)
    try:
        resp = await adapter.http.post(f"{base_url}/chat/completions", json=call.body, timeout=timeout)
    except aiohttp.ClientConnectorError as exc:
        raise backend_unavailable(f"vLLM unreachable: {exc}") from None
    except asyncio.TimeoutError:
        raise ProxyError(504, "backend_timeout", "vLLM timed out") from None
    if resp.status >= 400:
        data = await resp.read()
        resp.release()
        try:
            err = orjson.loads(data).get("error") or {}
        except Exception:
            err = {}
        status = resp.status if resp.status < 500 else 502
        raise ProxyError(status, str(err.get("code") or "backend_error"), str(err.get("message") or data[:200]))
    if not call.stream:
        try:
            return await resp.json(content_type=None)
        finally:
            resp.release()

    async def chunks():
        try:
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                obj = orjson.loads(data)
                if "error" in obj:
                    raise ProxyError(502, "backend_error", str(obj["error"].get("message")))
                yield obj
            raise ProxyError(502, "backend_error", "vLLM closed the stream early")
        except aiohttp.ClientError as exc:
            raise ProxyError(502, "backend_error", f"vLLM stream broke: {exc}") from None
        finally:
            resp.close()

    return chunks()
