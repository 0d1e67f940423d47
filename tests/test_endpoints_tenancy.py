"""Embeddings and text completions under GPU tenancy: an orchestrated vLLM serves them with the same leases
and switches as chat, and an entry marked ``backend_config.gpu: false`` (a CPU embedding model) never
evicts the model that holds the GPU."""

from __future__ import annotations

import openai
import pytest

from imageworks_proxy.testing import free_port
from imageworks_proxy.testing.fakes.ollama import FakeOllama, ollama_entry
from tests.openai_schemas import validate_embeddings, validate_text_completion
from tests.orch_helpers import chat, events, orch_settings, started, vllm_entry

EMBED_TAG = "nomic-embed-text:latest"


def stops(tmp_path) -> list[str]:
    return [e["model"] for e in events(tmp_path) if e["event"] == "stop"]


@pytest.fixture
def proxy(tmp_path, aiohttp_server, registry_file, make_config, proxy_client, openai_sdk):
    """``await proxy(gpu=...)``: orchestrated vLLM models "chat" and "embedder" (``--runner pooling``) and
    an Ollama embedding entry whose ``backend_config.gpu`` is ``gpu``, with every tenant scheduled."""

    async def start(gpu=None):
        fake = FakeOllama({EMBED_TAG: ("embedding",)})
        server = await aiohttp_server(fake.app())
        extra = {} if gpu is None else {"backend_config": {"gpu": gpu}}
        registry_file([
            vllm_entry("chat", tmp_path),
            vllm_entry("embedder", tmp_path, "--runner", "pooling", capabilities=["embedding"]),
            ollama_entry(str(server.make_url("")).rstrip("/"), name="cpu-embed", display_name="cpu embed",
                         tag=EMBED_TAG, vision=False, capabilities=["embedding"], **extra),
        ])
        client = await proxy_client(make_config(**orch_settings(free_port(), GPU_EXCLUSIVE="1")))
        return client, fake, openai_sdk(client)

    return start


async def test_orchestrated_vllm_serves_text_completions_and_embeddings_with_switches(proxy, tmp_path):
    client, fake, sdk = await proxy()
    completion = await sdk.completions.create(model="chat", prompt="The capital of France is")
    validate_text_completion(completion.model_dump(exclude_unset=True))
    assert completion.choices[0].text.startswith("completed by served-chat pid ")
    assert completion.model == "chat"
    vectors = await sdk.embeddings.create(model="embedder", input=["a", "b"], encoding_format="float")
    validate_embeddings(vectors.model_dump(exclude_unset=True))
    assert len(vectors.data) == 2 and vectors.model == "embedder"
    # one vLLM at a time: the embedding model took the port and the GPU from the chat model
    assert [e["model"] for e in started(tmp_path)] == ["served-chat", "served-embedder"]
    assert stops(tmp_path) == ["served-chat"]
    health = await (await client.get("/v1/health")).json()
    assert health["vllm"]["active"] == "embedder"


async def test_a_chat_model_is_not_started_for_embeddings(proxy, tmp_path):
    client, fake, sdk = await proxy()
    await chat(client.app, "chat")
    with pytest.raises(openai.ConflictError) as err:
        await sdk.embeddings.create(model="chat", input="x")
    assert err.value.body["code"] == "capability_mismatch" and "--runner pooling" in err.value.body["message"]
    assert stops(tmp_path) == [] and len(started(tmp_path)) == 1  # the running model was left alone


async def test_a_cpu_embedding_model_does_not_evict_the_model_on_the_gpu(proxy, tmp_path):
    client, fake, sdk = await proxy(gpu=False)
    text, _, _ = await chat(client.app, "chat")
    result = await sdk.embeddings.create(model="cpu embed", input="text")
    assert len(result.data) == 1
    assert stops(tmp_path) == [] and fake.unloads == []
    health = await (await client.get("/v1/health")).json()
    assert health["vllm"]["active"] == "chat" and health["vllm"]["state"] == "loaded"
    again, _, _ = await chat(client.app, "chat")
    assert again == text  # the same process answered: nothing was restarted


async def test_an_embedding_model_on_the_gpu_takes_its_turn_like_chat(proxy, tmp_path):
    client, fake, sdk = await proxy()
    await chat(client.app, "chat")
    await sdk.embeddings.create(model="cpu embed", input="text")
    assert stops(tmp_path) == ["served-chat"]  # vLLM was stopped before Ollama took the GPU
    health = await (await client.get("/v1/health")).json()
    assert health["tenancy"]["active"] == "ollama" and health["vllm"]["state"] == "stopped"
