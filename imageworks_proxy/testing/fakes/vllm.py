#!/usr/bin/env python3
"""A fake vLLM OpenAI server, run as a real subprocess by the orchestrator through
``CHAT_PROXY_VLLM_COMMAND`` (:func:`command` gives the value; ``python -m
imageworks_proxy.testing.fakes.vllm`` runs it too).

Accepts vLLM's flags (``--model --host --port --served-model-name --gpu-memory-utilization
--max-model-len --chat-template --runner`` and any other ``--flag``), serves ``/health``, ``/v1/models``,
``/v1/chat/completions`` (JSON and SSE) and ``/v1/completions`` (JSON); with ``--runner pooling`` it is an
embedding model instead, like vLLM: ``/v1/embeddings`` and no generation routes (404). Like vLLM it does
not accept connections until it is ready.

Test controls (flags, usually put in a registry entry's ``extra_args``):
  --fake-start-delay S     seconds before listening (default 0.2)
  --fake-fail MESSAGE      print a vLLM-like traceback ending in MESSAGE during start-up and exit 1
  --fake-crash-after N     die (exit 70) after N content chunks of a stream
  --fake-stop-delay S      on SIGTERM, wait S seconds before exiting
  --fake-ignore-sigterm    ignore SIGTERM (only SIGKILL stops it)
  --fake-engine-child      spawn an "engine core" child in the same process group that ignores SIGTERM
                           and holds the lock (like vLLM's EngineCore holding GPU memory)
  --fake-events PATH       append JSON lines {"event", "pid", "model", "t"} (start/ready/stop/crash/overlap)
  --fake-reply MODE        pid (default: "served by <name> pid <pid>"), echo ("echo: <last user text>"),
                           tools (calls get_weather({"city": "Paris"})), missing (404 model not found)
  --fake-lock PATH         take an exclusive flock on PATH for the process group's lifetime; if another
                           fake holds it, record an "overlap" event (two "GPU users" at once)
Started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` it serves vLLM's sleep API and releases
the lock while asleep (:mod:`imageworks_proxy.testing.fakes.vllm_sleep`, with its own flags). The ``start``
event carries ``exec_t``, when the process was created (``t`` and ``exec_t`` are ``time.monotonic()``).
Request body controls: ``fake_chunks`` (content chunks, default 3), ``fake_chunk_delay`` (seconds between
chunks), ``fake_delay`` (seconds before a non-streamed answer), ``fake_crash_after`` (as the flag).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import itertools
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

if __package__:
    from imageworks_proxy.testing.fakes.vllm_sleep import SleepMode, add_arguments
else:  # run as a script: this file's folder is on sys.path
    from vllm_sleep import SleepMode, add_arguments  # type: ignore[no-redef]

PID = os.getpid()
#: This file: run it with ``sys.executable`` followed by vLLM's flags.
SCRIPT = Path(__file__).resolve()


def command() -> str:
    """The ``CHAT_PROXY_VLLM_COMMAND`` value that launches this fake with the running interpreter."""
    return shlex.join([sys.executable, str(SCRIPT)])


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="fake_vllm")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--chat-template")
    p.add_argument("--runner", default="auto")
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
    args, unknown = p.parse_known_args(argv)
    bad = [a for a in unknown if a.startswith("-") and not a.startswith("--")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, unknown


def exec_time() -> float | None:
    """When this process was created, on the ``time.monotonic()`` clock (10 ms steps; None off Linux)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    return time.monotonic() - age


def last_user_text(body: dict) -> str:
    for msg in reversed(body.get("messages", [])):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            return " ".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text"
            )
    return ""


class Fake:
    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.args = args
        self.extra = extra
        self.served = (args.served_model_name or [args.model])[0]
        self.lock_fd: int | None = None
        self.sleep = SleepMode(args, self.event, lambda: self.lock_fd)

    def event(self, name: str, **more) -> None:
        if not self.args.fake_events:
            return
        line = json.dumps({"event": name, "pid": PID, "model": self.served, "t": time.monotonic(), **more})
        with open(self.args.fake_events, "a") as fh:
            fh.write(line + "\n")

    def take_lock(self) -> None:
        if not self.args.fake_lock:
            return
        fd = os.open(self.args.fake_lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.event("overlap")
            print("fake_vllm: ERROR another fake vLLM holds the GPU lock", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)  # wait for it, like a second vLLM fighting for memory
        os.set_inheritable(fd, True)
        self.lock_fd = fd

    def spawn_engine_child(self) -> None:
        code = (
            "import signal,time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(1)\n"
        )
        fds = (self.lock_fd,) if self.lock_fd is not None else ()
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", code], pass_fds=fds)  # same process group
        print(f"INFO fake EngineCore pid {child.pid}", flush=True)

    # -- HTTP ------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.served,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vllm",
                        "root": self.args.model,
                        "parent": None,
                        "max_model_len": self.args.max_model_len or 4096,
                    }
                ],
            }
        )

    def _crash(self) -> None:
        print("fatal: fake vLLM crashed mid-stream", file=sys.stderr, flush=True)
        self.event("crash")
        os._exit(70)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        refused = self.sleep.refuse_chat()
        if refused is not None:
            return refused
        body = await request.json()
        model = body.get("model")
        if model != self.served or self.args.fake_reply == "missing":
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{model}` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
                status=404,
            )
        text = f"served by {self.served} pid {PID}"
        if self.args.fake_reply == "echo":
            text = "echo: " + last_user_text(body)
        if self.sleep.garbage():
            text = "garbage: the weights were discarded and never reloaded"
        tool_call = None
        if self.args.fake_reply == "tools":
            # real vLLM says "chatcmpl-tool-<uuid>"; the conformance suite expects the OpenAI "call_" style
            tool_call = {
                "id": f"call_{PID}",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        n = max(1, int(body.get("fake_chunks", 3)))
        delay = float(body.get("fake_chunk_delay", 0))
        crash_after = body.get("fake_crash_after", self.args.fake_crash_after)
        cuts = [i * len(text) // n for i in range(n + 1)]
        parts = [text[a:b] for a, b in itertools.pairwise(cuts)]
        created = int(time.time())
        cid = f"chatcmpl-fake{PID}{int(time.monotonic() * 1000)}"
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
        if not body.get("stream"):
            await asyncio.sleep(float(body.get("fake_delay", 0)))
            if tool_call is not None:
                return web.json_response(
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": self.served,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                                "finish_reason": "tool_calls",
                                "logprobs": None,
                            }
                        ],
                        "usage": usage,
                    }
                )
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": self.served,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def chunk(delta, finish=None):
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.served,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }

        async def send(obj):
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        await send(chunk({"role": "assistant", "content": ""}))
        if tool_call is not None:  # like vLLM's parsers: name first, then argument fragments
            fn = tool_call["function"]
            await send(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": tool_call["id"],
                                "type": "function",
                                "function": {"name": fn["name"], "arguments": ""},
                            }
                        ]
                    }
                )
            )
            args = fn["arguments"]
            half = len(args) // 2
            for piece in (args[:half], args[half:]):
                await send(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
            parts = []
        for i, part in enumerate(parts):
            if crash_after is not None and i >= int(crash_after):
                self._crash()
            if delay:
                await asyncio.sleep(delay)
            await send(chunk({"content": part}))
        await send(chunk({}, "tool_calls" if tool_call is not None else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await send(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.served,
                    "choices": [],
                    "usage": usage,
                }
            )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("model") != self.served:
            error = {"message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError",
                     "param": None, "code": 404}
            return web.json_response({"error": error}, status=404)
        text = f"completed by {self.served} pid {PID}"
        return web.json_response({
            "id": f"cmpl-fake{PID}", "object": "text_completion", "created": int(time.time()),
            "model": self.served,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        })

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"index": i, "object": "embedding", "embedding": [0.6, 0.8, float(PID % 7)]}
                for i, _ in enumerate(inputs)]
        return web.json_response({
            "id": f"embd-fake{PID}", "object": "list", "created": int(time.time()), "model": self.served,
            "data": data, "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        })

    # -- main --------------------------------------------------------------------------------------
    async def run(self) -> int:
        a = self.args
        print(
            f"INFO fake vLLM {PID}: model={a.model} served={self.served} port={a.port} "
            f"gpu_memory_utilization={a.gpu_memory_utilization} max_model_len={a.max_model_len} "
            f"chat_template={a.chat_template} extra={self.extra}",
            flush=True,
        )
        self.event("start", argv=sys.argv[1:], exec_t=exec_time())
        self.take_lock()
        if a.fake_engine_child:
            self.spawn_engine_child()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if a.fake_ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await asyncio.sleep(a.fake_start_delay)
        if a.fake_fail:
            print("INFO Loading model weights ...", flush=True)
            print("Traceback (most recent call last):", file=sys.stderr)
            print('  File "vllm/worker/model_runner.py", line 1, in load_model', file=sys.stderr)
            print(a.fake_fail, file=sys.stderr)
            print(
                "RuntimeError: Engine core initialization failed. See root cause above.",
                file=sys.stderr,
                flush=True,
            )
            self.event("failed")
            return 1
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        if a.runner == "pooling":  # vLLM only registers the routes of the tasks the model supports
            app.router.add_post("/v1/embeddings", self.embeddings)
        else:
            app.router.add_post("/v1/chat/completions", self.chat)
            app.router.add_post("/v1/completions", self.completions)
        self.sleep.add_routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, a.host, a.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            print(
                f"OSError: [Errno {exc.errno}] error while attempting to bind on address "
                f"({a.host!r}, {a.port}): {exc.strerror}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        print(f"INFO Starting vLLM API server on http://{a.host}:{a.port}", flush=True)
        print("INFO:     Application startup complete.", flush=True)
        self.event("ready")
        await stop.wait()
        print("INFO Shutting down FastAPI HTTP server.", flush=True)
        self.event("stop")
        await asyncio.sleep(a.fake_stop_delay)
        await runner.cleanup()
        self.event("exit")
        return 0


def main() -> int:
    args, extra = parse(sys.argv[1:])
    code = asyncio.run(Fake(args, extra).run())
    sys.stdout.flush()
    sys.stderr.flush()
    # Gone the moment the server has shut down: the interpreter's own teardown (a few hundred ms on a busy
    # machine) is no part of a vLLM's exit, and a benchmark would count it as the proxy's.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
