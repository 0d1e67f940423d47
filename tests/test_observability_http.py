"""Observability seen from outside: the JSONL log, /v1/metrics, /metrics, request ids, access lines."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imageworks_proxy import ProxyError, Tenant, keys
from imageworks_proxy.testing import sse_events, user
from imageworks_proxy.testing.fakes.openai import make_fake_openai, registry_for
from tests.openai_schemas import validate_error
from tests.proxy_helpers import log_records

PNG = "data:image/png;base64,iVBORw0KGgo="  # 8 bytes
SECRET_PROMPT = "PURPLE-ELEPHANT-PROMPT-42"


@pytest.fixture
async def env(aiohttp_server, aiohttp_client, registry_file, make_config, make_app):
    async def start(server_kwargs=None, backend="openai", **overrides):
        server = await aiohttp_server(make_fake_openai())
        registry_file(
            registry_for(str(server.make_url("/v1")), backend=backend, vision=overrides.pop("vision", False))
        )
        return await aiohttp_client(make_app(make_config(**overrides)), server_kwargs=server_kwargs or {})

    return start


def log_path(client) -> Path:
    return Path(keys.config(client.app).log_path)


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


FIELDS = {
    "ts",
    "request_id",
    "endpoint",
    "model",
    "logical_name",
    "backend",
    "adapter",
    "stream",
    "status",
    "error_code",
    "duration_ms",
    "ttft_ms",
    "queue_ms",
    "prompt_tokens",
    "completion_tokens",
    "tokens_estimated",
    "images",
    "truncated_messages",
    "images_resized",
    "capabilities",
    "adapted",
}


# --- the request log ---------------------------------------------------------------------------


async def test_a_successful_request_is_one_record_with_the_spec_fields(env):
    client = await env()
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m-echo", "messages": user("hello")},
        headers={"X-Request-Id": "my-trace-1"},
    )
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] == "my-trace-1"
    [rec] = await log_records(client)
    assert set(rec) == FIELDS
    assert rec["ts"].endswith("Z") and rec["ts"][:2] == "20"
    assert rec["request_id"] == "my-trace-1"
    assert (rec["model"], rec["logical_name"], rec["backend"], rec["adapter"]) == (
        "m-echo",
        "m-echo",
        "openai",
        "openai-passthrough",
    )
    assert (rec["stream"], rec["status"], rec["error_code"]) == (False, 200, None)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["tokens_estimated"]) == (5, 3, False)
    assert rec["duration_ms"] > 0 and 0 < rec["ttft_ms"] <= rec["duration_ms"]
    assert (rec["capabilities"], rec["adapted"]) == (["tools"], [])  # the registry entry says tools
    assert rec["queue_ms"] == 0 and rec["images"] == 0 and rec["truncated_messages"] == 0


async def test_client_errors_are_recorded_with_their_code(env):
    client = await env()
    r1 = await client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": user("hi")})
    r2 = await client.post("/v1/chat/completions", data=b"{not json")
    r3 = await client.post("/v1/chat/completions", json={"model": "m-error404", "messages": user("hi")})
    assert (r1.status, r2.status, r3.status) == (404, 400, 404)
    recs = {r["request_id"]: r for r in await log_records(client)}
    a, b, c = (recs[r.headers["X-Request-Id"]] for r in (r1, r2, r3))
    assert (a["status"], a["error_code"], a["model"], a["logical_name"], a["adapter"]) == (
        404,
        "model_not_found",
        "no-such-model",
        None,
        None,
    )
    assert (a["prompt_tokens"], a["completion_tokens"], a["tokens_estimated"]) == (None, None, False)
    assert a["ttft_ms"] is None
    assert (b["status"], b["error_code"], b["model"]) == (400, "invalid_request", None)
    assert (c["status"], c["logical_name"], c["adapter"]) == (404, "m-error404", "openai-passthrough")
    # the request id in the record is the one in the error body
    assert (await r1.json())["error"]["request_id"] == a["request_id"]


async def test_backend_failures_are_recorded_as_5xx(env):
    client = await env()
    resp = await client.post("/v1/chat/completions", json={"model": "m-error500", "messages": user("hi")})
    assert resp.status == 502
    [rec] = await log_records(client)
    assert (rec["status"], rec["error_code"], rec["logical_name"]) == (502, "backend_error", "m-error500")


async def test_a_streamed_request_has_ttft_the_request_id_header_and_usage_tokens(env):
    client = await env()
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "m-echo",
            "messages": user("one two three"),
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    rid = resp.headers["X-Request-Id"]
    assert sse_events(await resp.read())[-1] == "[DONE]"
    [rec] = await log_records(client)
    assert rec["request_id"] == rid and rec["stream"] is True and rec["status"] == 200
    assert 0 < rec["ttft_ms"] <= rec["duration_ms"]
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["tokens_estimated"]) == (5, 3, False)


async def test_a_stream_without_usage_gets_estimated_and_flagged_token_counts(env):
    client = await env()
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m-echo", "messages": user("alpha beta gamma delta"), "stream": True},
    )
    await resp.read()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-minimal", "messages": user("alpha beta")}
    )
    assert (await resp.json())["choices"][0]["message"]["content"] == "echo: alpha beta"  # and no usage
    streamed, plain = await log_records(client)
    assert streamed["tokens_estimated"] is True and plain["tokens_estimated"] is True
    # "echo: alpha beta gamma delta " is 29 characters: about 8 tokens; "echo: alpha beta" 16: 4 tokens
    assert streamed["completion_tokens"] == 8 and plain["completion_tokens"] == 4
    assert streamed["prompt_tokens"] >= 5 and plain["prompt_tokens"] >= 5


async def test_a_vllm_stream_logs_real_token_counts_without_sending_usage_the_client_did_not_ask_for(env):
    client = await env(backend="vllm")  # vllm entries with a base_url: vllm-external
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-echo", "messages": user("a b"), "stream": True}
    )
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    assert all(e["choices"] and "usage" not in e for e in events[:-1])  # no usage chunk reached the client
    [rec] = await log_records(client)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["tokens_estimated"]) == (5, 3, False)


async def test_an_error_inside_a_stream_is_recorded_with_its_code(env):
    client = await env()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-midstream_error", "messages": user("x"), "stream": True}
    )
    assert resp.status == 200
    await resp.read()
    [rec] = await log_records(client)
    assert rec["stream"] is True and rec["error_code"] is not None and rec["status"] >= 500
    assert rec["ttft_ms"] is not None


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_a_cancelled_stream_is_recorded_as_a_client_disconnect(env, handler_cancellation):
    # the server command runs with handler_cancellation=True: the handler is cancelled mid-await
    client = await env(server_kwargs={"handler_cancellation": handler_cancellation})
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m-slow_stream", "messages": user("x"), "stream": True}
    )
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # the first event has arrived
    rid = resp.headers["X-Request-Id"]
    resp.close()  # the client goes away mid-stream
    [rec] = await log_records(client)
    assert rec["request_id"] == rid
    assert (rec["status"], rec["error_code"]) == (499, "client_disconnected")
    assert rec["ttft_ms"] is not None and rec["tokens_estimated"] is True


async def test_images_and_truncation_are_counted(env):
    client = await env(vision=True)
    messages = [
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and this?"},
                {"type": "image_url", "image_url": {"url": PNG}},
            ],
        },
    ]
    resp = await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": messages})
    assert resp.status == 200
    [rec] = await log_records(client)
    assert rec["images"] == 1 and rec["truncated_messages"] == 2


async def test_without_log_prompts_no_prompt_or_reply_text_appears_anywhere(env, caplog):
    caplog.set_level(logging.DEBUG)
    client = await env(vision=True)
    for stream in (False, True):
        resp = await client.post(
            "/v1/chat/completions",
            json={
                "model": "m-echo",
                "stream": stream,
                "messages": [
                    {"role": "system", "content": "system " + SECRET_PROMPT},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": SECRET_PROMPT},
                            {"type": "image_url", "image_url": {"url": PNG}},
                        ],
                    },
                ],
            },
        )
        body = await resp.read()
        assert SECRET_PROMPT.encode() in body  # the echo reply carries it: the reply text is secret too
    recs = await log_records(client)
    assert len(recs) == 2
    raw = log_path(client).read_text()
    assert SECRET_PROMPT not in raw and "iVBOR" not in raw and "echo:" not in raw
    assert "messages" not in recs[0] and "reply" not in recs[0]
    assert SECRET_PROMPT not in caplog.text


async def test_with_log_prompts_messages_have_images_redacted_and_the_reply_is_kept(env):
    client = await env(vision=True, log_prompts="1")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe " + SECRET_PROMPT},
                {"type": "image_url", "image_url": {"url": PNG}},
            ],
        }
    ]
    await (await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": messages})).read()
    await (
        await client.post(
            "/v1/chat/completions", json={"model": "m-echo", "messages": messages, "stream": True}
        )
    ).read()
    await (
        await client.post(
            "/v1/chat/completions", json={"model": "m-tools", "messages": user("weather?"), "stream": True}
        )
    ).read()
    plain, streamed, tools = await log_records(client)
    for rec in (plain, streamed):
        parts = rec["messages"][-1]["content"]
        assert parts[0] == {"type": "text", "text": "describe " + SECRET_PROMPT}
        assert parts[1] == {"type": "image_url", "image_url": {"url": "<image/png 8 bytes>"}}
    assert plain["reply"] == {"content": "echo: describe " + SECRET_PROMPT}
    assert streamed["reply"]["content"].strip() == "echo: describe " + SECRET_PROMPT
    assert tools["reply"]["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert "iVBOR" not in log_path(client).read_text()


async def test_rotation_under_concurrent_load_keeps_every_record_of_the_two_generations(env):
    client = await env(max_log_bytes="30000")

    async def one(i: int) -> str:
        resp = await client.post(
            "/v1/chat/completions", json={"model": "m-echo", "messages": user(f"n{i}"), "stream": i % 2 == 0}
        )
        await resp.read()
        assert resp.status == 200
        return resp.headers["X-Request-Id"]

    rids = await asyncio.gather(*(one(i) for i in range(100)))
    current = await log_records(client)
    rotated = read_records(Path(str(log_path(client)) + ".1"))
    rlog = keys.request_log(client.app)
    # ~400-byte records: 100 of them need two generations of 30 kB, so exactly one rotation, nothing lost
    assert rlog.rotations == 1 and rlog.dropped == 0 and rlog.write_errors == 0
    assert sorted(r["request_id"] for r in rotated + current) == sorted(rids)
    assert log_path(client).stat().st_size <= 30000


async def test_an_unwritable_log_never_fails_a_request(env, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("not a directory")
    client = await env(log_path=str(blocker / "chat.jsonl"), enable_metrics="1")
    resp = await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": user("hi")})
    assert resp.status == 200
    await log_records(client)
    metrics = await (await client.get("/v1/metrics")).json()
    assert metrics["request_log"]["write_errors"] == 1 and metrics["request_log"]["written"] == 0


# --- metrics endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/metrics", "/metrics"])
async def test_metrics_are_404_in_the_error_shape_when_disabled(env, path):
    client = await env()
    resp = await client.get(path)
    assert resp.status == 404
    assert resp.headers["X-Request-Id"]
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "metrics_disabled"


async def test_v1_metrics_reports_the_window_by_model_and_backend(env):
    client = await env(enable_metrics="1")
    for _ in range(3):
        await (
            await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": user("hi")})
        ).read()
    await (
        await client.post(
            "/v1/chat/completions", json={"model": "m-echo", "messages": user("hi"), "stream": True}
        )
    ).read()
    await (
        await client.post("/v1/chat/completions", json={"model": "m-error500", "messages": user("hi")})
    ).read()
    await (await client.post("/v1/chat/completions", json={"model": "nope", "messages": user("hi")})).read()
    await log_records(client)
    resp = await client.get("/v1/metrics")
    assert resp.status == 200
    m = await resp.json()
    assert m["schema_version"] == 1 and m["uptime_s"] >= 0 and m["window_s"] == 300
    overall = m["overall"]
    assert overall["requests"] == 6 and overall["errors"] == 2
    assert overall["errors_by_code"] == {"backend_error": 1, "model_not_found": 1}
    assert set(overall["latency_ms"]) == {"p50", "p95", "p99"} and set(overall["ttft_ms"]) == {
        "p50",
        "p95",
        "p99",
    }
    assert overall["tokens_per_s"] > 0
    assert m["by_model"]["m-echo"]["requests"] == 4 and m["by_model"]["m-echo"]["errors"] == 0
    assert m["by_model"]["m-error500"]["errors_by_code"] == {"backend_error": 1}
    assert "nope" not in m["by_model"]
    assert m["by_backend"]["openai-passthrough"]["requests"] == 5
    assert m["in_flight"] == 0 and m["queue_depth"] == 0
    assert m["swaps"]["count"] == 0 and m["swaps"]["failures"] == 0
    assert m["swaps"]["duration_s"] is None
    assert m["vllm"]["active_model"] is None
    assert isinstance(m["gpu"], list)
    assert m["request_log"]["written"] == 6 and m["request_log"]["dropped"] == 0


async def test_swap_figures_come_from_the_scheduler_whoever_the_tenants_are(env):
    """Switch figures are fed by the GPU scheduler's listener hook, not read from a plugin's stats: a
    third-party tenant's switches count like vLLM's."""
    client = await env(enable_metrics="1")
    sched = keys.scheduler(client.app)

    async def start_fails() -> None:
        raise ProxyError(503, "model_start_failed", "no GPU memory")

    async def started() -> None:
        return None

    async def stopped() -> None:
        return None

    for name in ("a", "b"):
        tenant = Tenant(f"plugin:{name}", name, start=started, stop=stopped, exclusive=True, model=name)
        (await sched.acquire(tenant, None)).release()
    with pytest.raises(ProxyError):
        await sched.acquire(Tenant("plugin:c", "c", start=start_fails, exclusive=True, model="c"), None)
    m = await (await client.get("/v1/metrics")).json()
    assert m["queue_depth"] == 0 and m["active_model"] is None  # the failed switch stopped "b"
    assert m["swaps"]["count"] == 2 and m["swaps"]["failures"] == 1
    assert m["swaps"]["duration_s"]["samples"] == 2
    text = await (await client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    swaps = {s.name: s.value for s in families["imageworks_proxy_model_swap_duration_seconds"].samples}
    assert swaps["imageworks_proxy_model_swap_duration_seconds_count"] == 2
    assert families["imageworks_proxy_model_swaps"].samples[0].value == 2
    assert families["imageworks_proxy_model_swap_failures"].samples[0].value == 1
    assert families["imageworks_proxy_switch_queue_depth"].samples[0].value == 0
    (await sched.acquire(Tenant("plugin:a", "a", start=started, exclusive=True, model="a"), None)).release()
    text = await (await client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    swaps = {s.name: s.value for s in families["imageworks_proxy_model_swap_duration_seconds"].samples}
    assert swaps["imageworks_proxy_model_swap_duration_seconds_count"] == 3
    assert [s.labels["model"] for s in families["imageworks_proxy_active_model"].samples] == ["a"]


async def test_prometheus_text_parses_back_with_bounded_labels(env):
    client = await env(enable_metrics="1")
    for _ in range(2):
        await (
            await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": user("hi")})
        ).read()
    await (
        await client.post(
            "/v1/chat/completions", json={"model": "m-echo", "messages": user("hi"), "stream": True}
        )
    ).read()
    await (
        await client.post("/v1/chat/completions", json={"model": "m-error500", "messages": user("hi")})
    ).read()
    await (
        await client.post(
            "/v1/chat/completions", json={"model": "free text model name", "messages": user("x")}
        )
    ).read()
    await log_records(client)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    requests = {
        (s.labels["model"], s.labels["backend"], s.labels["status_class"]): s.value
        for s in families["imageworks_proxy_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests == {
        ("m-echo", "openai-passthrough", "2xx"): 3,
        ("m-error500", "openai-passthrough", "5xx"): 1,
        ("", "", "4xx"): 1,
    }
    errors = {
        s.labels["code"]: s.value
        for s in families["imageworks_proxy_request_errors"].samples
        if s.name.endswith("_total")
    }
    assert errors == {"backend_error": 1, "model_not_found": 1}
    duration = {
        s.name: s.value
        for s in families["imageworks_proxy_request_duration_seconds"].samples
        if s.labels.get("model") == "m-echo"
    }
    assert duration["imageworks_proxy_request_duration_seconds_count"] == 3
    ttft_count = [
        s.value
        for s in families["imageworks_proxy_time_to_first_token_seconds"].samples
        if s.name.endswith("_count") and s.labels["model"] == "m-echo"
    ]
    assert ttft_count == [3]
    tokens = {
        s.labels["kind"]: s.value
        for s in families["imageworks_proxy_tokens"].samples
        if s.name.endswith("_total") and s.labels["model"] == "m-echo"
    }
    assert tokens["prompt"] >= 10 and tokens["completion"] >= 6
    assert families["imageworks_proxy_in_flight_requests"].samples[0].value == 0
    written = [
        s.value for s in families["imageworks_proxy_request_log_records"].samples if s.name.endswith("_total")
    ]
    assert written == [5]
    # the free-text model name never became a label value
    assert "free text model name" not in await resp.text()


async def test_openmetrics_is_served_when_asked_for(env):
    client = await env(enable_metrics="1")
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).rstrip().endswith("# EOF")


async def test_two_apps_in_one_process_keep_separate_metrics(env):
    a = await env(enable_metrics="1")
    b = await env(enable_metrics="1")
    await (await a.post("/v1/chat/completions", json={"model": "m-echo", "messages": user("hi")})).read()
    await log_records(a)
    ma = await (await a.get("/v1/metrics")).json()
    mb = await (await b.get("/v1/metrics")).json()
    assert ma["overall"]["requests"] == 1 and mb["overall"]["requests"] == 0
    assert "m-echo" not in await (await b.get("/metrics")).text()


# --- human log lines -----------------------------------------------------------------------------


async def test_one_access_line_per_request_with_model_status_ms_and_request_id(env, caplog):
    caplog.set_level(logging.INFO, logger="imageworks_proxy.access")
    client = await env(api_keys="sk-very-secret-key")
    auth = {"Authorization": "Bearer sk-very-secret-key"}
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m-echo", "messages": user(SECRET_PROMPT)},
        headers={**auth, "X-Request-Id": "trace-abc"},
    )
    assert resp.status == 200
    bad = await client.post(
        "/v1/chat/completions",
        json={"model": "m-echo", "messages": user("x")},
        headers={"Authorization": "Bearer wrong-key"},
    )
    assert bad.status == 401
    await client.get("/v1/models", headers=auth)
    await log_records(client)
    lines = [r.getMessage() for r in caplog.records if r.name == "imageworks_proxy.access"]
    assert len(lines) == 3
    ok, denied, models = lines
    assert ok.startswith('POST /v1/chat/completions model="m-echo" status=200 ')
    assert ok.endswith("ms rid=trace-abc")
    assert denied.startswith("POST /v1/chat/completions status=401 ")
    assert models.startswith("GET /v1/models status=200 ")
    assert all(caplog.records[0].levelno == logging.INFO for _ in lines)
    assert "sk-very-secret-key" not in caplog.text and "wrong-key" not in caplog.text
    assert SECRET_PROMPT not in caplog.text


async def test_access_line_shows_an_in_band_error_and_health_is_quiet(env, caplog):
    caplog.set_level(logging.INFO, logger="imageworks_proxy.access")
    client = await env()
    await (
        await client.post(
            "/v1/chat/completions", json={"model": "m-midstream_error", "messages": user("x"), "stream": True}
        )
    ).read()
    await client.get("/v1/health")
    await log_records(client)
    lines = [r.getMessage() for r in caplog.records if r.name == "imageworks_proxy.access"]
    assert len(lines) == 1
    assert " status=200 error=" in lines[0]


async def test_access_line_cannot_be_forged_with_control_characters(env, caplog):
    caplog.set_level(logging.INFO, logger="imageworks_proxy.access")
    client = await env()
    await client.post("/v1/chat/completions", json={"model": "evil\nFAKE LINE", "messages": user("x")})
    await client.get("/v1/nothing%0Ahere")
    lines = [r.getMessage() for r in caplog.records if r.name == "imageworks_proxy.access"]
    assert len(lines) == 2 and not any("\n" in line for line in lines)
    assert 'model="evil?FAKE LINE"' in lines[0]


async def test_a_failure_inside_observability_never_fails_the_request(env, caplog):
    client = await env(enable_metrics="1")

    def broken(sample):
        raise RuntimeError("metrics bug")

    keys.metrics(client.app).record = broken
    resp = await client.post("/v1/chat/completions", json={"model": "m-echo", "messages": user("hi")})
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "echo: hi"
    await log_records(client)
    assert any("metrics bug" in (r.exc_text or str(r.exc_info)) for r in caplog.records if r.exc_info)
