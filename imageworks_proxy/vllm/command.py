"""The vLLM command line for a registry entry.

``<CHAT_PROXY_VLLM_COMMAND> --model <path> --host <host> --port <port> --served-model-name <id>
--gpu-memory-utilization <u> [--max-model-len <n>] [--chat-template <path>] [--enable-sleep-mode]
<extra_args>``; a flag that ``extra_args`` already carries is not added again, so the registry can
override any flag set here. ``--enable-sleep-mode`` (and ``VLLM_SERVER_DEV_MODE=1`` in the environment,
which vLLM needs to serve its sleep API) come with ``CHAT_PROXY_VLLM_SLEEP_LEVEL`` 1 or 2.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

import attrs

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
    if source is not None:
        add("--model", source)
    add("--host", config.vllm_host)
    add("--port", config.vllm_port if port is None else port)
    add("--served-model-name", entry.upstream_model)
    add("--gpu-memory-utilization", config.vllm_gpu_memory_utilization)
    if config.vllm_max_model_len:
        add("--max-model-len", config.vllm_max_model_len)
    if entry.chat_template_path:
        add("--chat-template", os.path.expanduser(entry.chat_template_path))
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
