"""How a streamed answer's bytes leave the proxy: the chunks one upstream read delivered go to the client
in one write (one HTTP chunk), and a chunk is never held back while the proxy waits for the next.

Read on a raw socket, so the HTTP/1.1 chunk framing the client receives is visible.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web

from imageworks_proxy.testing import user


def event(delta: dict, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


PEERS: web.AppKey[list] = web.AppKey("peers")
EVENTS = [event({"role": "assistant", "content": ""}), event({"content": "one"}), event({"content": " two"}),
          event({}, "stop")]


def upstream(go_on: asyncio.Event | None, tail_s: float = 0.0) -> web.Application:
    """Streams EVENTS: all in one write, or (``go_on`` given) the first, then the rest once it is set;
    the HTTP chunk that ends the body ``tail_s`` after ``[DONE]``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        request.app[PEERS].append(request.transport.get_extra_info("peername"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if go_on is None:
            await resp.write(b"".join(EVENTS) + b"data: [DONE]\n\n")
        else:
            await resp.write(EVENTS[0])
            await go_on.wait()
            await resp.write(b"".join(EVENTS[1:]) + b"data: [DONE]\n\n")
        await asyncio.sleep(tail_s)
        await resp.write_eof()
        return resp

    app = web.Application()
    app[PEERS] = []
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def start(aiohttp_server, registry_file, make_config, proxy_client, go_on=None):
    server = await aiohttp_server(upstream(go_on))
    registry_file([{"name": "m", "backend": "openai", "served_model_id": "up",
                    "backend_config": {"base_url": str(server.make_url("/v1"))}}])
    client = await proxy_client(make_config())
    return client.server.host, client.server.port


async def open_stream(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    body = orjson.dumps({"model": "m", "stream": True, "messages": user("hi")})
    reader, writer = await asyncio.open_connection(host, port)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n" % (
        host.encode(), port)
    writer.write(head + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    return reader, writer


async def http_chunk(reader: asyncio.StreamReader) -> bytes:
    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def test_chunks_that_arrived_together_leave_in_one_write(aiohttp_server, registry_file, make_config,
                                                                proxy_client):
    host, port = await start(aiohttp_server, registry_file, make_config, proxy_client)
    reader, writer = await open_stream(host, port)
    try:
        pieces = []
        while piece := await asyncio.wait_for(http_chunk(reader), 10):
            pieces.append(piece)
    finally:
        writer.close()
    assert len(pieces) == 1  # four chunks and [DONE], framed as one HTTP chunk
    events = [e for e in pieces[0].split(b"\n\n") if e]
    assert len(events) == 5 and events[-1] == b"data: [DONE]"
    assert [orjson.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]] == [
        "", "one", " two", None]


async def test_a_chunk_is_not_held_while_the_upstream_is_silent(aiohttp_server, registry_file, make_config,
                                                                  proxy_client):
    go_on = asyncio.Event()
    host, port = await start(aiohttp_server, registry_file, make_config, proxy_client, go_on)
    reader, writer = await open_stream(host, port)
    try:
        # The upstream sends the rest only after the client has the first chunk: a proxy that held it
        # back waiting for more would never get there.
        first = await asyncio.wait_for(http_chunk(reader), 10)
        assert first.startswith(b"data: {") and first.count(b"\n\n") == 1
        assert orjson.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        go_on.set()
        rest = []
        while piece := await asyncio.wait_for(http_chunk(reader), 10):
            rest.append(piece)
    finally:
        writer.close()
    assert len(rest) == 1 and rest[0].count(b"data: ") == 4 and rest[0].endswith(b"data: [DONE]\n\n")


class Chunks:
    """A chunk stream of the adapter contract with ready(): ``items`` are chunks or an error to raise."""

    def __init__(self, *items):
        self.items = list(items)
        self.closed = 0

    def ready(self) -> bool:
        return len(self.items) > 1

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self):
        self.closed += 1


async def test_a_held_stream_passes_ready_on_and_releases_once_when_it_ends():
    from imageworks_proxy import HeldStream, ProxyError

    released, failures = [], []

    async def on_error(exc):
        failures.append(exc.code)

    inner = Chunks({"n": 1}, {"n": 2})
    held = HeldStream(inner, lambda: released.append(1), on_error=on_error)
    assert held.ready()
    assert [c async for c in held] == [{"n": 1}, {"n": 2}]
    await held.aclose()  # the core closes it again: nothing more happens
    assert (released, inner.closed, failures) == ([1], 1, [])

    inner = Chunks({"n": 1}, ProxyError(502, "backend_error", "broke"))
    held = HeldStream(inner, lambda: released.append(2), on_error=on_error)
    assert await anext(held) == {"n": 1} and not held.ready()
    with pytest.raises(ProxyError):
        await anext(held)
    assert (released, inner.closed, failures) == ([1, 2], 1, ["backend_error"])


async def test_streams_one_after_another_reuse_the_upstream_connection(
    aiohttp_server, registry_file, make_config, proxy_client
):
    server = await aiohttp_server(upstream(None, tail_s=0.05))
    registry_file([{"name": "m", "backend": "openai", "served_model_id": "up",
                    "backend_config": {"base_url": str(server.make_url("/v1"))}}])
    client = await proxy_client(make_config())
    for _ in range(3):
        body = {"model": "m", "stream": True, "messages": user("hi")}
        resp = await client.post("/v1/chat/completions", json=body)
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        await asyncio.sleep(0.1)  # the upstream's last HTTP chunk comes 0.05 s after its [DONE]
    peers = server.app[PEERS]
    assert len(peers) == 3 and len(set(peers)) == 1  # one connection: none was closed after its stream
