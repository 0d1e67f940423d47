"""Load with faults, on loopback: a few hundred requests from a handful of concurrent clients, mixing normal,
streamed, cancelled and bad requests over healthy and flaky upstreams (connections dropped, streams
stalled or cut short, garbage and wrongly typed JSON). Every request sent is answered (or was cancelled
by its client) and is logged exactly once, nothing is a 500, and no request is left running in the proxy.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import json
import random
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes import openai as fake_openai
from imageworks_proxy.testing.fakes.ollama import FakeOllama, Reply, echo_responder, ollama_entry
from imageworks_proxy.testing.fakes.openai import make_fake_openai, registry_for
from tests.upstream_scripts import ScriptedUpstream, chunk, entries

REQUESTS = 1000
CLIENTS = 8
SEED = 20261128

OK = ["m-echo", "m-tools", "m-reasoning", "m-minimal", "llama3.2-3b"]
FLAKY_STREAMS = ["m-drop", "m-midstream_error", "m-hang", "o-cut", "o-pinging", "o-odd", "l-odd"]
FLAKY = [
    "m-error500",
    "m-not_json",
    "m-error404",
    "m-error200",
    "m-slow_headers",
    "o-oddjson",
    "l-oddjson",
    "l-odd",
]
OLLAMA_FAULTS = ["cut", "err", "stall"]
BAD: list[tuple[bytes, dict[str, str]]] = [
    (b"{not json", {}),
    (b"", {}),
    (json.dumps({"model": "no-such-model", "messages": user("x")}).encode(), {}),
    (json.dumps({"model": "m-echo", "messages": user("x"), "tools": 5}).encode(), {}),
    (json.dumps({"model": "m-echo", "messages": user("x"), "max_tokens": -1}).encode(), {}),
    (b"\x1f\x8b\x08\x00 not gzip", {"Content-Encoding": "gzip"}),
    (
        gzip.compress(json.dumps({"model": "m-echo", "messages": user("gz")}).encode()),
        {"Content-Encoding": "gzip"},
    ),
]


def ollama_responder(body: dict[str, Any]) -> Reply:
    """The fake Ollama's answer; the last user message can ask for a fault."""
    text = body["messages"][-1].get("content")
    if text == "cut":
        return Reply(content="a cut short answer", cut_after=2)
    if text == "err":
        return Reply(content="an answer", error="model runner crashed", error_after=1)
    if text == "stall":
        return Reply(content="a stalled answer", stall_after=1)
    return echo_responder(body)


def plan(n: int, rng: random.Random) -> dict[str, Any]:
    """What request ``n`` is: its kind, and the body and headers to send."""
    kind = rng.choices(["ok", "stream", "cancel", "bad", "flaky"], weights=[35, 30, 8, 12, 15])[0]
    if kind == "bad":
        raw, headers = rng.choice(BAD)
        return {"kind": kind, "raw": raw, "headers": headers, "stream": False}
    stream = kind in ("stream", "cancel") or (kind == "flaky" and rng.random() < 0.6)
    model = rng.choice(OK)
    text = f"request {n}"
    if kind == "cancel":
        model = "m-slow_stream"  # sends a word every 50 ms until its client gives up
    elif kind == "flaky":
        model = rng.choice(FLAKY_STREAMS if stream else FLAKY)
        if model == "llama3.2-3b" or rng.random() < 0.3:
            model, text = "llama3.2-3b", rng.choice(OLLAMA_FAULTS)
    body: dict[str, Any] = {"model": model, "stream": stream, "messages": user(text)}
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return {"kind": kind, "raw": json.dumps(body).encode(), "headers": {}, "stream": stream}


async def send(session: aiohttp.ClientSession, base: str, n: int, spec: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "X-Request-Id": f"load-{n}", **spec["headers"]}
    async with session.post(base + "/v1/chat/completions", data=spec["raw"], headers=headers) as resp:
        if spec["kind"] == "cancel":
            await resp.content.readuntil(b"\n\n")  # the first event, then the client goes away
            resp.close()
            return {"n": n, "outcome": "cancelled", "status": resp.status}
        raw = await resp.read()
    out = {"n": n, "outcome": "answered", "status": resp.status, "inband": None}
    if resp.content_type == "text/event-stream":
        events = sse_events(raw)
        assert events[-1] == "[DONE]", (n, raw[-200:])
        errors = [e["error"] for e in events[:-1] if "error" in e]
        out["inband"] = errors[0] if errors else None
    return out


def proxy_code(task: asyncio.Task[Any]) -> bool:
    """Is ``task`` running (suspended) inside the proxy's own code, not the testing kit's fakes?"""
    coro: Any = task.get_coro()
    while coro is not None:
        code = (
            getattr(coro, "cr_code", None) or getattr(coro, "ag_code", None) or getattr(coro, "gi_code", None)
        )
        name = code.co_filename if code is not None else ""
        if "/imageworks_proxy/" in name and "/imageworks_proxy/testing/" not in name:
            return True
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "ag_await", None)
            or getattr(coro, "gi_yieldfrom", None)
        )
    return False


@pytest.fixture
async def upstreams(aiohttp_server, registry_file, monkeypatch):
    monkeypatch.setattr(fake_openai, "DELAY", 0.2)
    scripted = ScriptedUpstream()
    scripted.sse("cut", chunk({"role": "assistant", "content": ""}), chunk({"content": "half an"}))
    scripted.sse("pinging", chunk({"role": "assistant", "content": ""}), *[b": ping\n\n", 0.05] * 200)
    scripted.sse("odd", chunk({"role": "assistant", "content": ""}), {"choices": "abc"})  # NDJSON garbage too
    scripted.json(
        "oddjson", {"choices": [{"message": {"content": 5}}], "message": {"content": 5}, "done": True}
    )
    openai_server = await aiohttp_server(make_fake_openai())
    ollama_server = await aiohttp_server(FakeOllama(responder=ollama_responder).app())
    scripted_server = await aiohttp_server(scripted.app())
    registry_file(
        registry_for(str(openai_server.make_url("/v1")))
        + [ollama_entry(str(ollama_server.make_url("")).rstrip("/"))]
        + entries(str(scripted_server.make_url("")).rstrip("/"), ["cut", "pinging", "odd", "oddjson"])
    )


async def test_every_request_under_load_with_faults_is_answered_and_logged_once_without_a_500(
    upstreams, make_config, make_app
):
    config = make_config(stream_idle_timeout_ms=300, backend_timeout_ms=3000, enable_metrics="1")
    app = make_app(config)
    runner = web.AppRunner(app, handler_cancellation=True)  # as imageworks-chat-proxy serves it
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    rng = random.Random(SEED)
    specs = [plan(n, rng) for n in range(REQUESTS)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(REQUESTS):
        queue.put_nowait(n)
    results: list[dict[str, Any]] = []
    try:
        before = {t for t in asyncio.all_tasks() if proxy_code(t)}  # the app's own background tasks

        async def client() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                while not queue.empty():
                    n = queue.get_nowait()
                    results.append(await send(session, base, n, specs[n]))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - started

        rlog = keys.request_log(app)
        leftover: set[asyncio.Task[Any]] = set()
        for _ in range(100):  # cancelled streams finish in the proxy shortly after their clients left
            await rlog.flush()
            leftover = {t for t in asyncio.all_tasks() if proxy_code(t)} - before
            if rlog.written >= REQUESTS and not leftover:
                break
            await asyncio.sleep(0.05)
        with open(rlog.path) as fh:
            logged = [json.loads(line) for line in fh]
        in_flight = keys.metrics(app).in_flight
    finally:
        await runner.cleanup()

    outcomes = collections.Counter(r["outcome"] for r in results)
    statuses = collections.Counter(r["status"] for r in results)
    print(
        f"\nload: {REQUESTS} sent, {outcomes['answered']} answered, {outcomes['cancelled']} cancelled by "
        f"the client, {len(logged)} logged, in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}; "
        f"logged {dict(sorted(collections.Counter(r['status'] for r in logged).items()))}"
    )
    assert sorted(r["n"] for r in results) == list(range(REQUESTS))  # every request got an outcome
    assert outcomes["answered"] + outcomes["cancelled"] == REQUESTS
    assert 500 not in statuses and not [
        r for r in results if (r.get("inband") or {}).get("code") == "internal_error"
    ]
    ids = collections.Counter(r["request_id"] for r in logged)
    assert set(ids) == {f"load-{n}" for n in range(REQUESTS)} and set(ids.values()) == {1}
    assert not [r for r in logged if r["status"] == 500]
    by_id = {r["request_id"]: r for r in logged}
    for r in results:
        record = by_id[f"load-{r['n']}"]
        if r["outcome"] == "cancelled":
            assert (record["status"], record["error_code"]) == (499, "client_disconnected"), record
        elif r["inband"]:
            assert record["status"] >= 500 and record["error_code"] == r["inband"]["code"], (record, r)
        else:
            assert record["status"] == r["status"], (record, r)
    assert not leftover and in_flight == 0
    for kind in ("ok", "stream", "cancel", "bad", "flaky"):  # the mix really had each kind
        assert sum(1 for s in specs if s["kind"] == kind) >= 20
