#!/usr/bin/env python3
"""The yardstick: the thinnest honest aiohttp chat (and embeddings) passthrough.

It does the least a real proxy must do (read and parse the JSON body, rewrite ``model``, forward it
with a pooled client session, parse every streamed chunk and serialise it again; for embeddings parse the
answer and name the requested model in it) and nothing else, so it shows what an aiohttp design can reach
on this machine. The proxy is measured against it.

Usage: ``ref_passthrough.py PORT UPSTREAM_BASE`` (UPSTREAM_BASE like ``http://127.0.0.1:9000/v1``).
"""

from __future__ import annotations

import asyncio
import sys

import orjson
from aiohttp import ClientSession, TCPConnector, web

SESSION: web.AppKey[ClientSession] = web.AppKey("session")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream")


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    body["model"] = "stub"
    url = request.app[UPSTREAM] + "/chat/completions"
    async with request.app[SESSION].post(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    ) as upstream:
        if not body.get("stream"):
            answer = orjson.loads(await upstream.read())
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        async for line in upstream.content:
            if line.startswith(b"data: {"):
                await resp.write(b"data: " + orjson.dumps(orjson.loads(line[6:])) + b"\n\n")
            elif line.startswith(b"data: [DONE]"):
                await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def embeddings(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    model, body["model"] = body.get("model"), "stub-embed"
    url = request.app[UPSTREAM] + "/embeddings"
    async with request.app[SESSION].post(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    ) as upstream:
        answer = orjson.loads(await upstream.read())
    answer["model"] = model
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def session_ctx(app: web.Application):
    app[SESSION] = ClientSession(connector=TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def main(argv: list[str]) -> None:
    app = web.Application()
    app[UPSTREAM] = argv[2].rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=int(argv[1]), access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main(sys.argv)
