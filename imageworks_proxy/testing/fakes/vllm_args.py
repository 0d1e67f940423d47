"""The command line of the fake vLLM (:mod:`imageworks_proxy.testing.fakes.vllm`), checked the way vLLM 0.33
checks its own: the options it has (``data/vllm-0.33.0-flags.txt``; the fake's ``--fake-*`` controls
besides), ``vllm serve <model>`` or the older ``api_server`` form, and the tool and reasoning parser names
(``data/vllm-0.33.0-parsers.txt``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__:
    from imageworks_proxy.testing.fakes.vllm_sleep import add_arguments
else:  # run as a script: this file's folder is on sys.path
    from vllm_sleep import add_arguments  # type: ignore[no-redef]

DATA = Path(__file__).resolve().parents[1] / "data"
#: What vLLM serves when its api_server form is given no ``--model``.
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"


def vllm_options() -> frozenset[str]:
    """Every long option of vLLM 0.33.0's ``vllm serve``."""
    lines = (DATA / "vllm-0.33.0-flags.txt").read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.startswith("--"))


def vllm_parsers() -> dict[str, frozenset[str]]:
    """``{"--tool-call-parser": names, "--reasoning-parser": names}`` as vLLM 0.33.0 registers them."""
    out: dict[str, set[str]] = {}
    section: set[str] | None = None
    for line in (DATA / "vllm-0.33.0-parsers.txt").read_text().splitlines():
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), set())
        elif line.strip() and not line.startswith("#") and section is not None:
            section.add(line.strip())
    return {k: frozenset(v) for k, v in out.items()}


def _usage_error(serve: bool, message: str) -> None:
    prog = "vllm serve" if serve else "api_server.py"
    usage = "vllm serve [model_tag] [options]" if serve else "api_server.py [-h] [options]"
    print(f"usage: {usage}\n{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _check_options(argv: list[str], serve: bool) -> None:
    known = vllm_options()
    bad = [a for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]
    bad = [a for a in bad if not a.startswith("--fake-")]
    if bad:
        _usage_error(serve, f"unrecognized arguments: {' '.join(bad)}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fake_vllm", allow_abbrev=False)
    p.add_argument("--model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--chat-template")
    p.add_argument("--runner", default="auto")
    p.add_argument("--enable-auto-tool-choice", action="store_true")
    p.add_argument("--tool-call-parser")
    p.add_argument("--tool-parser-plugin")
    p.add_argument("--reasoning-parser")
    p.add_argument("--reasoning-parser-plugin")
    p.add_argument(
        "--fake-start-delay", type=float, default=float(os.environ.get("FAKE_VLLM_START_DELAY", 0.2))
    )
    p.add_argument("--fake-fail", default=os.environ.get("FAKE_VLLM_FAIL"))
    p.add_argument("--fake-crash-after", type=int)
    p.add_argument("--fake-stop-delay", type=float, default=0.0)
    p.add_argument("--fake-ignore-sigterm", action="store_true")
    p.add_argument("--fake-engine-child", action="store_true")
    p.add_argument("--fake-events", default=os.environ.get("FAKE_VLLM_EVENTS"))
    p.add_argument("--fake-lock", default=os.environ.get("FAKE_VLLM_LOCK"))
    p.add_argument("--fake-reply", choices=["pid", "echo", "tools", "missing"], default="pid")
    add_arguments(p)
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """vLLM's arguments -> (the options the fake uses, the rest). Exits like vLLM on a bad command line."""
    serve = argv[:1] == ["serve"]
    argv = argv[1:] if serve else argv
    _check_options(argv, serve)
    args, rest = _parser().parse_known_args(argv)
    positional = rest[0] if rest and not rest[0].startswith("-") else None
    if serve and args.model is not None:
        print("WARNING With `vllm serve`, you should provide the model as a positional argument or in a "
              "config file instead of via the `--model` option.", flush=True)
    if serve and positional is not None and args.model is None:
        args.model = positional
        rest = rest[1:]
    args.model = args.model or DEFAULT_MODEL
    return args, rest


def check_parsers(args: argparse.Namespace) -> str | None:
    """vLLM's start-up checks of the tool and reasoning options: the error it dies with, else ``None``."""
    parsers = vllm_parsers()
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        return "TypeError: Error: --enable-auto-tool-choice requires --tool-call-parser"
    tools = parsers["--tool-call-parser"]
    if args.enable_auto_tool_choice and args.tool_call_parser not in tools and not args.tool_parser_plugin:
        listed = ",".join(sorted(tools))
        return f"KeyError: 'invalid tool call parser: {args.tool_call_parser} (chose from {{ {listed} }})'"
    reasoning = parsers["--reasoning-parser"]
    name = args.reasoning_parser
    if name and name.lower() != "none" and name not in reasoning and not args.reasoning_parser_plugin:
        listed = ",".join(sorted(reasoning))
        return f"KeyError: 'invalid reasoning parser: {name} (chose from {{ {listed} }})'"
    return None
