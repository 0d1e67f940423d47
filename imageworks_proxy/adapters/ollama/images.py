"""Fetching ``http(s)`` image URLs for backends that only take image bytes.

Fetches go through the app's shared client session, only over http(s), capped at
``CHAT_PROXY_MAX_IMAGE_BYTES`` (checked on ``Content-Length`` and again while reading) and limited in time.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable

import aiohttp

from imageworks_proxy.errors import ProxyError

_READ_CHUNK = 65536


def _short(url: str) -> str:
    # Never echo query strings back: they often carry signatures.
    return url.split("?", 1)[0][:200]


async def fetch_image(session: aiohttp.ClientSession, url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """The bytes behind an image URL.

    Raises :class:`ProxyError`: 413 ``payload_too_large`` over ``max_bytes``; 400 ``invalid_image`` for
    another scheme, an error status, a network failure or a fetch slower than ``timeout_s``.
    """
    if not url.startswith(("http://", "https://")):
        raise ProxyError(400, "invalid_image", "only http(s) image URLs can be fetched", param="messages")
    too_large = ProxyError(
        413,
        "payload_too_large",
        f"image at {_short(url)} is larger than the limit of {max_bytes} bytes (CHAT_PROXY_MAX_IMAGE_BYTES)",
        param="messages",
    )
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, allow_redirects=True) as resp:
                if resp.status != 200:
                    raise ProxyError(
                        400,
                        "invalid_image",
                        f"fetching image {_short(url)} failed: HTTP {resp.status}",
                        param="messages",
                    )
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise too_large
                data = bytearray()
                async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                    data += chunk
                    if len(data) > max_bytes:
                        raise too_large
    except TimeoutError:
        raise ProxyError(
            400,
            "invalid_image",
            f"fetching image {_short(url)} took longer than {timeout_s:g} s",
            param="messages",
        ) from None
    except aiohttp.ClientError as exc:
        raise ProxyError(
            400,
            "invalid_image",
            f"fetching image {_short(url)} failed: {type(exc).__name__}: {exc}",
            param="messages",
        ) from None
    if not data:
        raise ProxyError(400, "invalid_image", f"image at {_short(url)} is empty", param="messages")
    return bytes(data)


async def fetch_images_base64(
    session: aiohttp.ClientSession, urls: Iterable[str], *, max_bytes: int, timeout_s: float
) -> dict[str, str]:
    """Fetch several image URLs concurrently; returns url -> base64 text. The first failure is raised."""
    urls = list(urls)
    if not urls:
        return {}
    tasks = [
        asyncio.ensure_future(fetch_image(session, u, max_bytes=max_bytes, timeout_s=timeout_s)) for u in urls
    ]
    try:
        blobs = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {u: base64.b64encode(b).decode("ascii") for u, b in zip(urls, blobs, strict=True)}
