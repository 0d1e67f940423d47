"""Upstreams that break: truncated streams, comment-only streams, endless lines, huge bodies, JSON of the
wrong types, HTML error pages and unreachable hosts. Each ends in a 5xx in the OpenAI error shape (in-band
once a stream has begun), logged as such, never a 500 and never a hang; clients never see upstream URLs or
OS errors."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from imageworks_proxy import keys
from imageworks_proxy.testing import sse_events, user
from tests.openai_schemas import validate_chunk, validate_error
from tests.upstream_scripts import ScriptedUpstream, chunk, entries, ollama_line

ROLE = chunk({"role": "assistant", "content": ""})
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@pytest.fixture
async def env(aiohttp_server, registry_file, make_config, proxy_client):
    """start(**config) -> (client, upstream); script the upstream before or after starting."""
    upstream = ScriptedUpstream()

    async def start(**overrides):
        server = await aiohttp_server(upstream.app())
        base = str(server.make_url("")).rstrip("/")
        names = [*upstream.scripts] or ["none"]
        registry_file(entries(base, names))
        client = await proxy_client(make_config(**overrides))
        return client

    return start, upstream


async def records(client):
    rlog = keys.request_log(client.server.app)
    await rlog.flush()
    with open(rlog.path) as fh:
        return [json.loads(line) for line in fh]


async def chat(client, model, stream, **body):
    async with asyncio.timeout(20):  # a hang fails the test instead of the suite
        resp = await client.post(
            "/v1/chat/completions", json={"model": model, "stream": stream, "messages": user("x"), **body}
        )
        raw = await resp.read()
    return resp, raw


async def stream_error(client, model, **body):
    """Stream ``model``; return (the chunks before the error, the in-band error)."""
    resp, raw = await chat(client, model, True, **body)
    assert resp.status == 200, raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    *chunks, err = events[:-1]
    validate_error(err)
    for c in chunks:
        validate_chunk(c)
    return chunks, err["error"]


async def json_error(client, model, status, code):
    resp, raw = await chat(client, model, False)
    assert resp.status == status, raw
    body = json.loads(raw)
    validate_error(body)
    assert body["error"]["code"] == code
    return body["error"]


def text(chunks):
    return "".join(c["delta"].get("content") or "" for e in chunks for c in e["choices"])


# -- truncated OpenAI-compatible streams -----------------------------------------------------------------


async def test_a_stream_closed_without_finish_or_done_ends_in_an_in_band_backend_error(env):
    start, upstream = env
    upstream.sse("cut", ROLE, chunk({"content": "The answer is"}))
    client = await start()
    chunks, err = await stream_error(client, "o-cut")
    assert text(chunks) == "The answer is"
    assert err["code"] == "backend_error" and "before it was done" in err["message"]
    assert not any(c["finish_reason"] for e in chunks for c in e["choices"])
    [rec] = await records(client)
    assert (rec["status"], rec["error_code"]) == (502, "backend_error")


async def test_a_stream_asked_for_usage_that_ends_before_its_usage_chunk_is_truncated(env):
    start, upstream = env
    upstream.sse("no-usage", ROLE, chunk({"content": "hi"}), chunk({}, "stop"))
    client = await start()
    chunks, err = await stream_error(client, "o-no-usage", stream_options={"include_usage": True})
    assert err["code"] == "backend_error" and text(chunks) == "hi"


@pytest.mark.parametrize(
    "tail, body",
    [
        ([chunk({}, "stop")], {}),
        ([chunk({}, "length"), chunk(choices=[], usage=USAGE)], {"stream_options": {"include_usage": True}}),
    ],
    ids=["finish", "finish-and-usage"],
)
async def test_a_stream_that_finished_but_sent_no_done_is_complete(env, tail, body):
    start, upstream = env
    upstream.sse("nodone", ROLE, chunk({"content": "whole"}), *tail)
    client = await start()
    resp, raw = await chat(client, "o-nodone", True, **body)
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert text(events[:-1]) == "whole"
    [rec] = await records(client)
    assert rec["status"] == 200


async def test_a_llama_cpp_style_error_event_without_done_reaches_the_client(env):
    start, upstream = env
    upstream.sse(
        "llama",
        ROLE,
        chunk({"content": "part"}),
        {"error": {"code": 500, "message": "context full", "type": "server_error"}},
    )
    client = await start()
    _, err = await stream_error(client, "o-llama")
    assert err["code"] == "backend_error" and "context full" in err["message"]


# -- idle time is measured between data events ----------------------------------------------------------


async def test_an_upstream_sending_only_comments_trips_the_idle_timeout(env):
    start, upstream = env
    upstream.sse("pinging", ROLE, chunk({"content": "so"}), *[b": ping\n\n", 0.05] * 400)
    client = await start(stream_idle_timeout_ms=300)
    chunks, err = await stream_error(client, "o-pinging")
    assert text(chunks) == "so" and err["code"] == "stream_idle_timeout"
    assert "300 ms" in err["message"]
    [rec] = await records(client)
    assert (rec["status"], rec["error_code"]) == (504, "stream_idle_timeout")


async def test_comments_between_data_events_do_not_end_a_live_stream(env):
    start, upstream = env
    steps = [ROLE]
    for i in range(6):
        steps += [b": ping\n\n", 0.1, chunk({"content": f"w{i} "}), 0.1]
    upstream.sse("alive", *steps, chunk({}, "stop"), b"data: [DONE]\n\n")
    client = await start(stream_idle_timeout_ms=500)
    resp, raw = await chat(client, "o-alive", True)
    events = sse_events(raw)
    assert text(events[:-1]) == "w0 w1 w2 w3 w4 w5 " and not any("error" in e for e in events[:-1])


async def test_an_ollama_stream_of_blank_lines_trips_the_idle_timeout(env):
    start, upstream = env
    upstream.ndjson("blank", ollama_line("so"), *[b"\n", 0.05] * 400)
    client = await start(stream_idle_timeout_ms=300)
    chunks, err = await stream_error(client, "l-blank")
    assert text(chunks) == "so" and err["code"] == "stream_idle_timeout"


# -- bounded buffers ---------------------------------------------------------------------------------------


async def test_an_ollama_line_that_never_ends_is_cut_off_at_8_mib(env):
    start, upstream = env
    upstream.ndjson("endless", ollama_line("so"), *[b"x" * (1 << 20)] * 12, 30.0)
    client = await start()
    chunks, err = await stream_error(client, "l-endless")
    assert err["code"] == "backend_error" and "longer than" in err["message"]
    for _ in range(100):  # the proxy hung up instead of reading on: the upstream's handler is cancelled
        if upstream.cancelled:
            break
        await asyncio.sleep(0.05)
    assert upstream.cancelled == ["endless"]


@pytest.mark.parametrize("model", ["o-big", "l-big"])
async def test_a_non_streamed_reply_over_the_upstream_body_cap_is_502(env, model):
    start, upstream = env
    filler = "y" * 3_000_000
    upstream.json(
        "big",
        {
            "choices": [{"message": {"role": "assistant", "content": filler}}],
            "message": {"role": "assistant", "content": filler},
            "done": True,
        },
    )
    client = await start(max_upstream_body_bytes=1_000_000)
    err = await json_error(client, model, 502, "backend_error")
    assert "CHAT_PROXY_MAX_UPSTREAM_BODY_BYTES" in err["message"]


async def test_a_huge_upstream_error_body_is_read_only_in_part(env):
    start, upstream = env
    upstream.json("huge-error", {"error": {"message": "bad " * 2_000_000, "code": "too_bad"}}, status=400)
    client = await start()
    resp, raw = await chat(client, "o-huge-error", False)
    assert resp.status in (400, 502) and len(raw) < 10_000
    validate_error(json.loads(raw))


# -- upstream JSON of the wrong types ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": 5}, "finish_reason": "stop"}]},
        {"choices": "abc"},
        {"choices": [{"index": 0, "message": {"content": "x", "tool_calls": 5}}]},
        {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": ["stop"]}]},
        {"choices": [7]},
    ],
    ids=["content-5", "choices-abc", "tool_calls-5", "finish-list", "choice-7"],
)
async def test_a_completion_of_the_wrong_types_is_a_502(env, reply):
    start, upstream = env
    upstream.json("odd", reply)
    client = await start()
    err = await json_error(client, "o-odd", 502, "backend_error")
    assert "Backend" in err["message"]
    [rec] = await records(client)
    assert (rec["status"], rec["error_code"]) == (502, "backend_error")


@pytest.mark.parametrize(
    "event",
    [
        {"choices": "abc"},
        chunk({"content": 5}),
        chunk({"tool_calls": 5}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": 5}}]}),
        {"choices": [{"index": "0", "delta": {}}]},
        chunk({"reasoning_content": ["x"]}),
    ],
    ids=["choices-abc", "content-5", "tool_calls-5", "arguments-5", "index-str", "reasoning-list"],
)
async def test_a_stream_chunk_of_the_wrong_types_is_an_in_band_502(env, event):
    start, upstream = env
    upstream.sse("odd", ROLE, chunk({"content": "ok "}), event, chunk({}, "stop"), b"data: [DONE]\n\n")
    client = await start()
    chunks, err = await stream_error(client, "o-odd", tools=[{"type": "function", "function": {"name": "f"}}])
    assert err["code"] == "backend_error"
    [rec] = await records(client)
    assert (rec["status"], rec["error_code"]) == (502, "backend_error")


@pytest.mark.parametrize(
    "extra",
    [
        {"message": {"role": "assistant", "content": "x", "tool_calls": 5}},
        {"message": {"role": "assistant", "content": 5}},
        {"message": {"role": "assistant", "content": "x", "tool_calls": [5]}},
        {"eval_count": "many"},
        {"prompt_eval_count": [1]},
        {"message": "hello"},
    ],
    ids=[
        "tool_calls-5",
        "content-5",
        "tool_call-5",
        "eval_count-many",
        "prompt_eval_count-list",
        "message-str",
    ],
)
async def test_ollama_replies_of_the_wrong_types_are_502_streamed_or_not(env, extra):
    start, upstream = env
    upstream.json("odd", {**ollama_line("x", done=True), **extra})
    upstream.ndjson("odd-stream", ollama_line("ok "), {**ollama_line("x", done=True), **extra})
    client = await start()
    await json_error(client, "l-odd", 502, "backend_error")
    _, err = await stream_error(client, "l-odd-stream")
    assert err["code"] == "backend_error"


# -- what clients are told about upstream failures ----------------------------------------------------------


@pytest.mark.parametrize("model", ["o-html404", "l-html404"])
async def test_an_html_404_page_is_a_502_with_a_short_message_not_model_not_found(env, model):
    start, upstream = env
    page = b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1>" + b" " * 5000
    upstream.raw("html404", 404, "text/html", page + b"</body></html>")
    client = await start()
    err = await json_error(client, model, 502, "backend_rejected")
    assert "<html" not in err["message"] and "404" in err["message"] and len(err["message"]) < 300


async def test_an_html_500_page_is_a_502_without_the_page(env):
    start, upstream = env
    upstream.raw(
        "html500", 500, "text/html", b"<html><body>Internal Server Error at /srv/app.py</body></html>"
    )
    client = await start()
    for model in ("o-html500", "l-html500"):
        err = await json_error(client, model, 502, "backend_error")
        assert "<html" not in err["message"] and "/srv" not in err["message"]


@pytest.mark.parametrize("backend", ["openai", "ollama"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_unreachable_backend_is_named_but_its_address_stays_in_the_log(
    registry_file, make_config, proxy_client, unused_tcp_port, caplog, backend, stream
):
    base = f"http://127.0.0.1:{unused_tcp_port}"
    registry_file(entries(base, ["down"]))
    client = await proxy_client(make_config())
    model = "o-down" if backend == "openai" else "l-down"
    with caplog.at_level(logging.WARNING):
        resp = await client.post(
            "/v1/chat/completions", json={"model": model, "stream": stream, "messages": user("x")}
        )
    assert resp.status == 503
    body = await resp.json()
    validate_error(body)
    message = body["error"]["message"]
    assert body["error"]["code"] == "backend_unavailable" and model in message
    assert str(unused_tcp_port) not in message and "127.0.0.1" not in message
    assert "refused" not in message.lower() and "errno" not in message.lower()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert str(unused_tcp_port) in logged and body["error"]["request_id"] in logged


@pytest.mark.parametrize("reply", [{"choices": "abc"}, {"choices": [7]}, {"choices": [{"message": 5}]}])
async def test_a_json_answer_of_the_wrong_shape_to_a_streaming_request_is_an_in_band_502(env, reply):
    start, upstream = env
    upstream.json("odd", reply)
    client = await start()
    _, err = await stream_error(client, "o-odd")
    assert err["code"] == "backend_error"


async def test_content_sent_as_a_list_of_parts_reaches_the_client_as_text(env):
    start, upstream = env
    parts = [
        {"type": "thinking", "thinking": []},
        {"type": "text", "text": "Hello"},
        {"type": "text", "text": "!"},
    ]
    upstream.json("parts", {"choices": [{"index": 0, "message": {"role": "assistant", "content": parts}}]})
    upstream.sse("parts-stream", ROLE, chunk({"content": parts}), chunk({}, "stop"), b"data: [DONE]\n\n")
    client = await start()
    resp, raw = await chat(client, "o-parts", False)
    assert resp.status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "Hello!"
    resp, raw = await chat(client, "o-parts-stream", True)
    events = sse_events(raw)
    assert text(events[:-1]) == "Hello!"
    for e in events[:-1]:
        validate_chunk(e)
