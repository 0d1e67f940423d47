"""The vLLM command line for a registry entry.

``<CHAT_PROXY_VLLM_COMMAND> <model> --host <host> --port <port> --served-model-name <id>
--gpu-memory-utilization <u> [--max-model-len <n>] [--chat-template <path>] [--enable-auto-tool-choice
--tool-call-parser <name>] [--reasoning-parser <name>] [--enable-sleep-mode] <extra_args>``. The model goes
first, as ``vllm serve`` takes it, when the launcher ends with ``serve``; otherwise (the older ``python -m
vllm.entrypoints.openai.api_server``) as ``--model <path>``. A flag that ``extra_args`` already carries is
not added again, so the registry can override any flag set here. ``--enable-sleep-mode`` (and
``VLLM_SERVER_DEV_MODE=1`` in the environment, which vLLM needs to serve its sleep API) come with
``CHAT_PROXY_VLLM_SLEEP_LEVEL`` 1 or 2. docs/vllm.md shows the command.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

import attrs

from imageworks_proxy.catalogue.capabilities import Capabilities
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.config import Config
from imageworks_proxy.errors import ProxyError


@attrs.frozen
class VllmCommand:
    """A launch plan: the full argv, how many leading words are the launcher, and the effective values."""

    argv: tuple[str, ...]
    #: ``argv[:prefix_len]`` is ``CHAT_PROXY_VLLM_COMMAND``; the rest are the flags.
    prefix_len: int
    host: str
    port: int
    served_model_id: str
    gpu_memory_utilization: float
    #: Launched with ``--enable-sleep-mode``: needs ``VLLM_SERVER_DEV_MODE=1`` (:attr:`env`).
    sleep_mode: bool = False

    @property
    def flags(self) -> tuple[str, ...]:
        """The part that identifies the model and its settings (the launcher path may legitimately differ
        between the proxy and ``imageworks-loader``)."""
        return self.argv[self.prefix_len:]

    @property
    def env(self) -> dict[str, str]:
        """Environment variables to add to the proxy's own for this launch."""
        return {"VLLM_SERVER_DEV_MODE": "1"} if self.sleep_mode else {}


def without_port(flags: Sequence[str]) -> tuple[str, ...]:
    """``flags`` minus ``--port N``: what identifies a model and its settings when every instance gets a
    port of its own (sleep mode)."""
    out: list[str] = []
    skip = False
    for arg in flags:
        if skip:
            skip = False
        elif arg == "--port":
            skip = True
        elif not arg.startswith("--port="):
            out.append(arg)
    return tuple(out)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag value`` or ``--flag=value`` in ``args`` (last one wins), else ``None``."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.partition("=")[2]
    return value


def loaded_model(flags: Sequence[str]) -> str | None:
    """What a vLLM command line (its flags) loads: ``--model``'s value, else its first argument when that is
    not an option (``vllm serve <model>``); ``None`` when neither."""
    value = flag_value(flags, "--model")
    if value is None and flags and not flags[0].startswith("-"):
        return flags[0]
    return value


def has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def launcher(config: Config) -> list[str]:
    words = shlex.split(config.vllm_command)
    if not words:
        raise ProxyError(
            503, "model_start_failed", "CHAT_PROXY_VLLM_COMMAND is empty; nothing to launch vLLM with"
        )
    return words


def model_source(entry: Entry) -> str | None:
    """What vLLM loads: ``backend_config.model_path``, else ``download_path`` (a hub id or a directory)."""
    path = entry.backend_config.model_path or entry.download_path
    if not path:
        return None
    return os.path.expanduser(path) if path.startswith("~") else path


def build_command(config: Config, entry: Entry, *, port: int | None = None) -> VllmCommand:
    """Build the launch plan for ``entry`` on ``port`` (default ``CHAT_PROXY_VLLM_PORT``).

    Raises ``ProxyError`` 503 ``model_start_failed`` when the entry names nothing to load.
    """
    prefix = launcher(config)
    extra = list(entry.backend_config.extra_args)
    flags: list[str] = []

    def add(flag: str, value: object) -> None:
        if not has_flag(extra, flag):
            flags.extend((flag, str(value)))

    source = model_source(entry)
    if source is None and not has_flag(extra, "--model"):
        raise ProxyError(
            503,
            "model_start_failed",
            f"Model {entry.name!r} has neither backend_config.model_path nor download_path, so there is "
            "nothing for vLLM to load.",
        )
    if source is not None and prefix[-1] == "serve" and not has_flag(extra, "--model"):
        # `vllm serve` takes the model as its first argument (its --model option is deprecated)
        flags.append(source)
    elif source is not None:
        add("--model", source)
    add("--host", config.vllm_host)
    add("--port", config.vllm_port if port is None else port)
    add("--served-model-name", entry.upstream_model)
    add("--gpu-memory-utilization", config.vllm_gpu_memory_utilization)
    if config.vllm_max_model_len:
        add("--max-model-len", config.vllm_max_model_len)
    if entry.chat_template_path:
        add("--chat-template", os.path.expanduser(entry.chat_template_path))
    bc = entry.backend_config
    if bc.tool_call_parser:
        # vLLM answers 400 to every request with tools unless it has both flags
        if not has_flag(extra, "--enable-auto-tool-choice"):
            flags.append("--enable-auto-tool-choice")
        add("--tool-call-parser", bc.tool_call_parser)
    if bc.reasoning_parser:
        add("--reasoning-parser", bc.reasoning_parser)
    sleep_mode = config.vllm_sleep_level > 0
    if sleep_mode and not has_flag(extra, "--enable-sleep-mode"):
        flags.append("--enable-sleep-mode")
    argv = (*prefix, *flags, *extra)
    all_flags = argv[len(prefix):]
    port_text = flag_value(all_flags, "--port") or str(config.vllm_port)
    try:
        port = int(port_text)
    except ValueError:
        raise ProxyError(
            503,
            "model_start_failed",
            f"Model {entry.name!r}: extra_args give --port {port_text!r}, " "which is not a port number",
        ) from None
    util_text = flag_value(all_flags, "--gpu-memory-utilization")
    try:
        util = float(util_text) if util_text else config.vllm_gpu_memory_utilization
    except ValueError:
        util = config.vllm_gpu_memory_utilization
    served = flag_value(all_flags, "--served-model-name") or entry.upstream_model
    return VllmCommand(
        argv=tuple(argv),
        prefix_len=len(prefix),
        host=flag_value(all_flags, "--host") or config.vllm_host,
        port=port,
        served_model_id=served,
        gpu_memory_utilization=util,
        sleep_mode=sleep_mode,
    )


def launch_capabilities(flags: Sequence[str]) -> Capabilities:
    """What a vLLM started with ``flags`` can take: tools when it has ``--enable-auto-tool-choice`` and
    ``--tool-call-parser`` (without them it refuses requests with tools; a model run with
    ``--tokenizer-mode mistral`` is left unknown, vLLM lets those through), reasoning when it has a
    ``--reasoning-parser`` (without one it is unknown: the chat template may still think)."""
    parser = flag_value(flags, "--tool-call-parser")
    tools = has_flag(flags, "--enable-auto-tool-choice") and bool(parser)
    out: dict[str, bool] = {}
    if tools:
        out["tools"] = True
    elif flag_value(flags, "--tokenizer-mode") != "mistral":
        out["tools"] = False
    reasoning = flag_value(flags, "--reasoning-parser")
    if reasoning and reasoning.lower() != "none":
        out["reasoning"] = True
    source = (
        "vLLM's launch flags"
        if out.get("tools", True)
        else "vLLM is started without --enable-auto-tool-choice and --tool-call-parser; set "
        "backend_config.tool_call_parser in the registry to give it tools"
    )
    return Capabilities(out, source)
