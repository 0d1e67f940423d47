"""A stand-in for llama.cpp's ``llama-server`` used by the tests (run as a real subprocess).

Accepts ``-m/--model``, ``--host``, ``--port``, ``--alias`` and any other arguments (kept as "extra").
``/health`` answers 503 ``Loading model`` for ``FAKE_LLAMA_LOAD_S`` seconds, then 200. Replies say which
model file and extra arguments the server was started with. The model file's first line steers failures:
``broken`` exits at once with an error line (like a bad GGUF), ``hang`` never becomes healthy.
With ``FAKE_LLAMA_PIDDIR`` set, writes ``<alias>.pid`` there. With ``FAKE_LLAMA_GATE`` set to a path, a stream
pauses after its first content chunk until that file exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser()
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--alias", default=None)
    p.add_argument("--mmproj", default=None)
    return p.parse_known_args(argv)


def main() -> None:
    args, extra = parse(sys.argv[1:])
    alias = args.alias or args.model
    if os.environ.get("FAKE_LLAMA_PIDDIR"):  # first, so a test can find even a server that never got ready
        with open(os.path.join(os.environ["FAKE_LLAMA_PIDDIR"], f"{alias}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
    print(f"fake llama-server: loading {args.model}", flush=True)
    try:
        with open(args.model) as fh:
            first = fh.readline().strip()
    except OSError as exc:
        print(f"llama_model_load: error loading model: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    if first == "broken":
        print("gguf_init_from_file: invalid magic characters 'brok'", file=sys.stderr, flush=True)
        print("llama_model_load: error loading model: failed to load model", file=sys.stderr, flush=True)
        raise SystemExit(1)
    from aiohttp import web

    ready_at = time.monotonic() + float(os.environ.get("FAKE_LLAMA_LOAD_S", "0"))
    loaded = {"model": os.path.basename(args.model), "alias": alias, "extra": extra, "mmproj": args.mmproj}

    async def health(request: web.Request) -> web.Response:
        if first == "hang" or time.monotonic() < ready_at:
            return web.json_response(
                {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, status=503
            )
        return web.json_response({"status": "ok"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "llamacpp"}]}
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        last = body["messages"][-1]["content"]
        text = f"{json.dumps(loaded, sort_keys=True)} you said: {last}"
        created = int(time.time())
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": alias,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta: dict, finish: str | None = None) -> None:
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": alias,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        gate = os.environ.get("FAKE_LLAMA_GATE")
        for i in range(0, len(text), 16):
            await send({"content": text[i : i + 16]})
            while gate and not os.path.exists(gate):  # hold the stream open until the test says go
                await asyncio.sleep(0.02)
            await asyncio.sleep(float(os.environ.get("FAKE_LLAMA_CHUNK_DELAY_S", "0")))
        await send({}, "stop")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
