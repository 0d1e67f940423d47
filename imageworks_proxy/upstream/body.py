"""Reading an upstream's non-streamed body under a cap, so a runaway upstream cannot grow the proxy without
bound (``CHAT_PROXY_MAX_UPSTREAM_BODY_BYTES``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imageworks_proxy.errors import ProxyError

if TYPE_CHECKING:
    from imageworks_proxy.upstream.client import UpstreamResponse

#: How much of an upstream error body is read: plenty for any error message, never a whole runaway page.
ERROR_BODY_BYTES = 64 * 1024


def too_big(where: str, limit: int) -> ProxyError:
    return ProxyError(
        502,
        "backend_error",
        f"{where} sent a reply over {limit} bytes (CHAT_PROXY_MAX_UPSTREAM_BODY_BYTES).",
    )


async def read_capped(resp: UpstreamResponse, limit: int, where: str) -> bytes:
    """The whole body of ``resp``; :class:`ProxyError` 502 once it is (or announces to be) over ``limit``.

    The caller closes ``resp`` on error (the rest of the body is not read).
    """
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise too_big(where, limit)
    parts: list[bytes] = []
    size = 0
    while data := await resp.content.readany():
        size += len(data)
        if size > limit:
            raise too_big(where, limit)
        parts.append(data)
    return b"".join(parts)


async def read_head(resp: UpstreamResponse, limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most the first ``limit`` bytes of ``resp``'s body (an error body: the rest is not wanted)."""
    parts: list[bytes] = []
    size = 0
    while size < limit and (data := await resp.content.readany()):
        parts.append(data)
        size += len(data)
    return b"".join(parts)[:limit]
