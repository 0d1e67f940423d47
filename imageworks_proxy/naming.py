"""Public model ids and request-model resolution (SPEC §4)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from imageworks_proxy.errors import model_not_found
from imageworks_proxy.registry import Entry

_FORMAT_WORDS = frozenset(
    "gguf safetensors awq gptq fp8 fp16 bf16 f16 f32 fp32 int4 int8 nf4 mxfp4 exl2".split()
)
_QUANT_TOKEN = re.compile(r"^(?:i?q\d+(?:_[a-z0-9]+)*|w\d+a\d+)$")
_SIZE_TOKEN = re.compile(r"^\d+(?:\.\d+)?[bm]$")
_NORMALISE = re.compile(r"[^a-z0-9]")


def quant_label(quantization: str | None) -> str | None:
    if not quantization or quantization.strip().lower() in ("", "unknown", "none"):
        return None
    return re.sub(r"[_\-]+", " ", quantization.strip()).upper()


def _family_source(entry: Entry) -> str:
    if entry.backend == "ollama":
        return entry.metadata.get("ollama_family") or entry.family or entry.name
    if entry.family:
        return entry.family
    path = entry.backend_config.model_path or entry.download_path
    if path:
        last = path.rstrip("/").rsplit("/", 1)[-1]
        if last:
            return last
    return entry.name


def _clean_family(text: str) -> str:
    text = text.lower()
    text = re.sub(r"[_/@:\s]+", "-", text)
    kept = [t for t in text.split("-") if t and t not in _FORMAT_WORDS and not _QUANT_TOKEN.match(t)]
    return re.sub(r"-{2,}", "-", "-".join(kept)).strip("-")


def simplified_name(entry: Entry) -> str:
    """The entry's public id: ``display_name`` when set, else the ImageWorks CLI's simplified name."""
    if entry.display_name:
        return entry.display_name
    family = _clean_family(str(_family_source(entry))) or entry.name.lower()
    tokens = family.split("-")
    size: str | None = None
    if entry.backend == "ollama":
        ps = entry.metadata.get("ollama_parameter_size")
        size = str(ps).strip().lower() if ps else None
    else:
        found = [t for t in tokens if _SIZE_TOKEN.match(t)]
        size = found[0] if found else None
    if size is None and len(tokens) > 1 and _SIZE_TOKEN.match(tokens[-1]):
        size = tokens[-1]
        family = "-".join(tokens[:-1])
        tokens = tokens[:-1]
    name = family
    if size and size not in tokens:
        name = f"{family} {size}"
    label = quant_label(entry.quantization)
    if label and not name.upper().endswith(label):
        name = f"{name} ({label})"
    return name


def normalise(text: str) -> str:
    return _NORMALISE.sub("", text.lower())


@attrs.frozen
class Listed:
    """One model as ``/v1/models`` shows it."""

    id: str
    entry: Entry


@attrs.frozen
class Catalogue:
    """Ids for every entry and the lookup tables that resolve a request's ``model``.

    Built once per registry snapshot (never on the request path).
    """

    listed: tuple[Listed, ...]
    ids: dict[str, Entry]
    by_name: dict[str, Entry]
    normalised: dict[str, tuple[Entry, ...]]

    def resolve(self, requested: str) -> Entry:
        """Exact logical name, exact id, then a normalised match; ambiguity and misses are 404s."""
        entry = self.by_name.get(requested) or self.ids.get(requested)
        if entry is not None:
            return entry
        matches = self.normalised.get(normalise(requested), ())
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(sorted(e.name for e in matches))
            raise model_not_found(f"Model {requested!r} is ambiguous; it matches: {names}. Use one of these names.")
        raise model_not_found(f"Model {requested!r} is not served by this proxy. GET /v1/models lists the models.")

    def id_of(self, entry: Entry) -> str:
        for item in self.listed:
            if item.entry.name == entry.name:
                return item.id
        return entry.name


def build_catalogue(entries: Iterable[Entry]) -> Catalogue:
    ordered = sorted(entries, key=lambda e: e.name)
    ids: dict[str, Entry] = {}
    listed: list[Listed] = []
    seen_tags: set[str] = set()
    for entry in ordered:
        if entry.backend == "ollama" and entry.ollama_tag:
            if entry.ollama_tag in seen_tags:
                continue  # two entries for the same Ollama tag are listed once
            seen_tags.add(entry.ollama_tag)
        wanted = simplified_name(entry)
        public = wanted if wanted not in ids else entry.name
        if public in ids:  # even the logical name is taken by someone's display name
            continue
        ids[public] = entry
        listed.append(Listed(public, entry))
    by_name = {e.name: e for e in ordered}
    norm: dict[str, dict[str, Entry]] = {}

    def add(key: str | None, entry: Entry) -> None:
        if key:
            norm.setdefault(normalise(key), {})[entry.name] = entry

    for item in listed:
        add(item.id, item.entry)
    for entry in ordered:
        add(entry.name, entry)
        add(entry.display_name, entry)
        add(entry.served_model_id, entry)
    return Catalogue(
        listed=tuple(listed),
        ids=ids,
        by_name=by_name,
        normalised={k: tuple(v.values()) for k, v in norm.items()},
    )
