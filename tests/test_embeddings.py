"""POST /v1/embeddings through listed names: an OpenAI-compatible upstream, Ollama's /api/embed, and what
the request log, the model list and GPU tenancy make of it; seen from the openai SDK and raw HTTP."""

from __future__ import annotations

import base64
import math
import struct

import openai
import pytest

from imageworks_proxy.testing import user
from imageworks_proxy.testing.fakes.ollama import FakeOllama, ollama_entry
from imageworks_proxy.testing.fakes.openai import REQUESTS
from tests.openai_schemas import validate_embeddings, validate_error
from tests.proxy_helpers import log_records

EMBED_TAG = "nomic-embed-text:latest"
CHAT_TAG = "llama3.2:latest"


def floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest.fixture
async def passthrough(fake_openai_proxy, openai_sdk):
    """A proxy in front of the fake OpenAI-compatible server: entries m-<mode>, served id <mode>."""
    client, fake = await fake_openai_proxy()
    return client, fake, openai_sdk(client)


@pytest.fixture
def ollama(aiohttp_server, registry_file, make_config, proxy_client, openai_sdk):
    """``await ollama(**settings)``: a proxy in front of a fake Ollama holding an embedding model
    ("nomic embed") and a chat model ("llama3.2 3b")."""

    async def start(**settings):
        fake = FakeOllama({CHAT_TAG: ("completion", "tools"), EMBED_TAG: ("embedding",)})
        server = await aiohttp_server(fake.app())
        base = str(server.make_url("")).rstrip("/")
        registry_file([
            ollama_entry(base),
            ollama_entry(base, name="nomic-embed", display_name="nomic embed", tag=EMBED_TAG, vision=False,
                         capabilities=["embedding"]),
        ])
        client = await proxy_client(make_config(**settings))
        return client, fake, openai_sdk(client)

    return start


# -- OpenAI-compatible upstreams ---------------------------------------------------------------------
async def test_sdk_embeddings_through_a_passthrough_entry_are_schema_valid(passthrough):
    client, fake, sdk = passthrough
    result = await sdk.embeddings.create(model="m-echo", input=["first text", "second"])
    assert [d.index for d in result.data] == [0, 1] and len(result.data[0].embedding) == 8
    assert result.model == "m-echo"  # the id the client asked for, not the served id
    assert result.usage.prompt_tokens == 3 and result.usage.total_tokens == 3
    sent = fake[REQUESTS][-1]
    assert sent["path"] == "/v1/embeddings" and sent["body"]["model"] == "echo"
    resp = await client.post("/v1/embeddings", json={"model": "m-echo", "input": "one text"})
    assert resp.status == 200 and resp.headers["X-Request-Id"]
    validate_embeddings(await resp.json())


async def test_token_id_inputs_and_base64_reach_an_openai_upstream_as_sent(passthrough):
    client, fake, sdk = passthrough
    resp = await client.post(
        "/v1/embeddings", json={"model": "m-echo", "input": [[1, 2, 3]], "encoding_format": "base64"}
    )
    assert resp.status == 200
    body = await resp.json()
    assert len(floats(body["data"][0]["embedding"])) == 8
    assert fake[REQUESTS][-1]["body"]["input"] == [[1, 2, 3]]


async def test_a_bare_upstream_answer_is_completed_and_encoded_as_the_client_asked(passthrough):
    client, fake, sdk = passthrough
    # the "minimal" upstream sends floats without object, index or usage, whatever was asked
    plain = await client.post("/v1/embeddings", json={"model": "m-minimal", "input": "text"})
    body = await plain.json()
    validate_embeddings(body)
    vector = body["data"][0]["embedding"]
    # the SDK asks for base64 by default and decodes it: the proxy encoded the upstream's floats
    result = await sdk.embeddings.create(model="m-minimal", input="text")
    assert result.data[0].embedding == pytest.approx(vector, abs=1e-6)
    assert fake[REQUESTS][-1]["body"]["encoding_format"] == "base64"


async def test_unknown_models_and_bad_input_get_openai_errors(passthrough):
    client, fake, sdk = passthrough
    with pytest.raises(openai.NotFoundError) as err:
        await sdk.embeddings.create(model="no-such-model", input="x")
    assert err.value.body["code"] == "model_not_found"
    for body, param in (
        ({"model": "m-echo", "input": ""}, "input"),
        ({"model": "m-echo", "input": [1, "a"]}, "input"),
        ({"model": "m-echo"}, "input"),
        ({"model": "m-echo", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "m-echo", "input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x"}, "model"),
    ):
        resp = await client.post("/v1/embeddings", json=body)
        assert resp.status == 400, body
        error = await resp.json()
        validate_error(error)
        assert error["error"]["param"] == param
    upstream = await client.post("/v1/embeddings", json={"model": "m-error404", "input": "x"})
    assert upstream.status == 404
    assert all(r["body"].get("model") != "no-such-model" for r in fake[REQUESTS])


async def test_embeddings_are_logged_with_their_route_and_token_counts(passthrough):
    client, fake, sdk = passthrough
    await sdk.embeddings.create(model="m-echo", input="three short words")
    await sdk.embeddings.create(model="m-minimal", input="sixteen chars ok")  # no usage upstream
    echo, minimal = await log_records(client)
    assert (echo["endpoint"], echo["status"], echo["logical_name"]) == ("embeddings", 200, "m-echo")
    assert (echo["prompt_tokens"], echo["completion_tokens"], echo["tokens_estimated"]) == (3, 0, False)
    estimate = (minimal["prompt_tokens"], minimal["completion_tokens"], minimal["tokens_estimated"])
    assert estimate == (4, 0, True)  # 16 characters, about 4 a token


# -- Ollama ---------------------------------------------------------------------------------------
async def test_sdk_embeddings_through_ollama_are_translated_both_ways(ollama):
    client, fake, sdk = await ollama(OLLAMA_KEEP_ALIVE="10m")
    result = await sdk.embeddings.create(
        model="nomic embed", input=["a cat", "a dog sleeps"], encoding_format="float"
    )
    assert [d.index for d in result.data] == [0, 1]
    assert all(math.isclose(sum(v * v for v in d.embedding), 1.0, rel_tol=1e-6) for d in result.data)
    assert result.usage.prompt_tokens == 5 and result.usage.total_tokens == 5  # Ollama's prompt_eval_count
    assert result.model == "nomic embed"
    assert fake.embeds[-1] == {"model": EMBED_TAG, "input": ["a cat", "a dog sleeps"], "keep_alive": "10m"}
    resp = await client.post("/v1/embeddings", json={"model": "nomic embed", "input": "one"})
    validate_embeddings(await resp.json())


async def test_ollama_dimensions_and_base64_are_honoured(ollama):
    client, fake, sdk = await ollama()
    full = (await sdk.embeddings.create(model="nomic embed", input="text", encoding_format="float")).data[0]
    short = await sdk.embeddings.create(model="nomic embed", input="text", dimensions=3)  # SDK: base64
    assert fake.embeds[-1]["dimensions"] == 3
    vector = short.data[0].embedding
    assert len(vector) == 3 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-5)
    norm = math.sqrt(sum(v * v for v in full.embedding[:3]))
    assert vector == pytest.approx([v / norm for v in full.embedding[:3]], rel=1e-5)


async def test_an_ollama_that_ignores_dimensions_still_gives_the_asked_length(ollama):
    client, fake, sdk = await ollama()
    fake.knows_dimensions = False  # an Ollama from before `dimensions`: the unknown field is ignored
    body = {"model": "nomic embed", "input": "text", "dimensions": 2}
    vector = (await (await client.post("/v1/embeddings", json=body)).json())["data"][0]["embedding"]
    assert len(vector) == 2 and math.isclose(vector[0] ** 2 + vector[1] ** 2, 1.0, rel_tol=1e-6)


async def test_what_ollama_cannot_embed_gets_a_clear_error(ollama):
    client, fake, sdk = await ollama()
    tokens = await client.post("/v1/embeddings", json={"model": "nomic embed", "input": [[1, 2]]})
    assert tokens.status == 400
    assert "token ids" in (await tokens.json())["error"]["message"]
    assert fake.embeds == []  # refused before Ollama was asked
    with pytest.raises(openai.ConflictError) as err:  # a chat model: Ollama's runner has no embeddings
        await sdk.embeddings.create(model="llama3.2 3b", input="text")
    assert err.value.body["code"] == "capability_mismatch"
    assert "does not support embeddings" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await sdk.embeddings.create(model="nomic-embed-text-v9", input="text")


async def test_an_embedding_only_model_refuses_chat_and_is_marked_in_the_model_list(ollama):
    client, fake, sdk = await ollama()
    with pytest.raises(openai.ConflictError) as err:
        await sdk.chat.completions.create(model="nomic embed", messages=user("hi"))
    assert err.value.body["code"] == "capability_mismatch" and "/v1/embeddings" in err.value.body["message"]
    with pytest.raises(openai.ConflictError):
        await sdk.completions.create(model="nomic embed", prompt="def f(")
    assert fake.chats == [] and fake.generates == []
    models = {m.id: m.model_extra["extensions"] for m in (await sdk.models.list()).data}
    assert models["nomic embed"]["kind"] == "embedding"
    assert models["nomic embed"]["endpoints"] == ["embeddings"]
    assert models["llama3.2 3b"]["kind"] == "chat"
    assert models["llama3.2 3b"]["endpoints"] == ["chat/completions", "completions"]


async def test_a_refused_embeddings_request_is_logged_too(fake_openai_proxy):
    client, _ = await fake_openai_proxy(API_KEYS="sekrit")
    resp = await client.post("/v1/embeddings", json={"model": "m-echo", "input": "x"})
    assert resp.status == 401
    [record] = await log_records(client)
    assert (record["endpoint"], record["status"], record["error_code"]) == (
        "embeddings", 401, "invalid_api_key"
    )
