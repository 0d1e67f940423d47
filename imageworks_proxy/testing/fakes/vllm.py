#!/usr/bin/env python3
"""A fake vLLM 0.33 OpenAI server, run as a real subprocess by the orchestrator through
``CHAT_PROXY_VLLM_COMMAND`` (:func:`command` gives the value; ``python -m
imageworks_proxy.testing.fakes.vllm`` runs it too), or by a test as an external server (:func:`started`).

Its command line is checked the way vLLM 0.33 checks it: ``serve <model>`` (the model first, as ``vllm
serve`` takes it; ``--model`` still works there, with vLLM's warning) or, without ``serve``, the older
``api_server`` form (``--model``; a leading positional is ignored, as the real one ignores it). An option
vLLM 0.33 does not have (``data/vllm-0.33.0-flags.txt``) ends it with exit status 2 and argparse's
``unrecognized arguments`` message; ``--enable-auto-tool-choice`` without ``--tool-call-parser``, or a parser
name vLLM does not register (``data/vllm-0.33.0-parsers.txt``), ends it with status 1 like vLLM's checks.

It serves ``/health``, ``/v1/models``, ``/v1/chat/completions`` (JSON and SSE) and ``/v1/completions``
(JSON); with ``--runner pooling`` it is an embedding model instead, like vLLM: ``/v1/embeddings`` and no
generation routes (404). Like vLLM, chat refuses:
``tools: []`` (400), tools without both ``--enable-auto-tool-choice`` and ``--tool-call-parser`` (400
``"auto" tool choice requires ...``), ``stream_options`` without ``stream`` (400), another model (404).
With ``--reasoning-parser`` replies carry ``reasoning`` (unless ``chat_template_kwargs.enable_thinking`` is
false). It does not accept connections until it is ready.

Test controls (options starting with ``--fake-``, usually put in a registry entry's ``extra_args``):
  --fake-start-delay S     seconds before listening (default 0.2)
  --fake-fail MESSAGE      print a vLLM-like traceback ending in MESSAGE during start-up and exit 1
  --fake-crash-after N     die (exit 70) after N content chunks of a stream
  --fake-stop-delay S      on SIGTERM, wait S seconds before exiting
  --fake-ignore-sigterm    ignore SIGTERM (only SIGKILL stops it)
  --fake-engine-child      spawn an "engine core" child in the same process group that ignores SIGTERM
                           and holds the lock (like vLLM's EngineCore holding GPU memory)
  --fake-events PATH       append JSON lines {"event", "pid", "model", "t"} (start/ready/stop/crash/overlap,
                           and refused: a request answered with an error before generating)
  --fake-reply MODE        pid (default: "served by <name> pid <pid>"), echo ("echo: <last user text>"),
                           tools (offered tools, calls get_weather({"city": "Paris"}), or else the first
                           tool with {}), missing (404 model not found)
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
import contextlib
import fcntl
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

if __package__:
    from imageworks_proxy.testing.fakes.vllm_args import check_parsers, parse, vllm_options, vllm_parsers
    from imageworks_proxy.testing.fakes.vllm_sleep import SleepMode
else:  # run as a script: this file's folder is on sys.path
    from vllm_args import check_parsers, parse, vllm_options, vllm_parsers  # type: ignore[no-redef]
    from vllm_sleep import SleepMode  # type: ignore[no-redef]

__all__ = ["SCRIPT", "Fake", "command", "main", "parse", "started", "vllm_options", "vllm_parsers"]

PID = os.getpid()
#: This file: run it with ``sys.executable`` followed by vLLM's arguments.
SCRIPT = Path(__file__).resolve()


def command(serve: bool = True) -> str:
    """The ``CHAT_PROXY_VLLM_COMMAND`` value that launches this fake with the running interpreter: like
    ``vllm serve`` (the default), or like ``python -m vllm.entrypoints.openai.api_server``."""
    return shlex.join([sys.executable, str(SCRIPT), *(["serve"] if serve else [])])


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


def error(
    status: int, message: str, etype: str = "BadRequestError", param: str | None = None
) -> web.Response:
    """vLLM's error body."""
    body = {"error": {"message": message, "type": etype, "param": param, "code": status}}
    return web.json_response(body, status=status)


# -- the server ----------------------------------------------------------------------------------


class Fake:
    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.args = args
        self.extra = extra
        self.served = (args.served_model_name or [args.model])[0]
        self.lock_fd: int | None = None
        self.tool_parser = args.tool_call_parser if args.enable_auto_tool_choice else None
        reasoning = args.reasoning_parser
        self.reasoning_parser = reasoning if reasoning and reasoning.lower() != "none" else None
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
        model = {
            "id": self.served,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.args.model,
            "parent": None,
            "max_model_len": self.args.max_model_len or 4096,
        }
        return web.json_response({"object": "list", "data": [model]})

    def refusal(self, body: dict[str, Any]) -> web.Response | None:
        """vLLM 0.33's answer to a request it refuses before generating, else ``None``."""
        if body.get("stream_options") and not body.get("stream"):
            text = "Stream options can only be defined when `stream=True`."
            return error(400, text, param="stream_options")
        if body.get("tools") == []:
            text = (
                "1 validation error:\n  {'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, "
                "`tools` must not be an empty array. Either provide at least one tool or omit the field "
                "entirely. (parameter=tools)'}"
            )
            return error(400, text, "Bad Request", param="tools")
        if body.get("model") != self.served or self.args.fake_reply == "missing":
            return error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        choice = body.get("tool_choice", "auto" if body.get("tools") else None)
        if choice not in (None, "none") and self.tool_parser is None:
            if choice == "auto":
                return error(400, '"auto" tool choice requires --enable-auto-tool-choice and '
                                  "--tool-call-parser to be set")
            name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
            desc = f'function "{name}"' if name else f'"{choice}"'
            return error(400, f"tool_choice={desc} requires --tool-call-parser to be set")
        return None

    def tool_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """With ``--fake-reply tools`` and tools offered (and a parser to turn the model's text into a call):
        get_weather({"city": "Paris"}) when offered, else the first tool with no arguments."""
        if self.args.fake_reply != "tools" or not body.get("tools") or body.get("tool_choice") == "none":
            return None
        names = [t.get("function", {}).get("name") for t in body["tools"] if isinstance(t, dict)]
        name, args = ("get_weather", '{"city": "Paris"}') if "get_weather" in names else (names[0], "{}")
        # real vLLM says "chatcmpl-tool-<uuid>"; the conformance suite expects the OpenAI "call_" style
        return {"id": f"call_{PID}", "type": "function", "function": {"name": name, "arguments": args}}

    def reasoning(self, body: dict[str, Any]) -> str | None:
        kwargs = body.get("chat_template_kwargs") or {}
        if self.reasoning_parser is None or kwargs.get("enable_thinking") is False:
            return None
        return "Thinking it over."

    def text(self, body: dict[str, Any]) -> str:
        if self.sleep.garbage():
            return "garbage: the weights were discarded and never reloaded"
        if self.args.fake_reply == "echo":
            return "echo: " + last_user_text(body)
        return f"served by {self.served} pid {PID}"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        refused = self.sleep.refuse_chat()
        if refused is not None:
            return refused
        body = await request.json()
        refused = self.refusal(body)
        if refused is not None:
            self.event("refused", status=refused.status, message=json.loads(refused.text)["error"]["message"])
            return refused
        reply = Reply(self, body)
        if not body.get("stream"):
            await asyncio.sleep(float(body.get("fake_delay", 0)))
            return web.json_response(reply.completion())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        async for event in reply.chunks():
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def crash(self) -> None:
        print("fatal: fake vLLM crashed mid-stream", file=sys.stderr, flush=True)
        self.event("crash")
        os._exit(70)

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
    def _fail_start(self, message: str) -> int:
        print("INFO Loading model weights ...", flush=True)
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "vllm/worker/model_runner.py", line 1, in load_model', file=sys.stderr)
        print(message, file=sys.stderr)
        print("RuntimeError: Engine core initialization failed. See root cause above.", file=sys.stderr)
        sys.stderr.flush()
        self.event("failed")
        return 1

    async def _listen(self) -> web.AppRunner | None:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        if self.args.runner == "pooling":  # vLLM only registers the routes of the tasks the model supports
            app.router.add_post("/v1/embeddings", self.embeddings)
        else:
            app.router.add_post("/v1/chat/completions", self.chat)
            app.router.add_post("/v1/completions", self.completions)
        self.sleep.add_routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        a = self.args
        try:
            await web.TCPSite(runner, a.host, a.port, reuse_address=True).start()
        except OSError as exc:
            print(
                f"OSError: [Errno {exc.errno}] error while attempting to bind on address "
                f"({a.host!r}, {a.port}): {exc.strerror}",
                file=sys.stderr,
                flush=True,
            )
            return None
        return runner

    async def run(self) -> int:
        a = self.args
        print(
            f"INFO fake vLLM {PID}: model={a.model} served={self.served} port={a.port} "
            f"gpu_memory_utilization={a.gpu_memory_utilization} max_model_len={a.max_model_len} "
            f"chat_template={a.chat_template} tool_call_parser={self.tool_parser} "
            f"reasoning_parser={self.reasoning_parser} extra={self.extra}",
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
            return self._fail_start(a.fake_fail)
        runner = await self._listen()
        if runner is None:
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


class Reply:
    """One answer: text in ``fake_chunks`` pieces, or a tool call; reasoning first when the parser is on."""

    def __init__(self, fake: Fake, body: dict[str, Any]) -> None:
        self.fake = fake
        self.body = body
        self.text = fake.text(body)
        self.call = fake.tool_call(body)
        self.reasoning = fake.reasoning(body)
        self.id = f"chatcmpl-fake{PID}{int(time.monotonic() * 1000)}"
        self.created = int(time.time())
        self.n = max(1, int(body.get("fake_chunks", 3)))
        self.usage = {"prompt_tokens": 5, "completion_tokens": self.n, "total_tokens": 5 + self.n}

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [self.call]}
        if self.reasoning:
            message["reasoning"] = self.reasoning
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": "tool_calls" if self.call is not None else "stop"}
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.fake.served, "choices": [choice], "usage": self.usage}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.fake.served,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        yield self.chunk({"role": "assistant", "content": ""})
        if self.reasoning:
            yield self.chunk({"reasoning": self.reasoning})
        if self.call is not None:  # like vLLM's parsers: name first, then argument fragments
            fn = self.call["function"]
            head = {"index": 0, "id": self.call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": ""}}
            yield self.chunk({"tool_calls": [head]})
            half = len(fn["arguments"]) // 2
            for piece in (fn["arguments"][:half], fn["arguments"][half:]):
                yield self.chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            crash_after = self.body.get("fake_crash_after", self.fake.args.fake_crash_after)
            delay = float(self.body.get("fake_chunk_delay", 0))
            cuts = [i * len(self.text) // self.n for i in range(self.n + 1)]
            for i in range(self.n):
                if crash_after is not None and i >= int(crash_after):
                    self.fake.crash()
                if delay:
                    await asyncio.sleep(delay)
                yield self.chunk({"content": self.text[cuts[i]:cuts[i + 1]]})
        yield self.chunk({}, "tool_calls" if self.call is not None else "stop")
        if (self.body.get("stream_options") or {}).get("include_usage"):
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.fake.served, "choices": [], "usage": self.usage}


@contextlib.asynccontextmanager
async def started(*flags: str, port: int, timeout_s: float = 30.0) -> AsyncIterator[str]:
    """Run the fake as a server the proxy did not start (an external vLLM) with vLLM's ``flags`` (a model
    and ``--served-model-name`` among them) on ``port``; yields its ``/v1`` base URL once it is ready."""
    import aiohttp

    argv = [sys.executable, str(SCRIPT), "serve", *flags, "--host", "127.0.0.1", "--port", str(port),
            "--fake-start-delay", "0"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(base + "/health") as resp:
                        if resp.status == 200:
                            break
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the fake vLLM did not start (exit status {proc.returncode})")
                await asyncio.sleep(0.05)
        yield base + "/v1"
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def main() -> int:
    args, extra = parse(sys.argv[1:])
    problem = check_parsers(args)
    if problem is not None:
        print("Traceback (most recent call last):", file=sys.stderr)
        print(problem, file=sys.stderr, flush=True)
        return 1
    code = asyncio.run(Fake(args, extra).run())
    sys.stdout.flush()
    sys.stderr.flush()
    # Gone the moment the server has shut down: the interpreter's own teardown (a few hundred ms on a busy
    # machine) is no part of a vLLM's exit, and a benchmark would count it as the proxy's.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
