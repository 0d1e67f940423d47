"""Where an entry's upstream lives: base URLs and the loopback alias."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from imageworks_proxy.catalogue.registry import Entry

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


def apply_loopback_alias(url: str, alias: str | None) -> str:
    """Replace a loopback host in ``url`` by ``alias`` (port and path kept); other hosts are untouched."""
    if not alias:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in _LOOPBACK:
        return url
    netloc = alias
    if parts.port:
        netloc = f"{alias}:{parts.port}"
    if parts.username:
        cred = parts.username + (f":{parts.password}" if parts.password else "")
        netloc = f"{cred}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def entry_base_url(
    entry: Entry, *, default_port: int | None, default_url: str | None, path: str = ""
) -> str | None:
    """The entry's upstream root: ``base_url`` wins; ``host`` may be a full URL; else host:port + ``path``.

    Returns ``default_url`` when the entry names no location, or ``None`` when there is no default either.
    """
    bc = entry.backend_config
    if bc.base_url:
        return bc.base_url.rstrip("/")
    host = bc.host
    if host and host.startswith(("http://", "https://")):
        base = host.rstrip("/")
        parts = urlsplit(base)
        if bc.port and not parts.port:
            base = urlunsplit((parts.scheme, f"{parts.hostname}:{bc.port}", parts.path, "", ""))
        return base if urlsplit(base).path not in ("", "/") else base + path
    if host or bc.port:
        h = host or "127.0.0.1"
        if ":" in h and not h.startswith("["):
            h = f"[{h}]"
        port = bc.port or default_port
        return f"http://{h}:{port}{path}" if port else f"http://{h}{path}"
    return default_url
