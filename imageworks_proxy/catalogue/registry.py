"""The ImageWorks model registry: parsing, layered merge and hot reload (SPEC §3).

The proxy only ever reads the registry. :func:`load_registry` is a pure function of the files on disk;
:class:`RegistryStore` keeps the last good snapshot and reloads it off the event loop when files change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson

log = logging.getLogger("imageworks_proxy.catalogue.registry")

CURATED = "model_registry.curated.json"
DISCOVERED = "model_registry.discovered.json"
SINGLE = "model_registry.json"

_CAPABILITY_SYNONYMS = {
    "multimodal": "vision",
    "image": "vision",
    "images": "vision",
    "vl": "vision",
    "thinking": "reasoning",
    "function_calling": "tools",
    "tool_use": "tools",
    "tool_calling": "tools",
    "embeddings": "embedding",
}


class RegistryError(ValueError):
    """The registry cannot be used as it is on disk (bad JSON, wrong shape, duplicate names)."""


def _absent(value: Any) -> bool:
    return value is None or value == "" or value == "None"


def _opt_str(value: Any) -> str | None:
    return None if _absent(value) else str(value)


@attrs.frozen
class BackendConfig:
    host: str | None = None
    port: int | None = None
    base_url: str | None = None
    model_path: str | None = None
    extra_args: tuple[str, ...] = ()
    adapter: str | None = None
    api_key_env: str | None = None


@attrs.frozen
class Entry:
    """One registry entry, with the fields the proxy uses; ``raw`` keeps the whole object."""

    name: str
    backend: str
    display_name: str | None = None
    backend_config: BackendConfig = BackendConfig()
    served_model_id: str | None = None
    download_path: str | None = None
    download_format: str | None = None
    download_size_bytes: int | None = None
    quantization: str | None = None
    family: str | None = None
    capabilities: frozenset[str] = frozenset()
    chat_template_path: str | None = None
    generation_defaults: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    deprecated: bool = False
    metadata: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def vision(self) -> bool:
        return "vision" in self.capabilities

    @property
    def testing(self) -> bool:
        return bool(self.metadata.get("testing"))

    @property
    def ollama_tag(self) -> str | None:
        """The Ollama tag: the served id, else the ``ollama:/<tag>`` model path."""
        if self.served_model_id:
            return self.served_model_id
        path = self.backend_config.model_path or ""
        for prefix in ("ollama:/", "ollama://", "ollama:"):
            if path.startswith(prefix):
                return path[len(prefix):].lstrip("/") or None
        return path or None

    @property
    def upstream_model(self) -> str:
        """The model name sent upstream: the served id, else the model path, else the logical name."""
        if self.backend == "ollama":
            return self.ollama_tag or self.name
        return self.served_model_id or self.backend_config.model_path or self.name


def _capabilities(raw: Any, probes: Any) -> frozenset[str]:
    caps: set[str] = set()
    if isinstance(raw, Mapping):
        names: Iterable[str] = (str(k) for k, v in raw.items() if v)
    elif isinstance(raw, (list, tuple)):
        names = (str(v) for v in raw)
    elif isinstance(raw, str):
        names = (raw,)
    else:
        names = ()
    for name in names:
        key = name.strip().lower()
        caps.add(_CAPABILITY_SYNONYMS.get(key, key))
    vision_probe = probes.get("vision") if isinstance(probes, Mapping) else None
    if isinstance(vision_probe, Mapping) and vision_probe.get("vision_ok") is not None:
        if vision_probe["vision_ok"]:
            caps.add("vision")
        else:
            caps.discard("vision")
    return frozenset(caps)


def _extra_args(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return tuple(shlex.split(raw))
    if isinstance(raw, (list, tuple)):
        return tuple(str(a) for a in raw)
    raise RegistryError(f"{where}: backend_config.extra_args must be a list or a string")


def _int_or_none(raw: Any, field: str, where: str) -> int | None:
    if _absent(raw):
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise RegistryError(f"{where}: {field} must be an integer, got {raw!r}") from None


def parse_entry(obj: Any, where: str = "registry") -> Entry:
    """Turn one registry object into an :class:`Entry`; unknown fields are kept in ``raw`` only."""
    if not isinstance(obj, Mapping):
        raise RegistryError(f"{where}: each entry must be a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"{where}: entry without a \"name\"")
    where = f"{where}: entry {name!r}"
    backend = obj.get("backend")
    if not isinstance(backend, str) or not backend.strip():
        raise RegistryError(f"{where}: missing \"backend\"")
    bc = obj.get("backend_config") or {}
    if not isinstance(bc, Mapping):
        raise RegistryError(f"{where}: backend_config must be an object")
    template = obj.get("chat_template")
    template_path = template.get("path") if isinstance(template, Mapping) else None
    gen = obj.get("generation_defaults") or {}
    metadata = obj.get("metadata") or {}
    return Entry(
        name=name,
        backend=backend.strip().lower(),
        display_name=_opt_str(obj.get("display_name")),
        backend_config=BackendConfig(
            host=_opt_str(bc.get("host")),
            port=_int_or_none(bc.get("port"), "backend_config.port", where),
            base_url=_opt_str(bc.get("base_url")),
            model_path=_opt_str(bc.get("model_path")),
            extra_args=_extra_args(bc.get("extra_args"), where),
            adapter=_opt_str(bc.get("adapter")),
            api_key_env=_opt_str(bc.get("api_key_env")),
        ),
        served_model_id=_opt_str(obj.get("served_model_id")),
        download_path=_opt_str(obj.get("download_path")),
        download_format=_opt_str(obj.get("download_format")),
        download_size_bytes=_int_or_none(obj.get("download_size_bytes"), "download_size_bytes", where),
        quantization=_opt_str(obj.get("quantization")),
        family=_opt_str(obj.get("family")),
        capabilities=_capabilities(obj.get("capabilities"), obj.get("probes")),
        chat_template_path=_opt_str(template_path),
        generation_defaults=dict(gen) if isinstance(gen, Mapping) else {},
        deprecated=bool(obj.get("deprecated")),
        metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
        raw=dict(obj),
    )


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Curated-over-discovered merge: nested objects merge, other values from ``over`` replace; ``None`` never erases."""
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
    entries: tuple[Entry, ...]
    source: str
    loaded_at: float

    @property
    def by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}


def load_registry(location: str | os.PathLike[str]) -> Registry:
    """Read the registry at ``location`` (a JSON file, or a directory of ImageWorks layer files)."""
    path = Path(location)
    if not path.exists():
        raise RegistryError(f"{path}: registry not found (set CHAT_PROXY_REGISTRY to a file or directory)")
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
        items: list[Any] = list(merged.values())
    else:
        items = _read_list(files[0])
        _by_name(items, files[0])  # duplicate check with both positions named
    entries = tuple(parse_entry(obj, str(path)) for obj in items)
    return Registry(entries=entries, source=str(path), loaded_at=time.time())


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
    successful reload.
    """

    def __init__(self, location: str, poll_s: float = 1.0) -> None:
        self.location = location
        self.poll_s = poll_s
        self.registry: Registry = Registry((), location, 0.0)
        self.error: str | None = None
        self.on_change: list[Any] = []
        self._signature: Signature = ()

    def _load_sync(self) -> tuple[Registry, Signature]:
        sig = _signature(registry_files(self.location))
        return load_registry(self.location), sig

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
