"""The text forms of setting values: one parser per kind, each raising ``ValueError`` with what was expected
(``config.py`` names the variable and the value around it)."""

from __future__ import annotations

import ipaddress
import re

import orjson


def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 0/1 (or true/false, yes/no, on/off)")


def _int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def _nonneg_int(raw: str) -> int:
    n = _int(raw)
    if n < 0:
        raise ValueError("expected an integer >= 0")
    return n


def _pos_int(raw: str) -> int:
    n = _int(raw)
    if n <= 0:
        raise ValueError("expected an integer > 0")
    return n


def _port(raw: str) -> int:
    try:
        n = int(raw.strip())
    except ValueError:
        raise ValueError("expected a TCP port number (1-65535)") from None
    if not 1 <= n <= 65535:
        raise ValueError("expected a TCP port number (1-65535)")
    return n


def _pos_float(raw: str) -> float:
    try:
        n = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if n <= 0:
        raise ValueError("expected a number > 0")
    return n


def _fraction(raw: str) -> float:
    try:
        n = float(raw.strip())
    except ValueError:
        raise ValueError("expected a fraction between 0 and 1") from None
    if not 0 < n <= 1:
        raise ValueError("expected a fraction between 0 and 1")
    return n


def _sleep_level(raw: str) -> int:
    n = _int(raw)
    if n not in (0, 1, 2):
        raise ValueError("expected 0 (off), 1 or 2")
    return n


def _str(raw: str) -> str:
    return raw


def _opt_str(raw: str) -> str | None:
    return raw.strip() or None


def _opt_pos_int(raw: str) -> int | None:
    return _pos_int(raw) if raw.strip() else None


def _url(raw: str) -> str:
    v = raw.strip().rstrip("/")
    if not v.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return v


def _keys(raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _names(raw: str) -> tuple[str, ...]:
    """Comma-separated host names or origins, lower-cased (they compare without case)."""
    return tuple(k.strip().lower().rstrip("/") for k in raw.split(",") if k.strip())


_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


def _fetch_allow(raw: str) -> tuple[str, ...]:
    """Host names and IP networks (``nas.lan``, ``10.0.0.5``, ``192.168.0.0/16``), checked here so a typo
    stops start-up instead of silently allowing nothing."""
    for item in (items := _names(raw)):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            if not _HOST_NAME.match(item) or item.replace(".", "").isdigit():
                raise ValueError(
                    f"{item!r} is neither an IP address or network (192.168.1.0/24) nor a host name"
                ) from None
    return items


def _autostart_map(raw: str) -> dict[str, tuple[str, ...] | str]:
    """Logical name -> shell command string, argv list, or {"command": [...]}."""
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"expected a JSON object (logical name -> command): {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object (logical name -> command)")
    out: dict[str, tuple[str, ...] | str] = {}
    for name, cmd in data.items():
        if isinstance(cmd, dict):
            cmd = cmd.get("command")
        if isinstance(cmd, str) and cmd.strip():
            out[name] = cmd
        elif isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd):
            out[name] = tuple(cmd)
        else:
            raise ValueError(
                f'entry {name!r}: expected a command string, an argv list or {{"command": [...]}}'
            )
    return out
