"""The ImageWorks model registry: files, layered merge, load errors and warnings, hot reload.

The proxy only ever reads the registry. :func:`load_registry` is a pure function of the files on disk;
:class:`RegistryStore` keeps the last good snapshot and reloads it off the event loop when files change.
Entries are built by the converter in ``catalogue/entry.py``; unknown keys are named by
``catalogue/registry_keys.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson
from cattrs import Converter
from cattrs.errors import ClassValidationError

from imageworks_proxy.catalogue.entry import (
    BackendConfig,
    Entry,
    InvalidValue,
    describe,
    make_registry_converter,
)
from imageworks_proxy.catalogue.registry_keys import entry_warnings, known_keys
from imageworks_proxy.catalogue.vllm_parsers import parser_warnings

__all__ = [
    "BackendConfig",
    "Entry",
    "Registry",
    "RegistryError",
    "RegistryStore",
    "deep_merge",
    "load_registry",
    "make_registry_converter",
    "parse_entry",
    "registry_files",
]

log = logging.getLogger("imageworks_proxy.catalogue.registry")

CURATED = "model_registry.curated.json"
DISCOVERED = "model_registry.discovered.json"
SINGLE = "model_registry.json"


class RegistryError(ValueError):
    """The registry cannot be used as it is on disk (bad JSON, wrong shape, bad values, duplicate names)."""


#: At most this many bad entries are named in one error; the rest are counted.
_MAX_PROBLEMS = 5


def _structure(converter: Converter, obj: Any) -> Entry:
    """One entry; raises ``RegistryError("entry 'x': field.path: what is wrong")`` without the file."""
    if not isinstance(obj, Mapping):
        raise RegistryError("each entry must be a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RegistryError('entry without a "name"')
    try:
        return converter.structure(obj, Entry)
    except (ClassValidationError, InvalidValue) as exc:
        raise RegistryError(f"entry {name!r}: " + "; ".join(describe(exc))) from None


def parse_entry(obj: Any, where: str = "registry", converter: Converter | None = None) -> Entry:
    """Turn one registry object into an :class:`Entry`; unknown fields are kept in ``raw`` only.

    ``converter`` is :func:`make_registry_converter`'s (built here when ``None``). Raises
    :class:`RegistryError` naming ``where``, the entry and the field path of each bad value.
    """
    try:
        return _structure(converter or make_registry_converter(), obj)
    except RegistryError as exc:
        raise RegistryError(f"{where}: {exc}") from None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Curated-over-discovered merge: nested objects merge, other values from ``over`` replace.

    ``None`` in ``over`` never erases.
    """
    out = dict(base)
    for key, value in over.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_list(path: Path) -> list[Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise RegistryError(f"{path}: invalid JSON: {exc}") from None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if isinstance(data, Mapping) and isinstance(data.get("models"), list):
        data = data["models"]
    if not isinstance(data, list):
        raise RegistryError(f"{path}: expected a JSON list of entries")
    return data


def registry_files(location: str | os.PathLike[str]) -> list[Path]:
    """The files that make up the registry at ``location`` (what the reloader watches)."""
    path = Path(location)
    if not path.is_dir():
        return [path]
    layered = [path / DISCOVERED, path / CURATED]
    present = [p for p in layered if p.exists()]
    return present if present else [path / SINGLE]


def _by_name(items: list[Any], path: Path) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for i, obj in enumerate(items):
        if not isinstance(obj, Mapping) or not isinstance(obj.get("name"), str):
            raise RegistryError(f'{path}: item {i} is not an entry object with a "name"')
        if obj["name"] in out:
            raise RegistryError(
                f"{path}: duplicate name {obj['name']!r} (items {list(out).index(obj['name'])} and {i})"
            )
        out[obj["name"]] = obj
    return out


@attrs.frozen
class Registry:
    """One loaded registry. ``warnings``: named mistakes that did not stop the load (unknown keys)."""

    entries: tuple[Entry, ...]
    source: str
    loaded_at: float
    warnings: tuple[str, ...] = ()

    @property
    def by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}


def _raw_items(path: Path) -> list[Any]:
    """The entry objects at ``path``, layers merged, duplicates refused; not yet structured."""
    files = registry_files(path)
    if path.is_dir() and files[0].name != SINGLE:
        merged: dict[str, Mapping[str, Any]] = {}
        discovered = path / DISCOVERED
        curated = path / CURATED
        if discovered.exists():
            merged.update(_by_name(_read_list(discovered), discovered))
        if curated.exists():
            for name, obj in _by_name(_read_list(curated), curated).items():
                merged[name] = deep_merge(merged[name], obj) if name in merged else dict(obj)
        return list(merged.values())
    items = _read_list(files[0])
    _by_name(items, files[0])  # duplicate check with both positions named
    return items


def load_registry(location: str | os.PathLike[str], converter: Converter | None = None) -> Registry:
    """Read the registry at ``location`` (a JSON file, or a directory of ImageWorks layer files).

    ``converter`` is :func:`make_registry_converter`'s, built here when ``None``. Raises
    :class:`RegistryError` naming the file, and for bad values every entry and field path at fault.
    """
    path = Path(location)
    if not path.exists():
        raise RegistryError(f"{path}: registry not found (set CHAT_PROXY_REGISTRY to a file or directory)")
    items = _raw_items(path)
    converter = converter or make_registry_converter()
    entries: list[Entry] = []
    problems: list[str] = []
    for obj in items:
        try:
            entries.append(_structure(converter, obj))
        except RegistryError as exc:
            problems.append(str(exc))
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        text = "; ".join(problems[:_MAX_PROBLEMS]) + (f"; and {more} more entries" if more > 0 else "")
        raise RegistryError(f"{path}: {text}")
    known = known_keys()
    warnings = tuple(w for obj in items for w in entry_warnings(obj, known))
    warnings += tuple(w for entry in entries for w in parser_warnings(entry))
    return Registry(entries=tuple(entries), source=str(path), loaded_at=time.time(), warnings=warnings)


Signature = tuple[tuple[str, int, int, int], ...]


def _signature(files: list[Path]) -> Signature:
    # The inode catches a same-size file renamed into place within one mtime tick (atomic saves).
    sig = []
    for f in files:
        try:
            st = f.stat()
            sig.append((str(f), st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((str(f), -1, -1, -1))
    return tuple(sig)


class RegistryStore:
    """The live registry: last good snapshot, last error, and a background reloader.

    ``on_change`` callbacks run on the event loop with the new :class:`Registry` after each
    successful reload. Each load logs the registry's warnings once, at WARNING. ``converter`` is
    :func:`make_registry_converter`'s, built here when ``None``.
    """

    def __init__(self, location: str, poll_s: float = 1.0, converter: Converter | None = None) -> None:
        self.location = location
        self.poll_s = poll_s
        self.converter = converter or make_registry_converter()
        self.registry: Registry = Registry((), location, 0.0)
        self.error: str | None = None
        self.on_change: list[Any] = []
        self._signature: Signature = ()

    def _load_sync(self) -> tuple[Registry, Signature]:
        sig = _signature(registry_files(self.location))
        registry = load_registry(self.location, self.converter)
        for warning in registry.warnings:
            log.warning("registry %s: %s", registry.source, warning)
        return registry, sig

    def load_initial(self) -> None:
        """Load at startup; a broken registry is reported, not fatal (the list is then empty)."""
        try:
            self.registry, self._signature = self._load_sync()
            self.error = None
        except RegistryError as exc:
            self.error = str(exc)
            self._signature = _signature(registry_files(self.location))
            log.error("registry: %s", exc)
        for cb in self.on_change:
            cb(self.registry)

    async def reload_if_changed(self) -> bool:
        """Reload when the files' mtime/size changed; returns True when a new snapshot was installed."""
        sig = await asyncio.to_thread(lambda: _signature(registry_files(self.location)))
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            registry, sig2 = await asyncio.to_thread(self._load_sync)
        except RegistryError as exc:
            if self.error != str(exc):
                log.error("registry reload failed, keeping the last good registry: %s", exc)
            self.error = str(exc)
            return False
        self._signature = sig2
        self.registry, self.error = registry, None
        log.info("registry reloaded: %d entries from %s", len(registry.entries), registry.source)
        for cb in self.on_change:
            cb(registry)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.reload_if_changed()
            except Exception:  # never let the watcher die
                log.exception("registry watcher error")
