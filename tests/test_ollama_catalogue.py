"""Which Ollama models /v1/models lists: installed-only through Ollama's /api/tags; all of them, marked
unavailable, while Ollama does not answer."""

from __future__ import annotations

from imageworks_proxy.testing.fakes.ollama import FakeOllama, ollama_entry
from tests.openai_schemas import validate_models


async def _ids(client) -> list[str]:
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    validate_models(body)
    return sorted(m["id"] for m in body["data"])


async def _statuses(client) -> dict[str, str | None]:
    body = await (await client.get("/v1/models")).json()
    return {m["id"]: m["extensions"]["status"] for m in body["data"]}


async def test_lists_only_tags_installed_in_ollama(aiohttp_server, registry_file, make_config, proxy_client):
    fake = FakeOllama({"llama3.2:latest": ("completion",), "qwen3:8b": ("completion",)})
    server = await aiohttp_server(fake.app())
    base = str(server.make_url("")).rstrip("/")
    registry_file([
        ollama_entry(base, name="a", display_name="llama short tag", tag="llama3.2"),  # ":latest" implied
        ollama_entry(base, name="b", display_name="qwen", tag="qwen3:8b"),
        ollama_entry(base, name="c", display_name="not pulled", tag="mistral:7b"),
    ])
    client = await proxy_client(make_config())
    assert await _ids(client) == ["llama short tag", "qwen"]
    client_all = await proxy_client(make_config(INCLUDE_NON_INSTALLED=1))
    assert await _ids(client_all) == ["llama short tag", "not pulled", "qwen"]


async def test_ollama_down_lists_its_entries_as_unavailable(
    tmp_path, registry_file, make_config, proxy_client, unused_tcp_port_factory
):
    weights = tmp_path / "blob.gguf"
    weights.write_bytes(b"gguf")
    base = f"http://127.0.0.1:{unused_tcp_port_factory()}"
    registry_file(
        [
            ollama_entry(base, name="a", display_name="on disk", download_path=str(weights)),
            ollama_entry(
                base,
                name="b",
                display_name="elsewhere",
                tag="qwen3:8b",
                download_path=str(tmp_path / "missing"),
            ),
            ollama_entry(base, name="c", display_name="no path", tag="mistral:7b"),
        ]
    )
    client = await proxy_client(make_config())
    assert await _ids(client) == ["elsewhere", "no path", "on disk"]
    assert set((await _statuses(client)).values()) == {"unavailable"}


async def test_host_and_port_entries_and_the_loopback_alias(
    aiohttp_server, registry_file, make_config, proxy_client
):
    fake = FakeOllama()
    # Ollama "on another host": 127.0.0.2, reached from the registry's localhost only through the alias.
    server = await aiohttp_server(fake.app(), host="127.0.0.2")
    registry_file([ollama_entry(None, backend_config={"host": "localhost", "port": server.port})])
    plain = await proxy_client(make_config())
    assert await _statuses(plain) == {"llama3.2 3b": "unavailable"}  # localhost: nothing answers there
    aliased = await proxy_client(make_config(LOOPBACK_ALIAS="127.0.0.2"))
    assert await _statuses(aliased) == {"llama3.2 3b": "available"}
