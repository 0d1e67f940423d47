"""What the proxy streams to clients: no SSE line over 64 KiB whatever a chunk holds (several choices,
large logprobs), and a client that stops reading cannot hold the upstream stream forever."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.http.sse import MAX_LINE
from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes.ollama import FakeOllama, Reply, ollama_entry
from tests.openai_schemas import validate_chunk
from tests.upstream_scripts import ScriptedUpstream, chunk, entries


@pytest.fixture
async def env(aiohttp_server, registry_file, make_config, proxy_client):
    upstream = ScriptedUpstream()

    async def start(**overrides):
        server = await aiohttp_server(upstream.app())
        registry_file(entries(str(server.make_url("")).rstrip("/"), list(upstream.scripts)))
        return await proxy_client(make_config(**overrides))

    return start, upstream


async def stream_lines(client, model, **body):
    resp = await client.post(
        "/v1/chat/completions", json={"model": model, "stream": True, "messages": user("x"), **body}
    )
    assert resp.status == 200
    raw = await resp.read()
    longest = max(len(line) for line in raw.split(b"\n"))
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-2:]
    for e in events[:-1]:
        validate_chunk(e)
    return longest, events[:-1]


def with_logprobs(delta: dict, logprobs: dict) -> dict:
    event = chunk(delta)
    event["choices"][0]["logprobs"] = logprobs
    return event


def logprob(token: str) -> dict:
    top = [{"token": f"{token}{i}", "logprob": -1.5, "bytes": [65] * 8} for i in range(5)]
    return {"token": token, "logprob": -0.25, "bytes": [65] * 8, "top_logprobs": top}


async def test_a_chunk_with_several_large_choices_is_split_per_choice_under_64k(env):
    start, upstream = env
    two = {
        "choices": [
            {"index": 0, "delta": {"content": "a" * 20000 + "é" * 20000}, "finish_reason": None},
            {"index": 1, "delta": {"content": "b" * 40000}, "finish_reason": None},
        ]
    }
    ends = {"choices": [{"index": i, "delta": {}, "finish_reason": "stop"} for i in (0, 1)]}
    upstream.sse("two", chunk(), two, ends, b"data: [DONE]\n\n")
    client = await start()
    longest, events = await stream_lines(client, "o-two", n=2)
    assert longest <= MAX_LINE
    by_index = {0: "", 1: ""}
    for e in events:
        for c in e["choices"]:
            by_index[c["index"]] += c["delta"].get("content") or ""
    assert by_index == {0: "a" * 20000 + "é" * 20000, 1: "b" * 40000}


async def test_large_logprobs_are_split_under_64k_and_arrive_once_in_order(env):
    start, upstream = env
    tokens = [f"t{i}" for i in range(400)]
    big = with_logprobs(
        {"content": "".join(tokens)}, {"content": [logprob(t) for t in tokens], "refusal": None}
    )
    upstream.sse("lp", chunk({"role": "assistant"}), big, chunk({}, "stop"), b"data: [DONE]\n\n")
    client = await start()
    longest, events = await stream_lines(client, "o-lp", logprobs=True, top_logprobs=5)
    assert len(json.dumps(big)) > MAX_LINE and longest <= MAX_LINE
    got = [
        lp["token"]
        for e in events
        for c in e["choices"]
        for lp in ((c.get("logprobs") or {}).get("content") or ())
    ]
    assert got == tokens
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) == "".join(tokens)


async def test_large_text_with_logprobs_does_not_repeat_the_logprobs_in_every_piece(env):
    start, upstream = env
    text = "word " * 20_000  # 100 kB of text: cut into pieces
    lp = {"content": [logprob(f"w{i}") for i in range(30)], "refusal": None}
    upstream.sse(
        "both", chunk({"role": "assistant"}), with_logprobs({"content": text}, lp), chunk({}, "stop")
    )
    client = await start()
    longest, events = await stream_lines(client, "o-both", logprobs=True)
    assert longest <= MAX_LINE
    carried = [c["logprobs"] for e in events for c in e["choices"] if c.get("logprobs")]
    assert carried == [lp]


# -- a client that stops reading ------------------------------------------------------------------------


async def start_not_reading(app: web.Application, model: str):
    """Serve ``app`` on loopback and send it a streaming request from a client that never reads."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and offers a tiny receive window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    body = json.dumps({"model": model, "stream": True, "messages": user("x")}).encode()
    await loop.sock_sendall(
        sock,
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body,
    )
    return runner, sock


async def until(condition, rlog=None):
    for _ in range(200):
        if rlog is not None:
            await rlog.flush()
        if condition():
            return
        await asyncio.sleep(0.05)


async def only_record(app: web.Application) -> dict:
    """The one request-log record, once it is written."""
    rlog = keys.request_log(app)
    await until(lambda: rlog.written, rlog)
    with open(rlog.path) as fh:
        [record] = [json.loads(line) for line in fh]
    return record


async def test_a_client_that_stops_reading_ends_the_stream_and_the_upstream_request(
    env, registry_file, make_config, make_app
):
    start, upstream = env
    piece = chunk({"content": "z" * 30_000})
    upstream.sse("flood", chunk({"role": "assistant"}), *[piece] * 2000, chunk({}, "stop"))
    await start()  # writes the registry for the scripted upstream
    app = make_app(make_config(client_stall_timeout_ms=300))
    runner, sock = await start_not_reading(app, "o-flood")
    try:
        await until(lambda: upstream.cancelled)  # the proxy gives up on the client, hangs up upstream
        assert upstream.cancelled == ["flood"]
        record = await only_record(app)
        assert (record["status"], record["error_code"]) == (499, "client_stalled")
    finally:
        sock.close()
        await runner.cleanup()


async def test_a_client_that_stops_reading_gives_back_the_gpu_lease(
    aiohttp_server, registry_file, make_config, make_app
):
    fake = FakeOllama(responder=lambda body: Reply(content="z" * 3_000_000, piece=30_000))
    server = await aiohttp_server(fake.app())
    registry_file([ollama_entry(str(server.make_url("")).rstrip("/"))])
    app = make_app(make_config(client_stall_timeout_ms=300))
    released: list[bool] = []

    class Tenancy:  # grants every lease at once and records whether it came back
        def add_resident(self, tenant):
            pass

        async def acquire(self, tenant, call):
            released.append(False)
            index = len(released) - 1

            class _Lease:
                def release(self) -> None:
                    released[index] = True

            return _Lease()

    app[keys.TENANCY] = Tenancy()
    runner, sock = await start_not_reading(app, "llama3.2-3b")
    try:
        await until(lambda: released == [True])
        assert released == [True]
        record = await only_record(app)
        assert (record["status"], record["error_code"]) == (499, "client_stalled")
    finally:
        sock.close()
        await runner.cleanup()
