"""A stand-in for llama.cpp's ``llama-server`` used by the tests (run as a real subprocess).

Accepts ``-m/--model``, ``--host``, ``--port``, ``--alias`` and the other options llama.cpp has (kept as
"extra"); like llama-server it ends with "error: invalid argument: <arg>" and exit status 1 on an option
llama.cpp does not have (``data/llama-server-flags.txt``).
``/health`` answers 503 ``Loading model`` for ``FAKE_LLAMA_LOAD_S`` seconds, then 200. Replies say which
model file and extra arguments the server was started with. The model file's first line steers them:
``broken`` exits at once with an error line (like a bad GGUF), ``hang`` never becomes healthy, ``echo``
answers "echo: <last message>", ``tools`` calls ``get_weather({"city": "Paris"})`` when offered tools (with
an id like llama-server's: 32 letters and digits). A usage chunk follows a stream that asked for one.
With ``FAKE_LLAMA_PIDDIR`` set, writes ``<alias>.pid`` there. With ``FAKE_LLAMA_GATE`` set to a path, a stream
pauses after its first content chunk until that file exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import sys
import time
from pathlib import Path

from aiohttp import web

USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


FLAGS = Path(__file__).resolve().parent / "data" / "llama-server-flags.txt"


def _number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def check_options(argv: list[str]) -> None:
    """Exit like llama-server on the first option llama.cpp does not define (values are not options)."""
    known = {line.strip() for line in FLAGS.read_text().splitlines() if line.startswith("-")}
    for arg in argv:
        if not arg.startswith("-") or _number(arg):
            continue
        name = arg.split("=", 1)[0]
        name = name.replace("_", "-") if name.startswith("--") else name  # llama.cpp folds "_" in long names
        if name not in known:
            print(f"error: invalid argument: {arg}", file=sys.stderr, flush=True)
            raise SystemExit(1)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser()
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--alias", default=None)
    p.add_argument("--mmproj", default=None)
    return p.parse_known_args(argv)


def random_id() -> str:
    """A tool-call id the way llama-server makes one: 32 random letters and digits, no ``call_`` prefix."""
    return "".join(random.choices(string.ascii_letters + string.digits, k=32))


class FakeLlamaServer:
    """The HTTP side, once the model file has loaded."""

    def __init__(self, args: argparse.Namespace, extra: list[str], first: str) -> None:
        self.alias = args.alias or args.model
        self.first = first
        self.ready_at = time.monotonic() + float(os.environ.get("FAKE_LLAMA_LOAD_S", "0"))
        self.loaded = {
            "model": os.path.basename(args.model),
            "alias": self.alias,
            "extra": extra,
            "mmproj": args.mmproj,
        }

    async def health(self, request: web.Request) -> web.Response:
        if self.first == "hang" or time.monotonic() < self.ready_at:
            return web.json_response(
                {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, status=503
            )
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.alias, "object": "model", "owned_by": "llamacpp"}]}
        )

    def _text(self, body: dict) -> str:
        last = body["messages"][-1]["content"]
        if self.first == "echo":
            return f"echo: {last}"
        return f"{json.dumps(self.loaded, sort_keys=True)} you said: {last}"

    def _tool_call(self, body: dict) -> dict | None:
        """With a ``tools`` model file and tools in the request, the model calls get_weather."""
        if self.first != "tools" or not body.get("tools"):
            return None
        args = json.dumps({"city": "Paris"})
        return {"id": random_id(), "type": "function", "function": {"name": "get_weather", "arguments": args}}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text, call = self._text(body), self._tool_call(body)
        if body.get("stream"):
            return await self._stream(request, body, text, call)
        message = {"role": "assistant", "content": None, "tool_calls": [call]} if call else None
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.alias,
                "choices": [
                    {
                        "index": 0,
                        "message": message or {"role": "assistant", "content": text},
                        "finish_reason": "tool_calls" if call else "stop",
                    }
                ],
                "usage": USAGE,
            }
        )

    async def _stream(
        self, request: web.Request, body: dict, text: str, call: dict | None
    ) -> web.StreamResponse:
        created = int(time.time())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta: dict, finish: str | None = None, **extra) -> None:
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.alias,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        if call:  # like llama-server: id, type and name first, then the arguments in pieces
            fn = call["function"]
            head = {**call, "function": {"name": fn["name"], "arguments": ""}}
            await send({"tool_calls": [{"index": 0, **head}]})
            for piece in (fn["arguments"][:9], fn["arguments"][9:]):
                await send({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            text = ""
        gate = os.environ.get("FAKE_LLAMA_GATE")
        for i in range(0, len(text), 16):
            await send({"content": text[i : i + 16]})
            while gate and not os.path.exists(gate):  # hold the stream open until the test says go
                await asyncio.sleep(0.02)
            await asyncio.sleep(float(os.environ.get("FAKE_LLAMA_CHUNK_DELAY_S", "0")))
        await send({}, "tool_calls" if call else "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.alias,
                "choices": [],
                "usage": USAGE,
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


def main() -> None:
    args, extra = parse(sys.argv[1:])
    alias = args.alias or args.model
    if os.environ.get("FAKE_LLAMA_PIDDIR"):  # first, so a test can find even a server that never got ready
        with open(os.path.join(os.environ["FAKE_LLAMA_PIDDIR"], f"{alias}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
    check_options(sys.argv[1:])
    print(f"fake llama-server: loading {args.model}", flush=True)
    try:
        with open(args.model) as fh:
            first = fh.readline().strip()
    except OSError as exc:
        print(f"llama_model_load: error loading model: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if first == "broken":
        print("gguf_init_from_file: invalid magic characters 'brok'", file=sys.stderr, flush=True)
        print("llama_model_load: error loading model: failed to load model", file=sys.stderr, flush=True)
        raise SystemExit(1)
    server = FakeLlamaServer(args, extra, first)
    app = web.Application()
    app.router.add_get("/health", server.health)
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/chat/completions", server.chat)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
