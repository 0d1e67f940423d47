"""Named mistakes in a registry entry: keys nobody reads, with a "did you mean" when one is close.

The known keys are the ones the converter reads (:func:`~imageworks_proxy.catalogue.entry.fields_read`)
plus the fields ImageWorks and related tools write that the proxy ignores on purpose (below). A warning
never stops a load. ``metadata`` is free-form and never checked; keys starting with ``_`` or ``$`` are
taken as comments. docs/registry.md lists the fields.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from imageworks_proxy.catalogue.entry import CAPABILITY_SYNONYMS, fields_read

#: Entry fields written by ImageWorks (its model loader and downloader) that the proxy does not use.
IGNORED_ENTRY_KEYS = frozenset(
    {
        "artifacts",
        "backend_alternatives",
        "download_directory",
        "download_directory_checksum",
        "download_files",
        "download_location",
        "downloaded_at",
        "hf_repo",
        "last_accessed",
        "license",
        "model_aliases",
        "performance",
        "profiles_placeholder",
        "role_priority",
        "roles",
        "source",
        "source_provider",
        "version_lock",
        # free-text notes people add by hand
        "description",
        "notes",
        "comment",
        "tags",
    }
)

#: Ignored keys inside the nested objects the proxy reads.
IGNORED_NESTED_KEYS: Mapping[str, frozenset[str]] = {
    "chat_template": frozenset({"source", "sha256"}),
    "generation_defaults": frozenset({"context_window"}),
}

#: Capability names with no special meaning to the proxy that ImageWorks, Ollama or OpenWebUI use.
OTHER_CAPABILITIES = frozenset(
    {
        "text", "completion", "insert", "usage", "citations", "file_upload", "web_search",
        "image_generation", "code_interpreter", "status_updates",
    }
)

#: The objects whose keys are checked, and what each may hold. ``capabilities`` only in its object form.
CHECKED = ("", "backend_config", "chat_template", "generation_defaults", "capabilities")


def known_keys() -> dict[str, frozenset[str]]:
    """Every key that does not warn, by object path (``""`` is the entry itself)."""
    read = fields_read()
    capabilities = frozenset(CAPABILITY_SYNONYMS) | frozenset(CAPABILITY_SYNONYMS.values())
    return {
        "": read[""] | IGNORED_ENTRY_KEYS,
        "backend_config": read["backend_config"],
        "chat_template": read["chat_template"] | IGNORED_NESTED_KEYS["chat_template"],
        "generation_defaults": read["generation_defaults"] | IGNORED_NESTED_KEYS["generation_defaults"],
        "capabilities": capabilities | OTHER_CAPABILITIES,
    }


def _unknown(key: str, known: frozenset[str], fold_case: bool) -> str | None:
    """The warning text for ``key``, or ``None`` when it is known (or a comment)."""
    if key.startswith(("_", "$")) or key in known or (fold_case and key.strip().lower() in known):
        return None
    close = difflib.get_close_matches(key.strip().lower(), sorted(known), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def entry_warnings(obj: Mapping[str, Any], known: Mapping[str, frozenset[str]] | None = None) -> list[str]:
    """Warnings for the keys of one registry object that nobody reads, each naming the entry.

    ``known`` is :func:`known_keys` (computed when ``None``). Returns ``[]`` for a clean entry.
    """
    known = known if known is not None else known_keys()
    out = []
    for section in CHECKED:
        value = obj if section == "" else obj.get(section)
        if not isinstance(value, Mapping):
            continue
        for key in value:
            # capability names are matched the way the converter reads them: case and spaces folded
            text = _unknown(str(key), known[section], fold_case=section == "capabilities")
            if text:
                where = f"{section}: " if section else ""
                out.append(f"entry {obj.get('name')!r}: {where}{text}")
    return out
