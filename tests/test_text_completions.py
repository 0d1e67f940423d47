"""POST /v1/completions (legacy text completions, as editors use them for autocomplete) through listed
names: an OpenAI-compatible upstream and Ollama's /api/generate, streamed and not; seen from the openai
SDK and raw HTTP."""

from __future__ import annotations

import openai
import pytest

from imageworks_proxy.testing import sse_events
from imageworks_proxy.testing.fakes.ollama import FakeOllama, Reply, ollama_entry
from imageworks_proxy.testing.fakes.openai import REQUESTS
from tests.openai_schemas import validate_error, validate_text_completion, validate_text_completion_chunk
from tests.proxy_helpers import log_records

CODER_TAG = "qwen2.5-coder:latest"


@pytest.fixture
async def passthrough(fake_openai_proxy, openai_sdk):
    client, fake = await fake_openai_proxy()
    return client, fake, openai_sdk(client)


@pytest.fixture
async def ollama(aiohttp_server, registry_file, make_config, proxy_client, openai_sdk):
    """A fake Ollama with a code model that can fill in the middle ("coder") and a chat model that
    cannot and thinks ("llama3.2 3b")."""
    fake = FakeOllama({
        CODER_TAG: ("completion", "insert"),
        "llama3.2:latest": ("completion", "tools", "thinking"),
    })
    server = await aiohttp_server(fake.app())
    base = str(server.make_url("")).rstrip("/")
    registry_file([
        ollama_entry(base),
        ollama_entry(base, name="coder", display_name="coder", tag=CODER_TAG, vision=False),
    ])
    client = await proxy_client(make_config(OLLAMA_KEEP_ALIVE="5m"))
    return client, fake, openai_sdk(client)


async def stream_text(sdk: openai.AsyncOpenAI, **request) -> tuple[str, list[str], object]:
    """Stream a text completion; validate every chunk; return the text, the finish reasons, the usage."""
    stream = await sdk.completions.create(stream=True, **request)
    text, finishes, usage = "", [], None
    async for chunk in stream:
        validate_text_completion_chunk(chunk.model_dump(exclude_unset=True))
        assert chunk.object == "text_completion" and chunk.model == request["model"]
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.text
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return text, finishes, usage


# -- OpenAI-compatible upstreams ---------------------------------------------------------------------
async def test_sdk_text_completion_through_a_passthrough_entry(passthrough):
    client, fake, sdk = passthrough
    completion = await sdk.completions.create(model="m-echo", prompt="def add(a, b):", max_tokens=20)
    assert completion.choices[0].text == "echo: def add(a, b):"
    assert completion.choices[0].finish_reason == "stop" and completion.model == "m-echo"
    assert completion.usage.total_tokens == 8
    sent = fake[REQUESTS][-1]
    assert sent["path"] == "/v1/completions"
    assert sent["body"] == {"model": "echo", "prompt": "def add(a, b):", "max_tokens": 20}
    resp = await client.post("/v1/completions", json={"model": "m-echo", "prompt": "x"})
    validate_text_completion(await resp.json())


async def test_streamed_text_completion_arrives_in_pieces_with_usage_when_asked(passthrough):
    client, fake, sdk = passthrough
    text, finishes, usage = await stream_text(
        sdk, model="m-echo", prompt="one two three", stream_options={"include_usage": True}
    )
    assert text.split() == ["echo:", "one", "two", "three"] and finishes == ["stop"]
    assert usage is not None and usage.total_tokens == 8
    resp = await client.post("/v1/completions", json={"model": "m-echo", "prompt": "a b", "stream": True})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 3 and not any("usage" in c for c in chunks)  # no usage unless asked


async def test_a_bare_upstream_answer_is_completed_to_the_schema(passthrough):
    client, fake, sdk = passthrough
    plain = await client.post("/v1/completions", json={"model": "m-minimal", "prompt": "hi"})
    body = await plain.json()
    validate_text_completion(body)
    assert body["choices"][0]["text"] == "echo: hi" and body["id"].startswith("cmpl-")
    # an upstream that answers a streaming request with JSON: the answer is its own chunk
    text, finishes, _ = await stream_text(sdk, model="m-json_for_stream", prompt="hi")
    assert text == "echo: hi" and finishes == ["stop"]


async def test_text_completion_errors_are_openai_errors(passthrough):
    client, fake, sdk = passthrough
    with pytest.raises(openai.NotFoundError) as err:
        await sdk.completions.create(model="no-such-model", prompt="x")
    assert err.value.body["code"] == "model_not_found"
    for body, param in (
        ({"model": "m-echo"}, "prompt"),
        ({"model": "m-echo", "prompt": {"text": "x"}}, "prompt"),
        ({"model": "m-echo", "prompt": "x", "suffix": 3}, "suffix"),
        ({"model": "m-echo", "prompt": "x", "stream": "yes"}, "stream"),
    ):
        resp = await client.post("/v1/completions", json=body)
        assert resp.status == 400, body
        error = await resp.json()
        validate_error(error)
        assert error["error"]["param"] == param
    upstream = await client.post("/v1/completions", json={"model": "m-error404", "prompt": "x"})
    assert upstream.status == 404
    validate_error(await upstream.json())


async def test_stream_options_without_stream_are_dropped_like_chat(passthrough):
    client, fake, sdk = passthrough
    resp = await client.post(
        "/v1/completions", json={"model": "m-echo", "prompt": "x", "stream_options": {"include_usage": True}}
    )
    assert resp.status == 200  # the fake, like vLLM, would refuse them
    assert "stream_options" not in fake[REQUESTS][-1]["body"]


# -- Ollama ---------------------------------------------------------------------------------------
async def test_sdk_text_completion_through_ollama_generate(ollama):
    client, fake, sdk = ollama
    completion = await sdk.completions.create(
        model="coder", prompt="def add(a, b):", max_tokens=30, temperature=0.1, stop=["\n\n"], seed=7
    )
    validate_text_completion(completion.model_dump(exclude_unset=True))
    assert completion.choices[0].text == "echo: def add(a, b):"
    assert completion.choices[0].finish_reason == "stop" and completion.model == "coder"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 5)
    assert fake.generates[-1] == {
        "model": CODER_TAG,
        "prompt": "def add(a, b):",
        "stream": False,
        "options": {"num_predict": 30, "temperature": 0.1, "stop": ["\n\n"], "seed": 7},
        "keep_alive": "5m",
    }


async def test_fill_in_the_middle_sends_the_suffix_and_streams_ndjson_as_chunks(ollama):
    client, fake, sdk = ollama
    text, finishes, usage = await stream_text(
        sdk, model="coder", prompt="def add(a, b):\n    ", suffix="\n    return c", max_tokens=64,
        stream_options={"include_usage": True},
    )
    assert text == "echo: def add(a, b):\n    " and finishes == ["stop"]
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 5, 16)
    sent = fake.generates[-1]
    assert sent["suffix"] == "\n    return c" and sent["stream"] is True


async def test_a_thinking_model_completes_without_its_thinking_and_stops_at_max_tokens(ollama):
    client, fake, sdk = ollama
    completion = await sdk.completions.create(model="llama3.2 3b", prompt="Once upon a time", max_tokens=2)
    # the fake counts 4 characters a token; Ollama said done_reason "length"
    assert completion.choices[0].text == "echo: On" and completion.choices[0].finish_reason == "length"
    text, finishes, _ = await stream_text(sdk, model="llama3.2 3b", prompt="Once upon a time", max_tokens=2)
    assert text == "echo: On" and finishes == ["length"]
    assert "Let me think" not in text
    # without max_tokens a text completion is as long as OpenAI's default, 16 tokens
    await sdk.completions.create(model="llama3.2 3b", prompt="x")
    assert fake.generates[-1]["options"]["num_predict"] == 16


async def test_echo_puts_the_prompt_before_the_completion(ollama):
    client, fake, sdk = ollama
    completion = await sdk.completions.create(model="coder", prompt="abc", echo=True)
    assert completion.choices[0].text == "abcecho: abc"
    text, _, _ = await stream_text(sdk, model="coder", prompt="abc", echo=True)
    assert text == "abcecho: abc"


async def test_what_ollama_cannot_complete_gets_a_clear_error(ollama):
    client, fake, sdk = ollama
    for body in (
        {"model": "coder", "prompt": [1, 2, 3]},
        {"model": "coder", "prompt": ["one", "two"]},
        {"model": "coder", "prompt": "x", "n": 2},
    ):
        resp = await client.post("/v1/completions", json=body)
        assert resp.status == 400, body
        validate_error(await resp.json())
    assert fake.generates == []  # refused before Ollama was asked
    # Ollama's own refusal: a model without the "insert" capability cannot fill in the middle
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.completions.create(model="llama3.2 3b", prompt="def f(", suffix=")")
    assert "does not support insert" in err.value.body["message"]
    ok = await client.post("/v1/completions", json={"model": "coder", "prompt": ["one"]})
    assert ok.status == 200  # a list holding one prompt is that prompt


async def test_ollama_text_completions_are_in_the_request_log(ollama):
    client, fake, sdk = ollama
    await sdk.completions.create(model="coder", prompt="x")
    await stream_text(sdk, model="coder", prompt="y")
    records = await log_records(client)
    assert [(r["endpoint"], r["stream"], r["status"]) for r in records] == [
        ("completions", False, 200),
        ("completions", True, 200),
    ]
    assert all((r["prompt_tokens"], r["completion_tokens"], r["tokens_estimated"]) == (11, 5, False)
               for r in records)
    assert all(r["adapter"] == "ollama" for r in records)


async def test_a_stream_that_fails_at_once_is_a_json_error(ollama):
    client, fake, sdk = ollama
    fake.generate_responder = lambda body: Reply(status=500, error="model runner has unexpectedly stopped")
    resp = await client.post("/v1/completions", json={"model": "coder", "prompt": "x", "stream": True})
    assert resp.status == 502
    body = await resp.json()
    validate_error(body)
    assert "model runner has unexpectedly stopped" in body["error"]["message"]
