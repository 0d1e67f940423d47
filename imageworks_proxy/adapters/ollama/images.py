"""Images for Ollama, which takes image bytes (base64) in PNG or JPEG only.

``http(s)`` URLs are fetched through the app's shared client session, only over http(s), capped at
``CHAT_PROXY_MAX_IMAGE_BYTES`` (checked on ``Content-Length`` and again while reading) and limited in time.
Images in other formats (GIF, WebP, BMP, TIFF) are converted to PNG in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from imageworks_proxy.errors import ProxyError
from imageworks_proxy.wire.content import (
    DataUrl,
    base64_head,
    image_parts,
    image_url_of,
    parse_data_url,
    sniff_image_type,
)
from imageworks_proxy.wire.imaging import to_png

#: What Ollama decodes itself; other image types are converted to PNG first.
OLLAMA_IMAGE_TYPES = frozenset({"image/png", "image/jpeg"})

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


def _convert_all(payloads: dict[str, str]) -> dict[str, str]:
    """url -> PNG base64 for each base64 payload (blocking: runs in a worker thread)."""
    return {
        url: base64.b64encode(to_png(DataUrl("image/*", payload).decode())).decode("ascii")
        for url, payload in payloads.items()
    }


async def png_where_needed(body: Mapping[str, Any], fetched: Mapping[str, str]) -> dict[str, str]:
    """url -> PNG base64 for the request's images (inline, or fetched: ``fetched`` maps url -> base64)
    that are GIF, WebP, BMP or TIFF; PNG, JPEG and what no signature identifies are left to Ollama.
    Raises :class:`ProxyError` 400 ``invalid_image`` / 413 ``payload_too_large`` as the conversion does."""
    todo: dict[str, str] = {}
    for _msg, _i, part in image_parts(body.get("messages")):
        url = image_url_of(part)
        if not url or url in todo:
            continue
        data = parse_data_url(url)
        payload = data.payload if data is not None else fetched.get(url)
        if payload is None:
            continue
        kind = sniff_image_type(base64_head(payload))
        if kind is not None and kind not in OLLAMA_IMAGE_TYPES:
            todo[url] = payload
    if not todo:
        return {}
    return await asyncio.to_thread(_convert_all, todo)
