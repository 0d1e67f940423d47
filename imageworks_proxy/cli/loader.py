"""``imageworks-loader``: list the registry's models and control the vLLM models (docs/vllm.md).

``activate-model NAME``, ``activate-model --stop``, ``current-model``, and with sleep mode ``sleep-model``
and ``stop-model NAME``, go through the running proxy's admin API when it answers; otherwise they act
directly on the state file and the processes it names, with the same code the proxy uses (a pid whose
command line does not match the file is never signalled). Acting directly needs the state file's lock:
while a proxy holds it, the loader talks to that proxy (at the URL it wrote into the lock file) instead. A
model started here keeps running after the command exits; the proxy adopts it when it starts. ``list``
shows what the proxy's ``/v1/models`` would, by the same rules.
Exit codes: 0 ok, 1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import orjson

from imageworks_proxy import keys
from imageworks_proxy.catalogue.registry import Entry, RegistryError
from imageworks_proxy.config import Config, ConfigError, load_config
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.vllm.lock import StateLock, StateLockHeld
from imageworks_proxy.vllm.supervisor import Instance, VllmSupervisor

OK, FAILED, USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imageworks-loader",
        description="Inspect models and control the active vLLM model of imageworks-proxy. "
        "Talks to the running "
        "proxy's admin API when it is reachable, else works directly on CHAT_PROXY_VLLM_STATE_PATH.",
    )
    p.add_argument("--url", help="the proxy's base URL (default: http://CHAT_PROXY_HOST:CHAT_PROXY_PORT)")
    p.add_argument("--direct", action="store_true", help="do not try the admin API; act on the state file")
    p.add_argument(
        "--api-key",
        help="key for the admin API (default: the first of CHAT_PROXY_ADMIN_KEYS, else of "
        "CHAT_PROXY_API_KEYS; prefer those variables: other users can see command lines)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registry's models: id, logical name, backend, installed, status, "
                   "listed (or why /v1/models hides it)")
    sub.add_parser("current-model", help="print the active vLLM model (and sleeping ones) as JSON, or null")
    act = sub.add_parser("activate-model", help="start NAME as the active vLLM model, or --stop it")
    act.add_argument("name", nargs="?", help="logical name or listed id of an orchestrated vLLM model")
    act.add_argument("--stop", action="store_true", help="stop the active vLLM model and every sleeping one")
    slp = sub.add_parser("sleep-model", help="put the active vLLM model to sleep (sleep mode)")
    slp.add_argument("name", nargs="?", help="the active model's name (optional)")
    stp = sub.add_parser("stop-model", help="stop vLLM model NAME, awake or asleep")
    stp.add_argument("name", help="logical name of the model")
    return p


def _print(data: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _err(msg: str) -> None:
    print(f"imageworks-loader: {msg}", file=sys.stderr)


# -- registry ------------------------------------------------------------------------------------
async def _list_rows(config: Config) -> list[dict[str, Any]] | None:
    """The proxy's own catalogue, built as a proxy builds it (its adapters decide installed and status)."""
    from imageworks_proxy.app import create_app

    app = create_app(config)
    models = keys.models(app)
    if models.store.error:
        _err(models.store.error)
        return None
    async with aiohttp.ClientSession() as session:
        app[keys.HTTP] = session
        # Ask each backend server once and wait for the answers (a proxy does this in the background).
        await asyncio.gather(
            *(a.check_upstreams(models.entries_for(a)) for a in models.adapters.values()),
            return_exceptions=True,
        )
        rows = await models.survey()
    return [
        {
            "id": row.id,
            "logical_name": row.entry.name,
            "backend": row.entry.backend,
            "installed": row.installed,
            "status": row.status,
            "listed": row.hidden is None,
            "hidden_because": row.hidden,
        }
        for row in rows
    ]


def cmd_list(config: Config) -> int:
    logging.basicConfig(level=logging.CRITICAL)  # a registry error is printed below, once
    rows = asyncio.run(_list_rows(config))
    if rows is None:
        return FAILED
    _print(rows)
    return OK


# -- admin API -----------------------------------------------------------------------------------
class Unreachable(Exception):
    pass


def _base_url(config: Config, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host = config.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.port}"


def admin_key(config: Config, given: str | None) -> str | None:
    """The key the loader sends: ``--api-key``, else the first admin key, else the first API key."""
    return given or next(iter(config.admin_keys + config.api_keys), None)


def _call(config: Config, base: str, method: str, path: str, body: Any = None, timeout: float = 5.0,
          key: str | None = None) -> Any:
    """One admin API call; raises ``Unreachable`` when nothing listens, ``ProxyError`` for an error answer."""
    headers = {"Accept": "application/json"}
    key = admin_key(config, key)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return orjson.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            err = orjson.loads(exc.read()).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            err = {}
        raise ProxyError(
            exc.code, str(err.get("code") or "http_error"), str(err.get("message") or exc.reason)
        ) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        raise Unreachable(str(getattr(exc, "reason", exc))) from None


def _with_sleepers(current: dict[str, Any] | None, sleeping: list[dict[str, Any]], source: str) -> Any:
    """``current`` plus the sleeping models (sleep mode); without any, ``current`` as it is."""
    if not sleeping:
        return current
    if current is None:
        current = {"logical_name": None, "state": "stopped", "source": source}
    return {**current, "sleeping": sleeping}


def _current_from_api(state: dict[str, Any]) -> dict[str, Any] | None:
    current = None
    if state.get("active"):
        current = {
            "logical_name": state["active"],
            "state": state.get("state"),
            "served_model_id": state.get("served_model_id"),
            "pid": state.get("pid"),
            "port": state.get("port"),
            "started_at": state.get("started_at"),
            "source": "proxy",
        }
    sleeping = [{**s, "logical_name": s.get("model")} for s in state.get("sleeping") or []]
    for item in sleeping:
        item.pop("model", None)
    return _with_sleepers(current, sleeping, "proxy")


def via_api(config: Config, base: str, args: argparse.Namespace) -> int:
    long_wait = config.vllm_start_timeout_s + 2 * config.vllm_stop_timeout_s + 60
    key = args.api_key
    if args.command == "current-model":
        _print(_current_from_api(_call(config, base, "GET", "/v1/admin/vllm", key=key)["vllm"]))
    elif args.command in ("sleep-model", "stop-model"):
        verb = "sleep" if args.command == "sleep-model" else "stop"
        body = {"model": args.name} if args.name else {}
        path = f"/v1/admin/vllm/{verb}"
        state = _call(config, base, "POST", path, body, timeout=long_wait, key=key)["vllm"]
        _print(_current_from_api(state))
    elif args.stop:
        _call(config, base, "POST", "/v1/admin/vllm/stop", {}, timeout=long_wait, key=key)
        print("stopped", file=sys.stderr)
        _print(None)
    else:
        print(f"activating {args.name!r} through the proxy at {base} ...", file=sys.stderr)
        state = _call(
            config, base, "POST", "/v1/admin/vllm/activate", {"model": args.name}, timeout=long_wait, key=key
        )["vllm"]
        _print(_current_from_api(state))
    return OK


# -- direct (no proxy running) -------------------------------------------------------------------
def _current(inst: Instance, state: str) -> dict[str, Any]:
    return {
        "logical_name": inst.logical_name,
        "state": state,
        "served_model_id": inst.served_model_id,
        "pid": inst.pid,
        "port": inst.port,
        "started_at": inst.started_at,
        "log_path": inst.log_path,
        "source": "state-file",
    }


def _direct_state(sup: VllmSupervisor) -> Any:
    inst = sup.instance
    current = None if inst is None else _current(inst, "loaded" if inst.ready else "loading")
    sleeping = [
        {"logical_name": s.logical_name, "served_model_id": s.served_model_id, "pid": s.pid, "port": s.port,
         "sleep_level": s.sleep_level, "asleep_since": s.asleep_since}
        for s in sup.sleepers
    ]
    return _with_sleepers(current, sleeping, "state-file")


async def _direct_sleep_or_stop(config: Config, sup: VllmSupervisor, args: argparse.Namespace) -> int:
    """``sleep-model`` and ``stop-model`` without a proxy."""
    if args.command == "stop-model":
        if not await sup.stop_model(args.name, "imageworks-loader stop-model"):
            _err(f"no vLLM runs model {args.name!r}")
            return FAILED
    else:
        if not config.vllm_sleep_level:
            _err("vLLM sleep mode is off; set CHAT_PROXY_VLLM_SLEEP_LEVEL=1 or 2 to put models to sleep")
            return FAILED
        inst = sup.instance
        if inst is None or (args.name and inst.logical_name != args.name):
            _err(f"{args.name!r} is not the awake vLLM model" if args.name else "no vLLM model is awake")
            return FAILED
        outcome = await sup.evict(inst.logical_name, "imageworks-loader sleep-model")
        if outcome.action != "sleep":
            _err(f"{inst.logical_name!r} could not be put to sleep and was stopped instead (see above)")
    _print(_direct_state(sup))
    return OK


async def direct(config: Config, args: argparse.Namespace) -> int:
    """Act on the state file and processes without a proxy, through the same objects a proxy builds
    (its routing, its orchestrator's supervisor, its Ollama adapter); nothing is started but vLLM."""
    from imageworks_proxy.adapters.ollama.adapter import OllamaAdapter
    from imageworks_proxy.adapters.vllm_orchestrated import VllmOrchestratedAdapter
    from imageworks_proxy.app import create_app
    from imageworks_proxy.pipeline.template import check_template

    app = create_app(config)
    models = keys.models(app)
    orchestrator = next((a for a in models.adapters.values() if isinstance(a, VllmOrchestratedAdapter)), None)
    if orchestrator is None:
        _err("the vLLM orchestrator adapter is not loaded")
        return FAILED
    entry: Entry | None = None
    if args.command == "activate-model" and not args.stop:
        if models.store.error:
            raise RegistryError(models.store.error)
        entry = models.resolve(args.name)
        if models.adapter_for(entry) is not orchestrator:
            _err(
                f"{entry.name!r} is not an orchestrated vLLM model (backend {entry.backend!r}); "
                "nothing to activate"
            )
            return FAILED
        if config.require_template:
            check_template(entry)
    gpu = keys.gpu(app)
    async with aiohttp.ClientSession() as session:
        app[keys.HTTP] = session
        await asyncio.to_thread(gpu.open)
        sup = orchestrator.supervisor
        try:
            await sup.adopt()
            if args.command == "current-model":
                _print(_direct_state(sup))
            elif args.command in ("sleep-model", "stop-model"):
                code = await _direct_sleep_or_stop(config, sup, args)
                await sup.close(keep=True)
                return code
            elif args.stop:
                for inst in sup.instances:
                    print(f"stopping {inst.logical_name!r} (pid {inst.pid}) ...", file=sys.stderr)
                await sup.stop_all("imageworks-loader activate-model --stop")
                _print(None)
                return OK
            else:
                assert entry is not None
                if config.gpu_exclusive:
                    for adapter in models.adapters.values():
                        if isinstance(adapter, OllamaAdapter):
                            await adapter.free_gpu()
                print(
                    f"activating {entry.name!r} (no proxy reachable; starting it directly) ...",
                    file=sys.stderr,
                )
                _print(_current(await sup.ensure(entry), "loaded"))
            await sup.close(keep=True)
            return OK
        finally:
            gpu.close()


def direct_with_lock(config: Config, args: argparse.Namespace, tried: str | None) -> int:
    """Act directly while holding the state file's lock; when a proxy holds it, go through that proxy's
    admin API instead (unless ``--direct`` was asked for, or its URL is the one that did not answer)."""
    lock = StateLock(config.vllm_state_path)
    try:
        lock.acquire({"pid": os.getpid(), "program": "imageworks-loader"})
    except StateLockHeld as exc:
        url = exc.holder.get("url")
        if args.direct or not isinstance(url, str) or url == tried:
            _err(str(exc))
            return FAILED
        try:
            return via_api(config, url, args)
        except Unreachable:
            _err(str(exc))
            return FAILED
    try:
        return asyncio.run(direct(config, args))
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "activate-model" and bool(args.name) == bool(args.stop):
        parser.print_usage(sys.stderr)
        _err("activate-model needs either a NAME or --stop")
        return USAGE
    try:
        config = load_config()
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return USAGE
    if args.command == "list":
        return cmd_list(config)
    logging.basicConfig(level=logging.WARNING, format="imageworks-loader: %(message)s")
    try:
        tried = None
        if not args.direct:
            tried = _base_url(config, args.url)
            try:
                _call(config, tried, "GET", "/v1/health", timeout=2.0)
            except Unreachable:
                if args.url:
                    _err(f"no proxy answers at {tried}")
                    return FAILED
            else:
                return via_api(config, tried, args)
        return direct_with_lock(config, args, tried)
    except ProxyError as exc:
        _err(f"{exc.message} ({exc.code})")
        if exc.hint:
            print(f"  {exc.hint}", file=sys.stderr)
        return FAILED
    except (RegistryError, Unreachable) as exc:
        _err(str(exc))
        return FAILED
    except KeyboardInterrupt:
        return FAILED
