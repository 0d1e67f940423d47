"""One registry entry: the frozen attrs models and the cattrs converter that builds them from JSON.

:func:`make_registry_converter` registers the registry's quirks as structure hooks: ``null``, ``""`` and
``"None"`` mean absent; integers may be numeric strings; ``extra_args`` is a list or one shell string;
``capabilities`` is a list, an object of flags or a string, with synonyms; ``probes.vision.vision_ok``
overrides the declared vision capability. A value it refuses is reported with its field path by
:func:`describe`, for example ``backend_config.port: expected an integer, got 'abc'``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
from cattrs import Converter
from cattrs.errors import ClassValidationError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, override
from cattrs.preconf.orjson import make_converter

#: Capability spellings and their canonical name. ImageWorks writes every one of these synonyms into its
#: capability objects; Ollama reports ``thinking`` and ``image``.
CAPABILITY_SYNONYMS: Mapping[str, str] = MappingProxyType({
    **dict.fromkeys(["language", "chat"], "text"),
    **dict.fromkeys(["visual", "multimodal", "mm", "image", "images", "vl"], "vision"),
    **dict.fromkeys(["speech", "voice", "asr", "tts"], "audio"),
    **dict.fromkeys(["embed", "embeddings", "text-embedding", "representation"], "embedding"),
    **dict.fromkeys(
        [
            "tool_use", "tool-use", "tool_call", "tool-call", "toolcalls", "tool_calls", "toolchoice",
            "tool_choice", "function_call", "function-call", "function_calls", "function_calling",
            "function-calling", "function_tools", "functioncalling", "toolcalling", "auto_tool_choice",
        ],
        "tools",
    ),
    **dict.fromkeys(
        ["thinking", "reason", "think", "chain_of_thought", "cot", "reasoner", "o1", "o3", "r1", "deepseek"],
        "reasoning",
    ),
})

#: ``generation_defaults`` keys the proxy fills into requests, by the kind of value each takes.
GENERATION_INTEGERS = ("max_tokens", "min_tokens", "top_k", "seed")
GENERATION_NUMBERS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
GENERATION_STOPS = ("stop_sequences", "stop")

#: ``metadata`` keys with a meaning to the proxy (the schema documents them); free-form otherwise.
METADATA_READ = (
    "default_system_prompt",
    "vision_target_long_edge",
    "ollama_family",
    "ollama_parameter_size",
    "ollama_capabilities",
    "testing",
    "tool_parser",
    "vision",
)

_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")
_NUMBER = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class InvalidValue(ValueError):
    """A value a structure hook refuses; ``path`` continues the field path below the hook's own field."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path


@attrs.frozen
class BackendConfig:
    """Where and how the upstream runs (``backend_config`` in the registry)."""

    host: str | None = None
    port: int | None = None
    base_url: str | None = None
    model_path: str | None = None
    extra_args: tuple[str, ...] = ()
    adapter: str | None = None
    api_key_env: str | None = None
    #: ``False``: the model runs without the GPU (a CPU embedding model), so its requests take no GPU
    #: tenancy; ``None`` (absent): it uses the GPU.
    gpu: bool | None = None
    #: vLLM the proxy starts: a tool-call parser name adds ``--enable-auto-tool-choice --tool-call-parser``.
    tool_call_parser: str | None = None
    #: vLLM the proxy starts: a reasoning parser name adds ``--reasoning-parser``.
    reasoning_parser: str | None = None


@attrs.frozen
class ChatTemplate:
    """``chat_template``: an explicit template file for vLLM (``--chat-template``); ``None``: none set."""

    path: str | None = None


@attrs.frozen
class VisionProbe:
    """``probes.vision``: ``vision_ok`` overrides the declared capability; ``None``: never probed."""

    vision_ok: bool | None = None


@attrs.frozen
class Probes:
    vision: VisionProbe | None = None


@attrs.frozen
class Entry:
    """One registry entry, with the fields the proxy uses; ``raw`` keeps the whole object.

    ``capabilities`` is already canonical (synonyms folded, the vision probe applied).
    """

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
    chat_template: ChatTemplate = ChatTemplate()
    probes: Probes = Probes()
    generation_defaults: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    deprecated: bool = False
    metadata: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def chat_template_path(self) -> str | None:
        return self.chat_template.path

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


def fields_read() -> dict[str, frozenset[str]]:
    """The registry keys the converter reads, by object path (``""`` is the entry itself)."""

    def names(cls: type) -> frozenset[str]:
        return frozenset(f.name for f in attrs.fields(cls)) - {"raw"}

    return {
        "": names(Entry),
        "backend_config": names(BackendConfig),
        "chat_template": names(ChatTemplate),
        "probes": names(Probes),
        "probes.vision": names(VisionProbe),
        "generation_defaults": frozenset(GENERATION_INTEGERS + GENERATION_NUMBERS + GENERATION_STOPS),
        "metadata": frozenset(METADATA_READ),
    }


# -- errors ------------------------------------------------------------------------------------------


def _join(path: str, step: str) -> str:
    if not step:
        return path
    if not path or step.startswith("["):
        return path + step
    return f"{path}.{step}"


def _step(exc: BaseException) -> str:
    for note in getattr(exc, "__notes__", ()):
        name = getattr(note, "name", None)  # AttributeValidationNote
        if isinstance(name, str):
            return name
        index = getattr(note, "index", None)  # IterableValidationNote
        if isinstance(index, int):
            return f"[{index}]"
    return ""


def describe(exc: BaseException, path: str = "") -> list[str]:
    """One line per bad value in a structuring error: ``field.path: what is wrong``, or ``missing "x"``."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        return [line for sub in exc.exceptions for line in describe(sub, _join(path, _step(sub)))]
    if isinstance(exc, InvalidValue):
        where = _join(path, exc.path)
        return [f"{where}: {exc.message}" if where else exc.message]
    if isinstance(exc, KeyError):
        return [f'missing "{path}"']
    return [f"{path}: {exc}" if path else str(exc)]


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- value hooks (each takes the JSON value and the target type, as cattrs calls them) ---------------


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("", "None"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def opt_str(value: Any, _: Any = None) -> str | None:
    """A string, or ``None`` for ``null``, ``""`` and ``"None"``; numbers are taken as their text."""
    if _absent(value):
        return None
    if isinstance(value, str):
        return value
    if _is_number(value):
        return str(value)
    raise InvalidValue(f"expected a string, got {_got(value)}")


def opt_int(value: Any, _: Any = None) -> int | None:
    """An integer (also ``8000.0`` or ``"8000"``), or ``None`` when absent."""
    if _absent(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    raise InvalidValue(f"expected an integer, got {_got(value)}")


def opt_number(value: Any, _: Any = None) -> int | float | None:
    """A number (also a numeric string), or ``None`` when absent."""
    if _absent(value):
        return None
    if _is_number(value):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    raise InvalidValue(f"expected a number, got {_got(value)}")


def flag(value: Any, _: Any = None) -> bool:
    """``true``/``false`` (also ``0``/``1`` and ``"yes"``/``"no"``); absent is false."""
    if _absent(value):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidValue(f"expected true or false, got {_got(value)}")


def opt_flag(value: Any, _: Any = None) -> bool | None:
    return None if _absent(value) else flag(value)


def text(value: Any, _: Any = None) -> str:
    """A string with something besides blanks in it."""
    if isinstance(value, str) and value.strip():
        return value
    raise InvalidValue(f"expected a non-empty string, got {_got(value)}")


def required(hook: Callable[[Any], Any], what: str) -> Callable[[Any, Any], Any]:
    """``hook`` (one of the ``opt_*`` hooks above) for a field that must have a value: an absent one is
    refused as "expected ``what``"."""

    def structure(value: Any, _: Any = None) -> Any:
        result = hook(value)
        if result is None:
            raise InvalidValue(f"expected {what}, got {_got(value)}")
        return result

    return structure


def _backend(value: Any, _: Any = None) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip().lower()
    raise InvalidValue(f'expected a backend name such as "ollama", "vllm" or "openai", got {_got(value)}')


def _port(value: Any, _: Any = None) -> int | None:
    port = opt_int(value)
    if port is not None and not 0 <= port <= 65535:
        raise InvalidValue(f"expected a port number (1-65535), got {port}")
    return port


def _extra_args(value: Any, _: Any = None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise InvalidValue(f"cannot split {_got(value)} into arguments: {exc}") from None
    if not isinstance(value, (list, tuple)):
        raise InvalidValue(f"expected a list of arguments or one string, got {_got(value)}")
    for i, arg in enumerate(value):
        if not (isinstance(arg, str) or _is_number(arg)):
            raise InvalidValue(f"expected a string, got {_got(arg)}", path=f"[{i}]")
    return tuple(str(arg) for arg in value)


def canonical_capability(name: str) -> str:
    key = name.strip().lower()
    return CAPABILITY_SYNONYMS.get(key, key)


def _capability_on(value: Any, key: str) -> bool:
    if isinstance(value, Mapping):  # {"enabled": true, "target_long_edge": 448}
        value = value.get("enabled", True)
    try:
        return flag(value)
    except InvalidValue as exc:
        raise InvalidValue(exc.message, path=key) from None


def _capabilities(value: Any, _: Any = None) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        names: list[str] = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise InvalidValue(f"expected a capability name, got {_got(item)}", path=f"[{i}]")
        names = list(value)
    elif isinstance(value, Mapping):
        names = [str(k) for k, v in value.items() if _capability_on(v, str(k))]
    else:
        raise InvalidValue(f"expected a list of names, an object of flags or a string, got {_got(value)}")
    return frozenset(canonical_capability(n) for n in names if n.strip())


def _object(value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return value
    raise InvalidValue(f"expected an object, got {_got(value)}")


def _metadata(value: Any, _: Any = None) -> dict[str, Any]:
    return dict(_object(value))


def _stops(value: Any) -> str | list[str] | None:
    if _absent(value) or value == []:
        return None  # an empty list would reach the upstream as "stop": [], which OpenAI's schema refuses
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise InvalidValue(f"expected a string or a list of strings, got {_got(value)}")


def _generation_defaults(value: Any, _: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in _object(value).items():
        try:
            if key in GENERATION_INTEGERS:
                item = opt_int(item)
            elif key in GENERATION_NUMBERS:
                item = opt_number(item)
            elif key in GENERATION_STOPS:
                item = _stops(item)
        except InvalidValue as exc:
            raise InvalidValue(exc.message, path=key) from None
        if item is not None:
            out[key] = item
    return out


# -- the converter -----------------------------------------------------------------------------------


def _objects_only(fields: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """cattrs reads missing keys from a non-object as defaults; refuse anything but an object instead."""

    def structure(value: Any, cls: Any) -> Any:
        return fields(_object(value), cls)

    return structure


def _chat_template(fields: Callable[[Any, Any], Any]) -> Callable[[Any, Any], ChatTemplate]:
    def structure(value: Any, cls: Any) -> ChatTemplate:
        if isinstance(value, str):  # "chat_template": "/path/to/template.jinja"
            return ChatTemplate(path=opt_str(value))
        return fields(_object(value), cls)

    return structure


def _entry(fields: Callable[[Any, Any], Entry]) -> Callable[[Any, Any], Entry]:
    def structure(value: Any, cls: Any) -> Entry:
        entry = fields(_object(value), cls)
        caps = set(entry.capabilities)
        probe = entry.probes.vision
        if probe is not None and probe.vision_ok is not None:
            (caps.add if probe.vision_ok else caps.discard)("vision")
        return attrs.evolve(entry, capabilities=frozenset(caps), raw=dict(value))

    return structure


def make_registry_converter() -> Converter:
    """Build the converter that turns registry JSON objects into :class:`Entry` values.

    Build it once and pass it on (``RegistryStore`` holds one). ``converter.structure(obj, Entry)``
    raises ``cattrs.ClassValidationError`` (or :class:`InvalidValue`) for a bad value; :func:`describe`
    turns either into readable lines.
    """
    conv = make_converter(detailed_validation=True)
    conv.register_structure_hook(str | None, opt_str)
    conv.register_structure_hook(int | None, opt_int)
    conv.register_structure_hook(bool, flag)
    conv.register_structure_hook(bool | None, opt_flag)
    backend_config = make_dict_structure_fn(
        BackendConfig, conv, port=override(struct_hook=_port), extra_args=override(struct_hook=_extra_args)
    )
    conv.register_structure_hook(BackendConfig, _objects_only(backend_config))
    conv.register_structure_hook(ChatTemplate, _chat_template(make_dict_structure_fn(ChatTemplate, conv)))
    conv.register_structure_hook(VisionProbe, _objects_only(make_dict_structure_fn(VisionProbe, conv)))
    conv.register_structure_hook(Probes, _objects_only(make_dict_structure_fn(Probes, conv)))
    entry_fields = make_dict_structure_fn(
        Entry,
        conv,
        name=override(struct_hook=text),
        backend=override(struct_hook=_backend),
        capabilities=override(struct_hook=_capabilities),
        generation_defaults=override(struct_hook=_generation_defaults),
        metadata=override(struct_hook=_metadata),
        raw=override(omit=True),
    )
    conv.register_structure_hook(Entry, _entry(entry_fields))
    return conv
