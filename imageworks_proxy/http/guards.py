"""What a web browser may do with the proxy: the ``Host`` allow-list against DNS rebinding, the ``Origin``
check against pages on other sites, and CORS answers for the origins a user allowed (docs/security.md).

Clients that are not browsers (OpenWebUI's server side, the openai SDK, curl, the loader) send no
``Origin`` and a loopback, IP-address or configured ``Host``, so none of this stands in their way.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable

import attrs
from aiohttp import web

from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

#: Names every resolver maps to loopback (``*.localhost`` included, as browsers do), and the names a
#: container calls its host by (OpenWebUI in Docker reaching a proxy on the host); no web page can make
#: any of them resolve to its own server.
LOCAL_NAMES = frozenset({
    "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback",
    "host.docker.internal", "gateway.docker.internal", "host.containers.internal",
})
ALLOW_METHODS = "GET, POST, OPTIONS"
#: What OpenWebUI's browser code sends besides simple headers; preflights asking for more get those too.
ALLOW_HEADERS = "Authorization, Content-Type, Accept, X-Request-Id"
EXPOSE_HEADERS = "X-Request-Id, Retry-After"
PREFLIGHT_MAX_AGE = "600"
#: Distinct ``Host`` values whose verdict the guard remembers.
HOST_VERDICTS = 64
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")


def host_name(value: str) -> str:
    """The name in a ``Host`` header or an origin's authority: lower case, no port, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@attrs.frozen
class HostPolicy:
    """The ``Host`` values the proxy answers: IP addresses (a rebinding page always sends a name),
    loopback and container-host names, this machine's name, the bind name and ``CHAT_PROXY_ALLOWED_HOSTS``."""

    names: frozenset[str]
    suffixes: tuple[str, ...]
    any_host: bool

    @classmethod
    def from_config(cls, config: Config) -> HostPolicy:
        own = socket.gethostname().lower()
        names = set(LOCAL_NAMES) | {own, own.split(".")[0], host_name(config.host)}
        suffixes = [".localhost"]
        for item in config.allowed_hosts:
            if item.startswith("*."):
                suffixes.append(item[1:])
            else:
                names.add(host_name(item))
        return cls(frozenset(names), tuple(suffixes), "*" in config.allowed_hosts)

    def allows(self, host: str | None) -> bool:
        if not host or self.any_host:
            return True  # HTTP/1.0 clients may send no Host; browsers always send one
        name = host_name(host)
        return _is_ip(name) or name in self.names or name.endswith(self.suffixes)


@attrs.frozen
class OriginPolicy:
    """Origins allowed to call the proxy from a browser: ``CHAT_PROXY_ALLOWED_ORIGINS`` (``*`` for any),
    and pages served under the very name and port the request was sent to (same origin)."""

    origins: frozenset[str]
    any_origin: bool

    @classmethod
    def from_config(cls, config: Config) -> OriginPolicy:
        return cls(frozenset(config.allowed_origins), "*" in config.allowed_origins)

    def allows(self, origin: str, host: str | None) -> bool:
        normal = origin.strip().lower().rstrip("/")
        if self.any_origin or normal in self.origins:
            return True
        _scheme, sep, authority = normal.partition("://")
        return bool(sep and host) and authority == host.strip().lower()  # type: ignore[union-attr]


def _shown(value: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", value[:100])


def host_refused(host: str) -> ProxyError:
    return ProxyError(
        403,
        "host_not_allowed",
        f"The proxy does not answer to the host name {_shown(host)!r}. Call it by IP address or localhost, "
        "or add the name to CHAT_PROXY_ALLOWED_HOSTS (names a reverse proxy or Docker network uses).",
    )


def origin_refused(origin: str) -> ProxyError:
    return ProxyError(
        403,
        "origin_not_allowed",
        f"Requests from web pages at {_shown(origin)!r} are not allowed. To call the proxy from a browser, "
        "add the page's origin to CHAT_PROXY_ALLOWED_ORIGINS (e.g. http://localhost:3000).",
    )


def _preflight(request: web.Request) -> web.Response:
    """204 for an allowed origin's preflight; ``cors_headers`` adds the ``Allow-Origin`` part."""
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    headers = {
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": f"{ALLOW_HEADERS}, {asked}" if _HEADER_LIST.match(asked)
        else ALLOW_HEADERS,
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
    }
    # Chrome asks before a page on a LAN address reaches a loopback server (Private Network Access).
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return web.Response(status=204, headers=headers)


def browser_guard(config: Config) -> Middleware:
    """The middleware that refuses unknown ``Host`` names and ``Origin``s and answers CORS preflights
    for allowed origins. Runs before authentication: a preflight carries no key."""
    hosts = HostPolicy.from_config(config)
    origins = OriginPolicy.from_config(config)
    # Host header -> verdict. Clients send the same few values on every request, and parsing one (an IP
    # address check) costs more than the rest of the guard; bounded, so random names cannot grow it.
    verdicts: dict[str | None, bool] = {}

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        host = headers.get("Host")
        allowed = verdicts.get(host)
        if allowed is None:
            allowed = hosts.allows(host)
            if len(verdicts) < HOST_VERDICTS:
                verdicts[host] = allowed
        if not allowed:
            raise host_refused(host or "")
        origin = headers.get("Origin")
        if origin is not None:
            if not origins.allows(origin, host):
                raise origin_refused(origin)
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                return _preflight(request)
        return await handler(request)

    return guard


def cors_headers(config: Config) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``on_response_prepare`` handler: every answer to an allowed origin (streams and errors
    included) carries the CORS headers a browser needs to hand it to the page."""
    origins = OriginPolicy.from_config(config)

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        # The answer depends on Origin once some origins are allowed: say so to caches.
        vary = response.headers.get("Vary")
        if not vary:
            response.headers["Vary"] = "Origin"
        elif "origin" not in vary.lower():
            response.headers["Vary"] = f"{vary}, Origin"
        origin = request.headers.get("Origin")
        if origin is None or not origins.allows(origin, request.headers.get("Host")):
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    return add
