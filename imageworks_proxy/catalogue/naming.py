"""Public model ids and request-model resolution (the rules, with examples: docs/registry.md)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import attrs

from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.errors import model_not_found

_FORMAT_WORDS = "gguf safetensors awq gptq fp8 fp16 bf16 f16 f32 fp32 int4 int8 nf4 mxfp4 exl2"
# Format words and quant tokens (q4_k_m, iq2_xxs, q8_0, w4a16), dropped *before* "_" becomes "-" so a
# q4_k_m never leaves "k-m" behind; bounded by anything that is not a letter or digit (".gguf" too).
_DROP = re.compile(
    r"(?<![a-z0-9])(?:"
    + "|".join(_FORMAT_WORDS.split())
    + r"|i?q\d+(?:_[a-z0-9]{1,3})*|w\d+a\d+)(?![a-z0-9])"
)
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
    text = _DROP.sub("", text.lower())
    text = re.sub(r"[_/@:\s]+", "-", text)
    # Separators left around a dropped word ("v0.2..gguf" -> "v0.2-"); a single "." (qwen2.5) stays.
    text = re.sub(r"[-.]*-[-.]*|\.{2,}", "-", text)
    return text.strip("-.")


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
    id_by_name: dict[str, str] = attrs.field(factory=dict)

    def resolve(self, requested: str) -> Entry:
        """Exact id, exact logical name, then a normalised match; ambiguity and misses are 404s.

        Ids come first: a remembered id that a newer entry's logical name happens to equal still names
        the entry it was listed for."""
        entry = self.ids.get(requested) or self.by_name.get(requested)
        if entry is not None:
            return entry
        matches = self.normalised.get(normalise(requested), ())
        if len(matches) == 1:
            return matches[0]
        shown = requested if len(requested) <= 200 else requested[:200] + "..."  # never echo megabytes
        if len(matches) > 1:
            names = ", ".join(sorted(e.name for e in matches))
            raise model_not_found(
                f"Model {shown!r} is ambiguous; it matches: {names}. Use one of these names."
            )
        raise model_not_found(
            f"Model {shown!r} is not served by this proxy. GET /v1/models lists the models."
        )

    def id_of(self, entry: Entry) -> str:
        """The id ``entry`` is listed under (its logical name when it is not listed)."""
        return self.id_by_name.get(entry.name, entry.name)


def _tag_key(tag: str) -> str:
    return tag if ":" in tag else f"{tag}:latest"  # Ollama's "llama3" is "llama3:latest"


def _remembered(
    assigned: Mapping[str, str], by_name: Mapping[str, Entry], duplicates: set[str]
) -> dict[str, Entry]:
    """The remembered ids that still hold: their entry is in the registry, not deprecated, not a duplicate
    Ollama tag, and not renamed by a ``display_name`` that differs from the id."""
    kept: dict[str, Entry] = {}
    taken: set[str] = set()
    for public, name in sorted(assigned.items()):
        entry = by_name.get(name)
        if entry is None or entry.deprecated or name in duplicates or name in taken:
            continue
        if entry.display_name and entry.display_name != public:
            continue  # the user renamed it
        kept[public] = entry
        taken.add(name)
    return kept


def _duplicate_tags(ordered: list[Entry], keep: set[str]) -> set[str]:
    """Entries whose Ollama tag an earlier entry has (listed once); entries in ``keep`` go first."""
    seen: set[str] = set()
    duplicates: set[str] = set()
    first = sorted(ordered, key=lambda e: (e.deprecated, e.name not in keep))  # stable: name order
    for entry in first:
        if entry.backend == "ollama" and entry.ollama_tag:
            tag = _tag_key(entry.ollama_tag)
            if tag in seen:
                duplicates.add(entry.name)
            seen.add(tag)
    return duplicates


def build_catalogue(entries: Iterable[Entry], assigned: Mapping[str, str] | None = None) -> Catalogue:
    """Public ids for ``entries`` and the tables that resolve a request's ``model``.

    ``assigned`` holds the ids handed out before (id -> logical name, :mod:`~.idstore`): each keeps naming
    its entry while that entry is in the registry and not deprecated, unless its ``display_name`` now says
    otherwise. The other entries get ids in logical-name order, visible entries before deprecated ones (so
    a hidden twin never takes the clean name). An id that is taken, or that is another entry's logical name
    (a request naming it would be ambiguous), falls back to the entry's own logical name; so every entry
    but a duplicate Ollama tag is listed, and every listed id resolves to the entry it is listed for.
    """
    ordered = sorted(entries, key=lambda e: e.name)
    names = {e.name for e in ordered}
    by_name = {e.name: e for e in ordered}
    assigned = assigned or {}
    duplicates = _duplicate_tags(ordered, set(assigned.values()))
    ids = _remembered(assigned, by_name, duplicates)
    chosen = {entry.name for entry in ids.values()}
    listed = [Listed(public, entry) for public, entry in ids.items()]
    for entry in sorted(ordered, key=lambda e: e.deprecated):  # stable: name order within each group
        if entry.name in duplicates or entry.name in chosen:
            continue
        wanted = simplified_name(entry)
        taken = wanted in ids or (wanted in names and wanted != entry.name)
        public = entry.name if taken else wanted
        n = 2
        while public in ids:  # a remembered id equals this entry's logical name
            public, n = f"{entry.name} ({n})", n + 1
        ids[public] = entry
        listed.append(Listed(public, entry))
    listed.sort(key=lambda item: item.entry.name)
    norm: dict[str, dict[str, Entry]] = {}

    def add(key: str | None, entry: Entry) -> None:
        if key:
            norm.setdefault(normalise(key), {})[entry.name] = entry

    for item in listed:
        add(item.id, item.entry)
    for entry in ordered:
        add(entry.name, entry)
        add(entry.display_name, entry)
        if entry.name not in duplicates:  # the tag resolves to the entry that is listed for it
            add(entry.served_model_id, entry)
    return Catalogue(
        listed=tuple(listed),
        ids=ids,
        by_name=by_name,
        normalised={k: tuple(v.values()) for k, v in norm.items()},
        id_by_name={item.entry.name: item.id for item in listed},
    )
