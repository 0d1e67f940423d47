"""Configuration: command line > environment > optional TOML file > defaults (every setting:
docs/configuration.md).

``load_config`` is a pure function of the environment mapping, the command-line values and the TOML file
they may name, so tests build configs in code and two apps in one process can run with different settings.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import orjson

from imageworks_proxy.config_file import FileError, did_you_mean, read_settings_file
from imageworks_proxy.config_values import (
    _autostart_map,
    _bool,
    _fetch_allow,
    _fraction,
    _keys,
    _names,
    _nonneg_int,
    _opt_pos_int,
    _opt_str,
    _port,
    _pos_float,
    _pos_int,
    _sleep_level,
    _str,
    _url,
)

PREFIX = "CHAT_PROXY_"


class ConfigError(ValueError):
    """A setting has a value we cannot use.

    The message names the variable, the value and what was expected, on one line.
    """


def _default_vllm_command() -> str:
    # `vllm serve` (the CLI's entry point run by this interpreter); the older
    # `-m vllm.entrypoints.openai.api_server` still works but is deprecated (docs/vllm.md)
    return f"{sys.executable} -m vllm.entrypoints.cli.main serve"


@attrs.frozen
class Setting:
    """One setting: its environment variable, its :class:`Config` attribute, the parser for its text form,
    its default (None: unset, or resolved in :func:`load_config`) and a one-line meaning."""

    env: str
    attr: str
    parse: Callable[[str], Any]
    default: Any
    help: str


def _s(name: str, parse: Callable[[str], Any], default: Any, help: str) -> Setting:
    return Setting(PREFIX + name, name.lower(), parse, default, help)


# One row per setting: the environment variable, its parser, the default and what it does.
SETTINGS: tuple[Setting, ...] = (
    _s("HOST", _str, "127.0.0.1", "Bind address"),
    _s("PORT", _port, 8100, "Listen port"),
    _s(
        "REGISTRY",
        _str,
        None,
        "Registry JSON file or ImageWorks layered directory (default: $IMAGEWORKS_REGISTRY_DIR or configs)",
    ),
    _s("REGISTRY_POLL_S", _pos_float, 1.0, "How often the registry files are checked for changes"),
    _s("SUPPRESS_DECORATIONS", _bool, True, "Hide backend/format/quant fields in models output"),
    _s("INCLUDE_NON_INSTALLED", _bool, False, "Include entries without visible files"),
    _s("INCLUDE_TEST_MODELS", _bool, False, "List entries marked metadata.testing"),
    _s(
        "LOOPBACK_ALIAS",
        _opt_str,
        None,
        "Replace localhost targets in backend URLs (e.g. host.docker.internal)",
    ),
    _s("ENABLE_METRICS", _bool, False, "Enable /v1/metrics and Prometheus /metrics"),
    _s("METRICS_WINDOW_S", _pos_int, 300, "Rolling window of /v1/metrics in seconds"),
    _s("REQUIRE_TEMPLATE", _bool, True, "Enforce presence of a chat template for orchestrated vLLM models"),
    _s("MAX_IMAGE_BYTES", _pos_int, 6_000_000, "Max decoded image size in bytes"),
    _s("MAX_BODY_BYTES", _pos_int, 67_108_864, "Request body cap in bytes"),
    _s("HEADER_TIMEOUT_S", _pos_float, 10.0, "Seconds a request's line and headers may take once begun"),
    _s("BODY_TIMEOUT_S", _pos_float, 60.0, "Seconds a request body may take to arrive"),
    _s("KEEPALIVE_TIMEOUT_S", _pos_float, 75.0, "Seconds an idle keep-alive connection stays open"),
    _s(
        "MAX_CONNECTIONS",
        _pos_int,
        512,
        "Open client connections; idle ones are closed first to make room (at most half the open-file limit)",
    ),
    _s("BACKEND_TIMEOUT_MS", _pos_int, 120_000, "Upstream request timeout in ms"),
    _s("STREAM_IDLE_TIMEOUT_MS", _pos_int, 60_000, "Streaming idle cutoff in ms"),
    _s(
        "CLIENT_STALL_TIMEOUT_MS",
        _pos_int,
        60_000,
        "A streamed write a client does not take within this many ms ends the stream (client_stalled)",
    ),
    _s(
        "MAX_UPSTREAM_BODY_BYTES",
        _pos_int,
        67_108_864,
        "Cap on a non-streamed upstream reply in bytes (502 beyond it)",
    ),
    _s("LOG_PATH", _str, "logs/chat_proxy.jsonl", "JSONL chat log (rotates by size)"),
    _s("MAX_LOG_BYTES", _pos_int, 25_000_000, "Log rotation threshold in bytes"),
    _s("LOG_PROMPTS", _bool, False, "Include prompt payloads in the JSONL log"),
    _s("LOG_LEVEL", _str, "INFO", "Human log level (DEBUG, INFO, WARNING, ERROR)"),
    _s("DISABLE_TOOL_NORMALIZATION", _bool, False, "Pass through backend tool payloads unchanged"),
    _s("SCHEMA_VERSION", _pos_int, 1, "Schema version advertised in models list"),
    _s("VISION_TRUNCATE_HISTORY", _bool, True, "Trim earlier turns when a request carries images"),
    _s("VISION_KEEP_SYSTEM", _bool, True, "Keep system messages when trimming vision history"),
    _s(
        "VISION_KEEP_LAST_N_TURNS", _nonneg_int, 0, "Earlier complete turns kept when trimming vision history"
    ),
    _s("VISION_DOWNSCALE", _bool, True, "Downscale inline images for vision models on the listed backends"),
    _s(
        "VISION_DOWNSCALE_BACKENDS",
        _keys,
        ("vllm",),
        "Registry backends or adapter names whose vision models get downscaled images (* for all)",
    ),
    _s(
        "VISION_TARGET_LONG_EDGE",
        _pos_int,
        448,
        "Long edge in pixels of downscaled images, unless the registry entry sets its own",
    ),
    _s("OLLAMA_BASE_URL", _url, "http://127.0.0.1:11434", "Ollama for entries that name no host"),
    _s("OLLAMA_KEEP_ALIVE", _opt_str, None, "keep_alive sent with Ollama chat requests (e.g. 10m, -1)"),
    _s("OLLAMA_STOP_TIMEOUT_S", _pos_float, 30.0, "How long to wait for Ollama to unload its models"),
    _s("OLLAMA_IDLE_UNLOAD_S", _nonneg_int, 0, "Unload Ollama's models after this many idle s (0: never)"),
    _s("GPU_EXCLUSIVE", _bool, True, "One GPU tenant at a time (Ollama or vLLM)"),
    _s("AUTOSTART_ENABLED", _bool, False, "Enable backend autostart commands"),
    _s("AUTOSTART_MAP", _autostart_map, {}, "JSON map of logical model -> command"),
    _s("AUTOSTART_GRACE_PERIOD_S", _pos_float, 120.0, "How long an autostarted backend has to become ready"),
    _s("VLLM_SINGLE_PORT", _bool, True, "Enable single active vLLM orchestration"),
    _s("VLLM_PORT", _port, 24001, "Canonical vLLM port when orchestration is enabled"),
    _s("VLLM_HOST", _str, "127.0.0.1", "Bind address given to orchestrated vLLM"),
    _s(
        "VLLM_COMMAND",
        _str,
        None,
        "Launcher prefix for orchestrated vLLM (default: <python> -m vllm.entrypoints.cli.main serve)",
    ),
    _s(
        "VLLM_STATE_PATH",
        _str,
        "_staging/active_vllm.json",
        "Metadata file tracking the active vLLM instance",
    ),
    _s(
        "NAMES_PATH",
        _opt_str,
        None,
        "File remembering which entry each public model id names (default: model_ids.json next to the "
        "vLLM state file)",
    ),
    _s("VLLM_LOG_DIR", _str, "logs/vllm", "Directory of per-model vLLM logs"),
    _s("VLLM_START_TIMEOUT_S", _pos_float, 180.0, "Time budget (seconds) for vLLM startup + health"),
    _s("VLLM_STOP_TIMEOUT_S", _pos_float, 30.0, "Graceful shutdown timeout before SIGKILL"),
    _s("VLLM_HEALTH_TIMEOUT_S", _pos_float, 120.0, "Per-request timeout when polling vLLM health"),
    _s("VLLM_GPU_MEMORY_UTILIZATION", _fraction, 0.75, "Fraction of GPU memory vLLM should claim"),
    _s("VLLM_MAX_MODEL_LEN", _opt_pos_int, None, "Override max sequence length passed to vLLM"),
    _s("VLLM_MAX_QUEUE", _pos_int, 64, "Requests waiting for a model switch before 429"),
    _s("VLLM_IDLE_UNLOAD_S", _nonneg_int, 0, "Stop the active vLLM after this many idle seconds (0 = never)"),
    _s(
        "VLLM_FAILURE_BACKOFF_S",
        _pos_float,
        10.0,
        "After a failed vLLM start, seconds before the model is "
        "started again (doubles per consecutive failure)",
    ),
    _s(
        "VLLM_KEEP_ON_EXIT",
        _bool,
        False,
        "Leave the active vLLM running when the proxy stops (the next proxy adopts it)",
    ),
    _s(
        "VLLM_SLEEP_LEVEL",
        _sleep_level,
        0,
        "vLLM sleep mode on a switch: 0 stops the model, 1 offloads its weights to CPU memory, 2 drops them",
    ),
    _s("VLLM_MAX_ASLEEP", _nonneg_int, 2, "Sleeping vLLM models kept resident (least recently used stopped)"),
    _s(
        "VLLM_SLEEP_MAX_HOST_BYTES",
        _opt_pos_int,
        None,
        "Host memory for the weights of level-1 sleepers (default: half the machine's memory)",
    ),
    _s("API_KEYS", _keys, (), "Comma-separated bearer keys; when set every route but /v1/health needs one"),
    _s("ADMIN_KEYS", _keys, (), "Comma-separated bearer keys; when set only these open /v1/admin/*"),
    _s("ALLOWED_HOSTS", _names, (), "More Host names to answer (reverse proxy, Docker names); * for any"),
    _s("ALLOWED_ORIGINS", _names, (), "Browser origins allowed to call the proxy (CORS); * for any"),
    _s(
        "IMAGE_FETCH_ALLOW",
        _fetch_allow,
        (),
        "Hosts and networks image URLs may point at besides public addresses (e.g. 192.168.1.0/24,nas.lan)",
    ),
    _s("CONFIG_FILE", _opt_str, None, "Optional TOML file with settings (lower-case names, no prefix)"),
)

_BY_ATTR = {s.attr: s for s in SETTINGS}


@attrs.frozen
class Config:
    """The effective configuration. Build it with :func:`load_config`; change it with ``attrs.evolve``.

    The fields have no defaults on purpose: :data:`SETTINGS` is the one place defaults live.
    """

    host: str
    port: int
    registry: str
    registry_poll_s: float
    suppress_decorations: bool
    include_non_installed: bool
    include_test_models: bool
    loopback_alias: str | None
    enable_metrics: bool
    metrics_window_s: int
    require_template: bool
    max_image_bytes: int
    max_body_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    backend_timeout_ms: int
    stream_idle_timeout_ms: int
    client_stall_timeout_ms: int
    max_upstream_body_bytes: int
    log_path: str
    max_log_bytes: int
    log_prompts: bool
    log_level: str
    disable_tool_normalization: bool
    schema_version: int
    vision_truncate_history: bool
    vision_keep_system: bool
    vision_keep_last_n_turns: int
    vision_downscale: bool
    vision_downscale_backends: tuple[str, ...]
    vision_target_long_edge: int
    ollama_base_url: str
    ollama_keep_alive: str | None
    ollama_stop_timeout_s: float
    ollama_idle_unload_s: int
    gpu_exclusive: bool
    autostart_enabled: bool
    autostart_map: Mapping[str, Any] = attrs.field(eq=False)
    autostart_grace_period_s: float
    vllm_single_port: bool
    vllm_port: int
    vllm_host: str
    vllm_command: str
    vllm_state_path: str
    names_path: str
    vllm_log_dir: str
    vllm_start_timeout_s: float
    vllm_stop_timeout_s: float
    vllm_health_timeout_s: float
    vllm_gpu_memory_utilization: float
    vllm_max_model_len: int | None
    vllm_max_queue: int
    vllm_idle_unload_s: int
    vllm_failure_backoff_s: float
    vllm_keep_on_exit: bool
    vllm_sleep_level: int
    vllm_max_asleep: int
    vllm_sleep_max_host_bytes: int | None
    api_keys: tuple[str, ...] = attrs.field(repr=False)
    admin_keys: tuple[str, ...] = attrs.field(repr=False)
    allowed_hosts: tuple[str, ...]
    allowed_origins: tuple[str, ...]
    image_fetch_allow: tuple[str, ...]
    config_file: str | None
    #: Which source set each setting: "command line", "env", "file" or "default".
    sources: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)
    #: Named mistakes that did not stop the load (unknown variables, ignored file keys), one line each;
    #: the server logs them at start-up.
    warnings: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)


def _file_value_to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, dict)):
        if value and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)
        return orjson.dumps(value).decode()
    return str(value)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each ``CHAT_PROXY_*`` variable that is not a setting, with a "did you mean"."""
    known = {s.env for s in SETTINGS}
    return [
        f"{name} is not a setting{did_you_mean(name, known)}; ignored"
        for name in sorted(env)
        if name.startswith(PREFIX) and name not in known
    ]


def load_config(
    environ: Mapping[str, str] | None = None, *, command_line: Mapping[str, str] | None = None
) -> Config:
    """Build the effective :class:`Config` from ``command_line``, ``environ`` and the TOML file they name.

    ``environ`` None means ``os.environ``. ``command_line`` maps setting names (``"port"``) to their text,
    as the server's options give them; it wins over everything. Raises :class:`ConfigError` naming the
    option or variable, the value and what was expected.
    """
    env = dict(os.environ if environ is None else environ)
    cli = {k: v for k, v in (command_line or {}).items() if v is not None}
    unknown_cli = set(cli) - set(_BY_ATTR)
    if unknown_cli:
        raise ValueError(f"load_config: not settings: {sorted(unknown_cli)}")
    file_path = (cli.get("config_file") or env.get(PREFIX + "CONFIG_FILE") or "").strip() or None
    file_where = "--config" if cli.get("config_file") else PREFIX + "CONFIG_FILE"
    try:
        file = read_settings_file(file_path, set(_BY_ATTR) - {"config_file"}) if file_path else None
    except FileError as exc:
        raise ConfigError(f"{file_where}={file_path!r}: {exc}") from None
    file_values = file.values if file else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        # An empty variable counts as unset (compose files often pass `- CHAT_PROXY_X=`); an empty
        # CHAT_PROXY_HOST must never turn into "listen on every interface".
        if s.attr in cli:
            raw, source = cli[s.attr], "command line"
        elif env.get(s.env, "").strip():
            raw, source = env[s.env], "env"
        elif s.attr in file_values:
            raw, source = _file_value_to_text(file_values[s.attr]), "file"
        else:
            values[s.attr], sources[s.attr] = s.default, "default"
            continue
        try:
            values[s.attr] = s.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{_where(s, source, file, file_path)}={raw!r}: {exc}") from None
        sources[s.attr] = source

    if values["registry"] is None:
        values["registry"] = env.get("IMAGEWORKS_REGISTRY_DIR") or "configs"
        sources["registry"] = (
            "env (IMAGEWORKS_REGISTRY_DIR)" if env.get("IMAGEWORKS_REGISTRY_DIR") else "default"
        )
    if values["names_path"] is None:
        # next to the state file, so a test or a second deployment that moves one moves both
        values["names_path"] = os.path.join(os.path.dirname(values["vllm_state_path"]), "model_ids.json")
    if values["vllm_command"] is None:
        values["vllm_command"] = _default_vllm_command()
    if values["log_level"].upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        where = _where(_BY_ATTR["log_level"], sources["log_level"], file, file_path)
        raise ConfigError(f"{where}={values['log_level']!r}: expected DEBUG, INFO, WARNING or ERROR")
    values["log_level"] = values["log_level"].upper()
    warnings = unknown_variables(env) + [f"{file_path}: {w}" for w in (file.warnings if file else ())]
    return Config(**values, sources=sources, warnings=tuple(warnings))


def _where(setting: Setting, source: str, file: Any, file_path: str | None) -> str:
    """How an error names where a bad value came from: the option, the variable or the file's key."""
    if source == "command line":
        return "--" + setting.attr.replace("_", "-")
    if source == "file" and file is not None:
        return f"{setting.env} ({file.places.get(setting.attr, setting.attr)} in {file_path})"
    return setting.env


def describe_config(config: Config) -> list[tuple[str, str, str, str]]:
    """Rows of (variable, effective value, source, meaning) for ``--print-config``; API keys are masked.

    An unset value is shown as "".
    """
    rows = []
    for s in SETTINGS:
        value = getattr(config, s.attr)
        if s.attr in ("api_keys", "admin_keys"):
            shown = f"<{len(value)} key(s)>" if value else ""
        elif isinstance(value, bool):
            shown = "1" if value else "0"
        elif value is None or (isinstance(value, (dict, tuple, list)) and not value):
            shown = ""  # unset
        elif isinstance(value, float):
            # 120, not 120.0: the spelling the configuration table in the docs uses
            shown = str(int(value)) if value.is_integer() else repr(value)
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            shown = ",".join(value)  # the form the variable is written in
        elif isinstance(value, (dict, tuple, list)):
            shown = orjson.dumps(value).decode()
        else:
            shown = str(value)
        rows.append((s.env, shown, config.sources.get(s.attr, "default"), s.help))
    return rows
