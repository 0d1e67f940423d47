"""Model capabilities known before dispatch: ``tools``, ``vision``, ``reasoning`` and ``embedding``.

Each capability of an entry is on, off or unknown. The sources, first one that says wins:

1. a refusal learned from the upstream (it answered 400 "does not support tools" or the like); kept until
   the registry changes;
2. the registry: ``capabilities`` in its object form (``{"tools": false}``) says on and off, in its list or
   string form it says on for the names listed; ``metadata.ollama_capabilities`` (Ollama's own list,
   written by ImageWorks) says on for the names listed and off for the rest;
3. the adapter (:meth:`~imageworks_proxy.adapters.base.Adapter.capabilities`): Ollama's ``/api/tags`` or
   ``/api/show`` for the tag, an orchestrated vLLM's launch flags.

An unknown capability is forwarded as the client sent it. The request side of the pipeline drops what a
model cannot take (:func:`drop_fields`); adapters retry a request once when the upstream refuses one of
these capabilities with a message :func:`refused_capability` recognises. docs/registry.md describes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import attrs

from imageworks_proxy.catalogue.entry import canonical_capability

if TYPE_CHECKING:
    from imageworks_proxy.adapters.base import Adapter
    from imageworks_proxy.catalogue.registry import Entry

log = logging.getLogger("imageworks_proxy.capabilities")

#: The capabilities the proxy acts on.
CAPABILITIES = ("tools", "vision", "reasoning", "embedding")

#: Ollama's capability names (``/api/show``, ``/api/tags``) -> ours. Ollama's ``image`` is image generation.
OLLAMA_NAMES: Mapping[str, str] = {
    "tools": "tools",
    "thinking": "reasoning",
    "vision": "vision",
    "embedding": "embedding",
}

#: Request fields that only mean something to a model that takes tools.
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")
#: Request fields that switch thinking on, off or up (``chat_template_kwargs.enable_thinking`` is nested).
REASONING_FIELDS = ("think", "reasoning_effort", "chat_template_kwargs.enable_thinking")

#: What upstreams answer (HTTP 400) when a request carries a capability the model lacks; vLLM's tool
#: messages are those of vLLM 0.33, the others Ollama's.
_REFUSALS = (
    ('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser', "tools"),
    ("does not support tools", "tools"),
    ("does not support thinking", "reasoning"),
)


@attrs.frozen
class Capabilities:
    """What one source says about one model's capabilities.

    ``flags`` maps a capability to on (``True``) or off (``False``); one it does not mention is unknown to
    this source. ``source`` says where it comes from, for the log ("vLLM launch flags").
    """

    flags: Mapping[str, bool]
    source: str


@attrs.frozen
class Effective:
    """The capabilities of one entry as the proxy acts on them: each of :data:`CAPABILITIES` on, off or
    unknown, with the reason; and the registry's other capability names (``text``, ``audio``...)."""

    values: Mapping[str, tuple[bool, str]]
    other: frozenset[str] = frozenset()
    _names: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)

    @_names.default
    def _listed(self) -> tuple[str, ...]:
        on = {name for name, (value, _) in self.values.items() if value}
        return tuple(sorted(self.other | on))

    def has(self, capability: str) -> bool | None:
        """``True``/``False`` when a source said so, ``None`` when nobody knows."""
        known = self.values.get(capability)
        return known[0] if known is not None else None

    def why(self, capability: str) -> str:
        """The source of :meth:`has`'s answer ("" when unknown)."""
        known = self.values.get(capability)
        return known[1] if known is not None else ""

    def names(self) -> list[str]:
        """The capabilities that are on, with the registry's other names: what ``/v1/models`` shows."""
        return list(self._names)

    def known(self) -> dict[str, bool]:
        """Capability -> on/off for the ones some source knows (for the request log)."""
        return {name: value for name, (value, _) in sorted(self.values.items())}


def ollama_capabilities(names: Any, source: str) -> Capabilities | None:
    """Ollama's capability list (``["completion", "tools"]``) as :class:`Capabilities`: each of ours is on
    when listed, off when not. ``None`` when ``names`` is not a list of names."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return None
    listed = {OLLAMA_NAMES[n.strip().lower()] for n in names if n.strip().lower() in OLLAMA_NAMES}
    return Capabilities({c: c in listed for c in CAPABILITIES}, source)


def from_registry(entry: Entry) -> Capabilities:
    """What the registry entry says (see the module docstring); may say nothing."""
    flags: dict[str, bool] = {}
    ollama = ollama_capabilities(entry.metadata.get("ollama_capabilities"), "")
    if ollama is not None:
        flags.update(ollama.flags)
    for name in CAPABILITIES:
        if name in entry.capabilities:
            flags[name] = True
    declared = entry.raw.get("capabilities")
    if isinstance(declared, Mapping):
        # the object form: a key present but not on (false, "no", {"enabled": false}) says off
        for key in declared:
            name = canonical_capability(str(key))
            if name in CAPABILITIES and name not in entry.capabilities:
                flags[name] = False
    probe = entry.probes.vision
    if probe is not None and probe.vision_ok is False:
        flags["vision"] = False
    return Capabilities(flags, "the registry entry")


def resolve(entry: Entry, adapter_says: Capabilities | None, learned: Mapping[str, str]) -> Effective:
    """Combine the sources in their order: learned refusals, the registry, the adapter."""
    values: dict[str, tuple[bool, str]] = {}
    if adapter_says is not None:
        for name, value in adapter_says.flags.items():
            if name in CAPABILITIES:
                values[name] = (bool(value), adapter_says.source)
    registry = from_registry(entry)
    for name, value in registry.flags.items():
        values[name] = (value, registry.source)
    for name, message in learned.items():
        values[name] = (False, f"the upstream refused it: {message}")
    return Effective(values, frozenset(entry.capabilities) - set(CAPABILITIES))


# -- request fields ---------------------------------------------------------------------------------


def refused_capability(status: int, message: str | None) -> str | None:
    """The capability an upstream's error refuses (``"tools"`` or ``"reasoning"``), else ``None``.

    Recognises vLLM 0.33's 400 for tools without a tool parser, and Ollama's 400
    "<model> does not support tools" / "\\"<model>\\" does not support thinking".
    """
    if status != 400 or not message:
        return None
    for text, capability in _REFUSALS:
        if text in message:
            return capability
    return None


def forces_tool_call(body: Mapping[str, Any]) -> bool:
    """Whether the request insists on a tool call (``tool_choice`` ``"required"`` or a named function, or
    the legacy ``function_call`` naming one): dropping its tools would lose what the client asked for."""
    choice = body.get("tool_choice")
    legacy = body.get("function_call")
    return choice == "required" or isinstance(choice, Mapping) or isinstance(legacy, Mapping)


def _drop(body: MutableMapping[str, Any], field: str) -> bool:
    if "." not in field:
        if field not in body:
            return False
        del body[field]
        return True
    outer, inner = field.split(".", 1)
    nested = body.get(outer)
    if not isinstance(nested, MutableMapping) or inner not in nested:
        return False
    del nested[inner]
    if not nested:
        del body[outer]
    return True


def drop_fields(body: MutableMapping[str, Any], capability: str) -> list[str]:
    """Remove the request fields of ``capability`` (``tools`` or ``reasoning``) from an OpenAI request
    body, in place; returns the names of the fields that were there."""
    fields = TOOL_FIELDS if capability == "tools" else REASONING_FIELDS if capability == "reasoning" else ()
    return [f for f in fields if _drop(body, f)]


def drop_empty_tools(body: MutableMapping[str, Any]) -> list[str]:
    """Remove ``tools: []`` (and ``functions: []``) with the fields that only go with them; vLLM and OpenAI
    refuse an empty tool list, and it means "no tools" anyway. Returns the names removed."""
    empty = [f for f in ("tools", "functions") if f in body and body[f] in ([], None)]
    if not empty:
        return []
    for field in empty:
        del body[field]
    if body.get("tools") or body.get("functions"):
        return empty
    return empty + [f for f in ("tool_choice", "parallel_tool_calls", "function_call") if _drop(body, f)]


# -- the per-app store ------------------------------------------------------------------------------


class CapabilityStore:
    """Per app (on the model service): refusals learned from upstreams and the adaptations already
    logged. :meth:`clear` runs on every registry change, so both start over then."""

    def __init__(self) -> None:
        self._learned: dict[str, dict[str, str]] = {}
        self._logged: set[tuple[str, str]] = set()
        # entry name -> (the entry, what its adapter said, the result): asked on every request, the
        # answer only changes with the entry, the adapter's answer or what was learned
        self._resolved: dict[str, tuple[Entry, Capabilities | None, Effective]] = {}

    def clear(self) -> None:
        self._learned.clear()
        self._logged.clear()
        self._resolved.clear()

    def learned(self, name: str) -> Mapping[str, str]:
        """Capability -> the upstream's refusal message, for entry ``name``."""
        return self._learned.get(name, {})

    def learn(self, entry: Entry, capability: str, message: str) -> None:
        """Remember that ``entry``'s upstream refused ``capability`` (logged once, at WARNING)."""
        known = self._learned.setdefault(entry.name, {})
        if capability in known:
            return
        known[capability] = message
        self._resolved.pop(entry.name, None)
        log.warning(
            "model %s: the upstream refused %s (%s); sending its requests without them until the registry "
            "changes (say so in the entry's capabilities to skip the first refusal)",
            entry.name,
            capability,
            message,
        )

    def note(self, entry: Entry, capability: str, dropped: list[str], why: str) -> None:
        """Log once per model and capability, at INFO, which request fields were dropped and why."""
        key = (entry.name, capability)
        if key in self._logged:
            return
        self._logged.add(key)
        log.info(
            "model %s has no %s capability (%s): dropping %s from its requests",
            entry.name,
            capability,
            why,
            ", ".join(dropped),
        )

    async def effective(self, entry: Entry, adapter: Adapter | None) -> Effective:
        """``entry``'s capabilities from all sources. Asks the adapter (its cached answer; an adapter that
        fails counts as saying nothing)."""
        says: Capabilities | None = None
        if adapter is not None:
            try:
                says = await adapter.capabilities(entry)
            except Exception:  # a plugin's bug must not fail the chat; the registry still applies
                log.exception("adapter %s failed to report capabilities of %s", adapter.name, entry.name)
        done = self._resolved.get(entry.name)
        if done is not None and done[0] is entry and done[1] == says:
            return done[2]
        effective = resolve(entry, says, self.learned(entry.name))
        self._resolved[entry.name] = (entry, says, effective)
        return effective
