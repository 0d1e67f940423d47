"""Orchestrated vLLM seen by an HTTP client of the proxy: keep-alives while a model starts, errors in the
OpenAI shape, the template rule, the queue limit and disconnects."""

from __future__ import annotations

import asyncio

import openai
import pytest

from imageworks_proxy.adapters.vllm_orchestrated import orchestrator
from imageworks_proxy.testing import free_port, sse_events, user
from tests.openai_schemas import validate_chunk, validate_completion, validate_error
from tests.orch_helpers import orch_settings, started, until, vllm_entry


@pytest.fixture
def orch(tmp_path, make_config, registry_file, proxy_client):
    async def start(entries, **overrides):
        registry_file(entries)
        return await proxy_client(make_config(**orch_settings(free_port(), **overrides)))

    return start


async def test_a_stream_for_a_cold_model_gets_headers_and_a_keep_alive_at_once_then_the_answer(
    orch, tmp_path
):
    client = await orch([vllm_entry("alpha", tmp_path, "--fake-start-delay", "0.5")])
    resp = await client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": user("hi"), "stream": True}
    )
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert await resp.content.readuntil(b"\n\n") == b": keep-alive\n\n"  # before vLLM is even healthy
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        validate_chunk(chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"])
    assert text.startswith("served by served-alpha pid ")


async def test_the_openai_sdk_streams_through_a_cold_start_and_a_switch(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)])
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    try:
        for model in ("alpha", "beta", "alpha"):
            stream = await sdk.chat.completions.create(model=model, messages=user("hi"), stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text.startswith(f"served by served-{model} pid ")
        completion = await sdk.chat.completions.create(model="alpha", messages=user("hi"))
        validate_completion(completion.model_dump(exclude_unset=True))
    finally:
        await sdk.close()
    assert [e["model"] for e in started(tmp_path)] == ["served-alpha", "served-beta", "served-alpha"]


async def test_a_failed_start_is_a_json_503_carrying_vllms_log_line(orch, tmp_path):
    client = await orch(
        [
            vllm_entry(
                "broken",
                tmp_path,
                "--fake-fail",
                "ValueError: The model's max seq len (32768) is larger than KV cache (1024)",
            )
        ]
    )
    resp = await client.post("/v1/chat/completions", json={"model": "broken", "messages": user("hi")})
    assert resp.status == 503 and resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "model_start_failed"
    assert "larger than KV cache (1024)" in body["error"]["message"]
    assert "Retry-After" in resp.headers


async def test_a_failed_start_after_the_stream_was_committed_is_an_in_band_error(orch, tmp_path):
    client = await orch(
        [vllm_entry("broken", tmp_path, "--fake-fail", "RuntimeError: No CUDA GPUs are available")]
    )
    resp = await client.post(
        "/v1/chat/completions", json={"model": "broken", "messages": user("hi"), "stream": True}
    )
    assert resp.status == 200
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    assert events[0]["error"]["code"] == "model_start_failed"
    assert "No CUDA GPUs are available" in events[0]["error"]["message"]


async def test_a_model_without_chat_template_is_refused_before_anything_starts(orch, tmp_path):
    model_dir = tmp_path / "weights" / "base"
    model_dir.mkdir(parents=True)
    (model_dir / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    bare = vllm_entry("base", tmp_path)
    bare["backend_config"]["model_path"] = str(model_dir)
    templated = vllm_entry("templated", tmp_path, chat_template={"path": str(template)})
    templated["backend_config"]["model_path"] = str(model_dir)
    client = await orch([bare, templated], REQUIRE_TEMPLATE="1")
    resp = await client.post(
        "/v1/chat/completions", json={"model": "base", "messages": user("hi"), "stream": True}
    )
    assert resp.status == 409 and resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "template_required"
    assert started(tmp_path) == []
    # with chat_template.path the same weights start, and vLLM gets --chat-template
    resp = await client.post("/v1/chat/completions", json={"model": "templated", "messages": user("hi")})
    assert resp.status == 200, await resp.text()
    argv = started(tmp_path)[0]["argv"]
    assert argv[argv.index("--chat-template") + 1] == str(template)


async def test_a_client_that_disconnects_while_queued_leaves_the_queue(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)])
    app = client.app
    long = asyncio.create_task(
        client.post(
            "/v1/chat/completions",
            json={
                "model": "alpha",
                "messages": user("hi"),
                "stream": True,
                "fake_chunks": 20,
                "fake_chunk_delay": 0.1,
            },
        )
    )
    await until(lambda: orchestrator(app).scheduler.stats()["inflight"] == 1)
    waiting = await client.post(
        "/v1/chat/completions", json={"model": "beta", "messages": user("hi"), "stream": True}
    )
    assert await waiting.content.readuntil(b"\n\n") == b": keep-alive\n\n"
    assert orchestrator(app).scheduler.queue_depth == 1
    waiting.close()  # the user closed the tab
    await until(lambda: orchestrator(app).scheduler.queue_depth == 0)
    resp = await long
    assert sse_events(await resp.read())[-1] == "[DONE]"
    assert [e["model"] for e in started(tmp_path)] == [
        "served-alpha"
    ]  # no switch for a request nobody waits for


async def test_more_waiting_requests_than_the_queue_allows_get_429(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)], VLLM_MAX_QUEUE="1")
    app = client.app
    long = asyncio.create_task(
        client.post(
            "/v1/chat/completions",
            json={
                "model": "alpha",
                "messages": user("hi"),
                "stream": True,
                "fake_chunks": 10,
                "fake_chunk_delay": 0.1,
            },
        )
    )
    await until(lambda: orchestrator(app).scheduler.stats()["inflight"] == 1)
    queued = asyncio.create_task(
        client.post("/v1/chat/completions", json={"model": "beta", "messages": user("hi")})
    )
    await until(lambda: orchestrator(app).scheduler.queue_depth == 1)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "beta", "messages": user("hi"), "stream": True}
    )
    assert resp.status == 429 and resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "queue_full" and resp.headers["Retry-After"]
    assert (await long).status == 200
    assert (await queued).status == 200


async def test_ollama_and_vllm_take_turns_on_the_gpu(
    tmp_path, aiohttp_server, registry_file, make_config, proxy_client
):
    from imageworks_proxy.testing.fakes.ollama import FakeOllama

    fake = FakeOllama({"llama3:latest": ("completion",)})
    fake.loaded["llama3:latest"] = float("inf")  # Ollama holds the GPU from before the proxy started
    server = await aiohttp_server(fake.app())
    ollama = {
        "name": "llama",
        "backend": "ollama",
        "served_model_id": "llama3:latest",
        "backend_config": {"base_url": str(server.make_url("")).rstrip("/")},
    }
    registry_file([vllm_entry("alpha", tmp_path), ollama])
    client = await proxy_client(
        make_config(**orch_settings(free_port(), GPU_EXCLUSIVE="1", OLLAMA_STOP_TIMEOUT_S="1"))
    )

    resp = await client.post("/v1/chat/completions", json={"model": "alpha", "messages": user("hi")})
    assert resp.status == 200, await resp.text()
    assert fake.unloads == ["llama3:latest"] and fake.loaded == {}  # unloaded before vLLM started
    assert len(started(tmp_path)) == 1

    resp = await client.post("/v1/chat/completions", json={"model": "llama", "messages": user("hi")})
    assert resp.status == 200, await resp.text()
    assert orchestrator(client.app).public_state()["state"] == "stopped"  # vLLM stopped for Ollama

    # Ollama that will not let go: vLLM is not started into an occupied GPU
    fake.unload_delay_s = None
    resp = await client.post("/v1/chat/completions", json={"model": "alpha", "messages": user("hi")})
    assert resp.status == 503
    body = await resp.json()
    validate_error(body)
    assert body["error"]["code"] == "model_start_failed" and "llama3:latest" in body["error"]["message"]
    assert len(started(tmp_path)) == 1
