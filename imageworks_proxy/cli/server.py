"""``imageworks-chat-proxy``: run the server, or show its configuration and plugins."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy._version import __version__
from imageworks_proxy.catalogue.registry import registry_files
from imageworks_proxy.cli.logs import configure_logging
from imageworks_proxy.config import PREFIX, Config, ConfigError, describe_config, load_config
from imageworks_proxy.http.server import run
from imageworks_proxy.plugins import PluginError
from imageworks_proxy.vllm.lock import StateLockHeld

log = logging.getLogger("imageworks_proxy")

#: The options that mirror a setting: option -> (setting, help). The command line wins over everything.
OPTIONS = {
    "--host": ("host", "bind address (CHAT_PROXY_HOST)"),
    "--port": ("port", "listen port (CHAT_PROXY_PORT)"),
    "--registry": ("registry", "registry JSON file or ImageWorks registry folder (CHAT_PROXY_REGISTRY)"),
    "--config": ("config_file", "TOML settings file (CHAT_PROXY_CONFIG_FILE)"),
    "--log-level": ("log_level", "DEBUG, INFO, WARNING or ERROR (CHAT_PROXY_LOG_LEVEL)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imageworks-chat-proxy",
        description="OpenAI-compatible chat proxy over an ImageWorks model registry. Settings come from "
        "these options, then CHAT_PROXY_* environment variables, then the TOML file (see --print-config "
        "and docs/configuration.md).",
    )
    for option, (attr, text) in OPTIONS.items():
        p.add_argument(option, dest=attr, metavar=option[2:].upper().replace("-", "_"), help=text)
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print each setting, its value, its source and what it does, then exit",
    )
    p.add_argument(
        "--list-plugins", action="store_true", help="list the loaded plugins and their adapters, then exit"
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_keys: tuple[str, ...]) -> str | None:
    """The loud start-up warning for a proxy reachable beyond this machine without API keys."""
    if is_loopback(host) or api_keys:
        return None
    return (
        f"!!! Listening on {host} without API keys: anyone who can reach this port can use your models. "
        "Set CHAT_PROXY_API_KEYS or bind CHAT_PROXY_HOST=127.0.0.1. !!!"
    )


def _print_plugins(app: web.Application) -> list[str]:
    from imageworks_proxy.http.views.info import plugin_listing

    listing = plugin_listing(app)
    lines = []
    for p in listing["data"]:
        adapters = ", ".join(f"{a['name']} ({'/'.join(a['backends']) or '-'})" for a in p["adapters"]) or "-"
        stages = ", ".join(p["stages"]) or "-"
        lines.append(f"{p['name']:<28} {p['distribution'] or '-'} {p['version'] or ''}".rstrip())
        lines.append(f"    adapters: {adapters}")
        if p["stages"]:
            lines.append(f"    stages: {stages}")
    lines += [f"{f['name']:<28} FAILED: {f['error']}" for f in listing["errors"]]
    return lines


def _config_lines(config: Config) -> list[str]:
    rows = describe_config(config)
    width = max(len(r[0]) for r in rows)
    source_width = max(len(r[2]) for r in rows) + 2
    return [
        f"{env:<{width}}  {value!s:<40}  {f'({source})':<{source_width}}  {meaning}"
        for env, value, source, meaning in rows
    ]


def _emit(lines: list[str]) -> int:
    """Print ``lines``; a reader that stops early (``| head``) ends the output quietly."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's own flush at exit does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def registry_missing(config: Config) -> str | None:
    """One line when the registry the config names does not exist (a folder counts when it holds a
    registry file), naming the path and what set it; ``None`` when it exists."""
    path = config.registry
    if os.path.isdir(path):
        if any(f.exists() for f in registry_files(path)):
            return None
        what = f"the registry folder {path!r} holds no model_registry.json (nor curated/discovered layers)"
    elif os.path.exists(path):
        return None
    else:
        what = f"registry not found: {path!r}"
    setter = {
        "command line": "--registry",
        "env": f"{PREFIX}REGISTRY",
        "env (IMAGEWORKS_REGISTRY_DIR)": "IMAGEWORKS_REGISTRY_DIR",
        "file": f"registry in {config.config_file}",
    }.get(config.sources.get("registry", "default"))
    if setter:
        return f"{what} (from {setter})"
    return f"{what} (the default; point --registry or {PREFIX}REGISTRY at a registry file or folder)"


def address_in_use(host: str, port: int) -> str | None:
    """Why nothing new can listen on ``host:port`` because something already does, else ``None``.

    Checked before the app starts, so a second proxy started by mistake on a busy port stops before it
    touches anything; other bind problems are left to the server, which reports them itself."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return exc.strerror or "address already in use"
    return None


def _summary_ctx(address: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that logs the start-up summary in the background once the app has started."""
    from imageworks_proxy import keys
    from imageworks_proxy.catalogue.summary import startup_summary

    async def report(app: web.Application) -> None:
        try:
            level, text = await startup_summary(keys.models(app), version=__version__, address=address)
        except Exception:
            log.exception("the start-up summary failed")
            return
        log.log(level, "%s", text)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(report(app), name="startup-summary")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


#: Allocations between two young-generation collections (Python's default is 700).
GC_YOUNG_THRESHOLD = 10_000


async def _freeze_startup_objects(app: web.Application) -> None:
    """Hide what start-up built (registry, catalogue, plugins, adapters) from the cyclic garbage collector,
    and let the young generation grow larger before it is collected.

    Those objects live as long as the process, yet every full collection rescanned them: a 500-entry
    ``/v1/models`` allocates enough to set one off every few calls (p99 about 28 ms; with this, 4 ms).
    A young collection costs about what the requests in flight hold, not what was allocated since the
    last one, so under load fewer, larger ones cost less (5-7 % less CPU per chat at concurrency 32,
    docs/benchmarks.md). Process-wide, so only the command-line server does it, once, before any
    request exists.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _fail(kind: str, message: str, code: int = 2) -> int:
    print(f"imageworks-chat-proxy: {kind}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(command_line={attr: getattr(args, attr) for attr, _ in OPTIONS.values()})
    except ConfigError as exc:
        return _fail("configuration error", str(exc))
    if args.print_config:
        for warning in config.warnings:
            print(f"imageworks-chat-proxy: warning: {warning}", file=sys.stderr)
        return _emit(_config_lines(config))
    if args.list_plugins:
        # The listing shows plugin failures itself; a registry problem is not what was asked about.
        configure_logging("CRITICAL")
        from imageworks_proxy.app import create_app

        try:
            return _emit(_print_plugins(create_app(config)))
        except PluginError as exc:
            return _fail("plugin error", str(exc))
    return serve(config)


def serve(config: Config) -> int:
    """Run the server until it is stopped; returns the exit code (docs/configuration.md)."""
    missing = registry_missing(config)
    if missing:
        return _fail("error", missing)
    busy = address_in_use(config.host, config.port)
    if busy:
        return _fail("error", f"cannot listen on {config.host}:{config.port}: {busy} "
                     "(is another proxy running? --port picks another port)", 1)
    writer = configure_logging(config.log_level)
    for warning in config.warnings:
        log.warning("%s", warning)
    from imageworks_proxy.app import create_app
    from imageworks_proxy.http.middlewares import access_log

    try:
        app = create_app(config)
    except PluginError as exc:
        return _fail("plugin error", str(exc))
    app[keys.ACCESS_LINES] = writer.direct(access_log)
    warning = exposure_warning(config.host, config.api_keys)
    if warning:
        log.warning(warning)
    if "*" in config.allowed_origins and not config.api_keys:
        log.warning("!!! CHAT_PROXY_ALLOWED_ORIGINS=* without API keys: any web page you visit can use your "
                    "models. Set CHAT_PROXY_API_KEYS or list the origins you use. !!!")
    if not is_loopback(config.host) and not config.allowed_hosts:
        log.info("answering requests addressed to an IP address, localhost or %s; add the other names "
                 "clients use to CHAT_PROXY_ALLOWED_HOSTS", socket.gethostname())
    app.on_startup.append(_freeze_startup_objects)  # after the app's own start-up (cleanup contexts)
    host = f"[{config.host}]" if ":" in config.host else config.host
    app.cleanup_ctx.append(_summary_ctx(f"http://{host}:{config.port}"))
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    try:
        run(app, config, loop=loop)
    except StateLockHeld as exc:
        return _fail("error", str(exc))
    except OSError as exc:
        print(
            f"imageworks-chat-proxy: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0
