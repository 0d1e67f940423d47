"""The built-in demo model (``backend: "demo"``): a reply with no model server, plain and streamed word by
word, with usage, valid for the OpenAI schemas and the official SDK."""

from __future__ import annotations

from imageworks_proxy.adapters.demo import REPLY, demo_reply
from imageworks_proxy.testing import sse_events
from tests.openai_schemas import validate_chunk, validate_completion, validate_models

DEMO = {"name": "demo", "backend": "demo"}


def _chat(stream: bool = False, **extra) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": "What are you?"}], "stream": stream,
            **extra}


async def test_the_demo_model_is_listed_and_answers(make_config, registry_file, proxy_client):
    registry_file([DEMO])
    client = await proxy_client(make_config())
    models = await (await client.get("/v1/models")).json()
    validate_models(models)
    assert [(m["id"], m["extensions"]["status"]) for m in models["data"]] == [("demo", "loaded")]
    resp = await client.post("/v1/chat/completions", json=_chat())
    assert resp.status == 200
    body = await resp.json()
    validate_completion(body)
    assert body["choices"][0]["message"]["content"] == f'{REPLY} You wrote: "What are you?"'
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 3
    assert body["usage"]["completion_tokens"] == len(body["choices"][0]["message"]["content"].split())


async def test_the_demo_model_streams_word_by_word_with_usage_when_asked(
    make_config, registry_file, proxy_client
):
    registry_file([DEMO])
    client = await proxy_client(make_config())
    resp = await client.post("/v1/chat/completions", json=_chat(True, stream_options={"include_usage": True}))
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        validate_chunk(chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == demo_reply(_chat()["messages"])
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == len(
        text.split(" ")
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(text.split())


async def test_the_demo_model_through_the_openai_sdk(make_config, registry_file, proxy_client, openai_sdk):
    registry_file([DEMO])
    api = openai_sdk(await proxy_client(make_config()))
    reply = await api.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == demo_reply([{"role": "user", "content": "Hi"}])
    pieces = [
        chunk.choices[0].delta.content or ""
        async for chunk in await api.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces) == reply.choices[0].message.content


def test_the_reply_quotes_a_long_message_shortened_and_ignores_images():
    long = "word " * 100
    reply = demo_reply([{"role": "user", "content": [{"type": "text", "text": long},
                                                     {"type": "image_url", "image_url": {"url": "x"}}]}])
    quoted = reply.split("You wrote: ", 1)[1]
    assert quoted.endswith('…"') and len(quoted) < 90
    assert demo_reply([{"role": "system", "content": "be brief"}]) == REPLY
