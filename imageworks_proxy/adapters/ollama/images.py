"""Images for Ollama, which takes image bytes (base64) in PNG or JPEG only.

``http(s)`` image URLs are fetched without letting a request reach this machine or its networks
(docs/security.md): only public addresses unless ``CHAT_PROXY_IMAGE_FETCH_ALLOW`` names more. Names are
resolved once and the connection goes to the address that was checked; redirects are followed by hand,
each checked again; the bytes must start like an image; every failure a client could use to probe the
network gets the same message (the details go to the proxy's log). Capped at
``CHAT_PROXY_MAX_IMAGE_BYTES`` (checked on ``Content-Length`` and again while reading) and limited in time.
Images in other formats (GIF, WebP, BMP, TIFF) are converted to PNG in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import attrs
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

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

log = logging.getLogger("imageworks_proxy.images")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_READ_CHUNK = 65536
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Not reachable from the internet, beyond what ``ipaddress`` calls private: shared (carrier NAT, where
#: a cloud's metadata service can live), IETF protocol assignments, benchmarking, reserved, local NAT64.
_NOT_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4", "64:ff9b:1::/48")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@attrs.frozen
class FetchAllow:
    """Hosts (by name) and networks image URLs may point at besides public addresses."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()


def parse_allow_list(items: str | Iterable[str]) -> FetchAllow:
    """``CHAT_PROXY_IMAGE_FETCH_ALLOW`` (comma-separated text, or the parsed setting) as a
    :class:`FetchAllow`."""
    if isinstance(items, str):
        items = items.split(",")
    hosts, networks = set(), []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item.rstrip("."))
    return FetchAllow(frozenset(hosts), tuple(networks))


def _public(addr: IPAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            return _public(embedded)
        if addr.is_site_local:
            return False
    return addr.is_global and not (
        addr.is_multicast or addr.is_private or addr.is_loopback or addr.is_link_local
        or addr.is_reserved or addr.is_unspecified or any(addr in net for net in _NOT_PUBLIC)
    )


def address_allowed(addr: IPAddress, allow: FetchAllow) -> bool:
    """Whether the proxy may connect to ``addr`` to fetch an image: a public address, or one in an allowed
    network. Loopback, private, link-local (cloud metadata), unique-local, multicast and unspecified
    addresses are refused, also when written inside an IPv6 address."""
    return any(addr in net for net in allow.networks) or _public(addr)


class _Refused(OSError):
    """A host that resolves to an address the proxy may not fetch from (an OSError, so aiohttp reports it
    like any other failure to connect)."""


class CheckedResolver(AbstractResolver):
    """Resolves through the system resolver and hands the connector only checked addresses, so the address
    connected to is the one checked (a second DNS answer cannot slip in between)."""

    def __init__(self, allow: FetchAllow) -> None:
        self._allow = allow
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, socket.AF_UNSPEC)
        if host.lower().rstrip(".") in self._allow.hosts:
            return found
        refused = [
            r["host"] for r in found if not address_allowed(ipaddress.ip_address(r["host"]), self._allow)
        ]
        if refused or not found:
            raise _Refused(f"{host} resolves to {', '.join(refused) or 'nothing'}")
        return found

    async def close(self) -> None:
        await self._inner.close()


def _check_literal(url: URL, allow: FetchAllow) -> None:
    """aiohttp connects to an IP-address host without asking the resolver: check it here."""
    host = (url.host or "").strip("[]")
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return
    if not address_allowed(addr, allow):
        raise _Refused(f"address {addr} is not public")


def _short(url: str) -> str:
    # Never echo query strings back: they often carry signatures.
    return url.split("?", 1)[0][:200]


def _unusable(url: str) -> ProxyError:
    # One message for every failure: a client must not learn which local ports answer, or what.
    return ProxyError(
        400,
        "invalid_image",
        f"The image at {_short(url)} could not be used. The proxy fetches http(s) images only from public "
        "addresses, and only when they answer with image bytes; send the image as a data: URL instead, or "
        "let the proxy fetch from local hosts with CHAT_PROXY_IMAGE_FETCH_ALLOW.",
        param="messages",
    )


async def _get(session: aiohttp.ClientSession, url: str, allow: FetchAllow, max_bytes: int) -> bytes:
    target = URL(url)
    for _hop in range(MAX_REDIRECTS + 1):
        if target.scheme not in ("http", "https"):
            raise _Refused(f"redirect to a {target.scheme!r} URL")
        _check_literal(target, allow)
        async with session.get(target, allow_redirects=False) as resp:
            location = resp.headers.get("Location")
            if resp.status in _REDIRECTS and location:
                target = resp.url.join(URL(location))
                continue
            if resp.status != 200:
                raise _Refused(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise _too_large(url, max_bytes)
            data = bytearray()
            async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise _too_large(url, max_bytes)
            return bytes(data)
    raise _Refused(f"more than {MAX_REDIRECTS} redirects")


def _too_large(url: str, max_bytes: int) -> ProxyError:
    return ProxyError(
        413,
        "payload_too_large",
        f"image at {_short(url)} is larger than the limit of {max_bytes} bytes (CHAT_PROXY_MAX_IMAGE_BYTES)",
        param="messages",
    )


async def fetch_image(
    session: aiohttp.ClientSession, url: str, *, max_bytes: int, timeout_s: float, allow: FetchAllow
) -> bytes:
    """The bytes behind an image URL, fetched through ``session`` (whose connector must resolve with a
    :class:`CheckedResolver` for ``allow``).

    Raises :class:`ProxyError`: 413 ``payload_too_large`` over ``max_bytes``; 400 ``invalid_image`` for
    another scheme, and, with one message for all of them, an address not allowed, an error status, a
    network failure, a fetch slower than ``timeout_s`` or bytes that are not an image.
    """
    if not url.startswith(("http://", "https://")):
        raise ProxyError(400, "invalid_image", "only http(s) image URLs can be fetched", param="messages")
    try:
        async with asyncio.timeout(timeout_s):
            data = await _get(session, url, allow, max_bytes)
    except (TimeoutError, aiohttp.ClientError, _Refused, ValueError) as exc:
        log.info("image %s not fetched: %s", _short(url), f"{type(exc).__name__}: {exc}"[:300])
        raise _unusable(url) from None
    if sniff_image_type(data[:16]) is None:
        log.info("image %s not used: %d bytes that do not start like an image", _short(url), len(data))
        raise _unusable(url)
    return data


async def fetch_images_base64(
    urls: Iterable[str], *, max_bytes: int, timeout_s: float, allow: Iterable[str] | FetchAllow = ()
) -> dict[str, str]:
    """Fetch several image URLs concurrently; returns url -> base64 text. The first failure is raised.

    ``allow`` is ``CHAT_PROXY_IMAGE_FETCH_ALLOW``. The fetches use their own short-lived client session:
    its resolver checks every address, and it never goes through an environment proxy.
    """
    urls = list(urls)
    if not urls:
        return {}
    allow = allow if isinstance(allow, FetchAllow) else parse_allow_list(allow)
    connector = aiohttp.TCPConnector(resolver=CheckedResolver(allow), use_dns_cache=False, limit=8)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        tasks = [
            asyncio.ensure_future(
                fetch_image(session, u, max_bytes=max_bytes, timeout_s=timeout_s, allow=allow)
            )
            for u in urls
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
