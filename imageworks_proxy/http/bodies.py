"""Reading a request body: the size cap, and gzip/deflate bodies decoded here rather than by aiohttp's
HTTP parser.

The app turns the parser's own decoding off (``auto_decompress=False`` in ``create_app``): when the parser
decodes, a corrupt gzip body breaks the parser state of the connection, and the next request a keep-alive
client sends on it is lost. Decoded here, a bad body is that request's 400 and nothing else.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from imageworks_proxy.errors import ProxyError, invalid_request

#: Content-Encoding -> zlib ``wbits`` (deflate is zlib-wrapped; raw deflate is detected below).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: Compressed bodies above this are inflated in a worker thread, off the event loop.
_INLINE_BYTES = 1024 * 1024


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, "payload_too_large", f"The request body is over {limit} bytes (CHAT_PROXY_MAX_BODY_BYTES)."
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, gzip or deflate bodies inflated, never more than ``limit`` bytes either way.

    Raises :class:`ProxyError` 413 ``payload_too_large`` over ``limit``, 415
    ``unsupported_content_encoding`` for other encodings, 400 ``invalid_request`` for a body that cannot be
    read or inflated; ``ConnectionError`` when the client left while sending it.
    """
    try:
        raw = await request.read()  # the app's client_max_size caps what arrives on the wire
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except web.RequestPayloadError as exc:
        detail = getattr(exc, "message", "") or "bad framing"
        raise invalid_request(f"The request body could not be read: {detail}.") from None
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    decoded = getattr(request.content, "total_compressed_bytes", None) is not None
    if not raw or not encoding or encoding == "identity" or decoded:
        return raw  # nothing to decode, or a parent app's server already decoded it
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise ProxyError(
            415,
            "unsupported_content_encoding",
            f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed, gzip or "
            "deflate.",
        )
    if encoding == "deflate" and raw and raw[0] & 0x0F != 8:
        wbits = -zlib.MAX_WBITS  # raw deflate without the zlib header, as some clients send it
    if len(raw) > _INLINE_BYTES:
        return await asyncio.to_thread(_inflate, raw, wbits, limit, encoding)
    return _inflate(raw, wbits, limit, encoding)


def _inflate(raw: bytes, wbits: int, limit: int, encoding: str) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error:
        raise invalid_request(f"The request body is not valid {encoding} data.") from None
    if len(out) > limit:
        raise too_large(limit)
    if not inflater.eof or inflater.unused_data:
        raise invalid_request(f"The request body is cut short or has bytes after its {encoding} data.")
    return out
