"""The optional TOML settings file (``CHAT_PROXY_CONFIG_FILE``, ``--config``): our own layout and the
sectioned ``configs/chat_proxy.toml`` that ImageWorks writes (the mapping: docs/configuration.md).

Our own layout holds setting names (lower case, no prefix) at the top level and/or in a ``[chat_proxy]``
table; an unknown name there is an error, so a typo never goes unnoticed. ImageWorks' file groups the same
names into sections (``[server]``, ``[vllm]``, …); a name we do not support there is named in a warning and
ignored, so a file ImageWorks wrote always loads. ``""`` means unset, as in the environment.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Collection, Mapping
from typing import Any

import attrs

#: The sections of ImageWorks' ``configs/chat_proxy.toml``; their keys are our setting names, except for
#: the renames below. ``misc`` is where ImageWorks puts settings it has no section for.
IMAGEWORKS_SECTIONS = (
    "general",
    "server",
    "timeouts",
    "autostart",
    "limits",
    "vision_preprocess",
    "vision_history",
    "reasoning_history",
    "vllm",
    "ollama",
    "misc",
)

#: ImageWorks key -> our setting name.
IMAGEWORKS_RENAMES: Mapping[str, str] = {
    "autostart_map_raw": "autostart_map",
    "auto_downscale_images": "vision_downscale",
    "max_image_pixels": "vision_target_long_edge",
}

#: ImageWorks settings this proxy does not have, and why that is fine.
IMAGEWORKS_UNSUPPORTED: Mapping[str, str] = {
    "image_jpeg_quality": "a downscaled JPEG is saved at quality 85",
    "reasoning_truncate_history": "earlier turns are trimmed only for image requests",
    "reasoning_keep_system": "earlier turns are trimmed only for image requests",
    "reasoning_keep_last_n_turns": "earlier turns are trimmed only for image requests",
}


class FileError(ValueError):
    """The file cannot be used; the message is one line (the caller adds the variable and the path)."""


@attrs.frozen
class FileSettings:
    """What a settings file holds: ``values`` (setting name -> TOML value), where each came from
    (``"[server] port"``, ``"port"``), and warnings naming the keys that were ignored."""

    values: Mapping[str, Any]
    places: Mapping[str, str]
    warnings: tuple[str, ...] = ()


def did_you_mean(word: str, candidates: Collection[str]) -> str:
    """`` (did you mean 'x'?)`` when one candidate is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_settings_file(path: str, known: Collection[str]) -> FileSettings:
    """Read the settings file at ``path``; ``known`` are the setting names. Raises :class:`FileError`
    (not found, not TOML, an unknown name in our own layout, one setting given twice)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise FileError("file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FileError(f"cannot read TOML: {exc}") from None
    values: dict[str, Any] = {}
    places: dict[str, str] = {}
    warnings: list[str] = []
    unknown: list[str] = []

    def put(name: str, value: Any, place: str) -> None:
        if name in places:
            raise FileError(f"{name} is set twice, as {places[name]} and as {place}")
        if value != "":  # ImageWorks writes "" for unset values
            values[name] = value
        places[name] = place

    own = {k: v for k, v in data.items() if not (isinstance(v, dict) and k.lower() != "autostart_map")}
    table = data.get("chat_proxy")
    for scope, items in (("", own), ("[chat_proxy] ", table if isinstance(table, dict) else {})):
        for key, value in items.items():
            name = str(key).lower().removeprefix("chat_proxy_")
            if name in known:
                put(name, value, f"{scope}{key}")
            else:
                unknown.append(f"{scope}{key}{did_you_mean(name, known)}")
    if unknown:
        raise FileError(f"unknown setting(s) {', '.join(unknown)}")
    for section, items in data.items():
        if section == "chat_proxy" or not isinstance(items, dict) or section.lower() == "autostart_map":
            continue
        if section not in IMAGEWORKS_SECTIONS:
            warnings.append(f"section [{section}] is not one this proxy reads; ignored")
            continue
        for key, value in items.items():
            name = IMAGEWORKS_RENAMES.get(key, key)
            if name in known:
                put(name, value, f"[{section}] {key}")
            elif key in IMAGEWORKS_UNSUPPORTED:
                warnings.append(f"[{section}] {key} is not supported by imageworks-proxy ("
                                f"{IMAGEWORKS_UNSUPPORTED[key]}); ignored")
            else:
                warnings.append(f"[{section}] {key} is not a setting{did_you_mean(name, known)}; ignored")
    return FileSettings(values, places, tuple(warnings))
