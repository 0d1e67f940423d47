"""``imageworks-loader``: list the registry's models and control the active vLLM model (SPEC §11)."""

from __future__ import annotations

import argparse
import sys

import orjson

from imageworks_proxy.config import ConfigError, load_config
from imageworks_proxy.naming import build_catalogue
from imageworks_proxy.adapters.base import default_installed
from imageworks_proxy.registry import RegistryError, load_registry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imageworks-loader", description="Inspect models and control the active vLLM model.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registry's models: id, logical name, backend, installed")
    return p


def cmd_list(config) -> int:
    try:
        registry = load_registry(config.registry)
    except RegistryError as exc:
        print(f"imageworks-loader: {exc}", file=sys.stderr)
        return 1
    catalogue = build_catalogue(registry.entries)
    rows = [
        {"id": item.id, "logical_name": item.entry.name, "backend": item.entry.backend,
         "installed": default_installed(item.entry)}
        for item in catalogue.listed
    ]
    print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"imageworks-loader: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "list":
        return cmd_list(config)
    return 2
