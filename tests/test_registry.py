"""The registry: file and layered formats, load errors, and hot reload through the running app."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from imageworks_proxy.catalogue.registry import RegistryError, deep_merge, load_registry


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _bump_mtime(path: Path) -> None:
    # Coarse-mtime filesystems: make sure an edit is visible as a change even within one tick.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# -- loading ----------------------------------------------------------------------------------------

def test_single_file_loads_every_entry(tmp_path):
    path = _write(tmp_path / "r.json", [
        {"name": "a", "backend": "ollama", "served_model_id": "a:1b"},
        {"name": "b", "backend": "vllm", "backend_config": {"model_path": "/m/b", "port": "8000"}},
    ])
    reg = load_registry(path)
    assert [e.name for e in reg.entries] == ["a", "b"]
    assert reg.by_name["b"].backend_config.model_path == "/m/b"
    assert reg.by_name["b"].backend_config.port == 8000
    assert reg.source == str(path)


def test_unknown_fields_are_ignored_but_kept_in_raw(tmp_path):
    path = _write(tmp_path / "r.json", [
        {"name": "a", "backend": "openai", "future_field": {"x": 1}, "backend_config": {"whatever": True}},
    ])
    entry = load_registry(path).entries[0]
    assert entry.raw["future_field"] == {"x": 1}
    assert entry.backend == "openai"


@pytest.mark.parametrize("absent", [None, "", "None"])
def test_served_model_id_null_empty_or_none_string_mean_absent(tmp_path, absent):
    path = _write(tmp_path / "r.json", [{"name": "a", "backend": "vllm", "served_model_id": absent,
                                          "backend_config": {"model_path": "org/model"}}])
    entry = load_registry(path).entries[0]
    assert entry.served_model_id is None
    assert entry.upstream_model == "org/model"


def test_capability_synonyms_and_vision_probe_override(tmp_path):
    path = _write(
        tmp_path / "r.json",
        [
            {
                "name": "a",
                "backend": "vllm",
                "capabilities": {"multimodal": True, "thinking": True, "tools": False},
            },
            {
                "name": "b",
                "backend": "vllm",
                "capabilities": ["vision"],
                "probes": {"vision": {"vision_ok": False}},
            },
            {"name": "c", "backend": "vllm", "capabilities": [], "probes": {"vision": {"vision_ok": True}}},
        ],
    )
    by = load_registry(path).by_name
    assert by["a"].capabilities == {"vision", "reasoning"}
    assert not by["b"].vision
    assert by["c"].vision


def test_layered_directory_deep_merges_curated_over_discovered(tmp_path):
    _write(
        tmp_path / "model_registry.discovered.json",
        [
            {
                "name": "m",
                "backend": "vllm",
                "quantization": "awq",
                "family": "discovered-family",
                "backend_config": {"model_path": "/weights/m", "port": 8000, "extra_args": ["--a"]},
                "metadata": {"ollama_family": "x", "testing": False},
            },
            {"name": "only-discovered", "backend": "ollama"},
        ],
    )
    _write(
        tmp_path / "model_registry.curated.json",
        [
            {
                "name": "m",
                "family": None,
                "display_name": "My Model",
                "backend_config": {"port": 9000, "extra_args": ["--b"], "model_path": None},
                "metadata": {"testing": True, "ollama_family": None},
            },
            {"name": "only-curated", "backend": "openai"},
        ],
    )
    reg = load_registry(tmp_path)
    by = reg.by_name
    assert set(by) == {"m", "only-discovered", "only-curated"}
    m = by["m"]
    assert m.display_name == "My Model"  # curated adds
    assert m.family == "discovered-family"  # curated null never erases
    assert m.backend == "vllm" and m.quantization == "awq"  # discovered kept
    assert m.backend_config.port == 9000  # nested scalar replaced
    assert m.backend_config.model_path == "/weights/m"  # nested null never erases
    assert m.backend_config.extra_args == ("--b",)  # lists replace, not append
    assert m.metadata == {"ollama_family": "x", "testing": True}


def test_layered_directory_with_only_one_layer(tmp_path):
    _write(tmp_path / "model_registry.curated.json", [{"name": "c", "backend": "openai"}])
    _write(tmp_path / "model_registry.json", [{"name": "ignored", "backend": "openai"}])
    assert [e.name for e in load_registry(tmp_path).entries] == ["c"]


def test_directory_with_model_registry_json_alone(tmp_path):
    _write(tmp_path / "model_registry.json", [{"name": "single", "backend": "ollama"}])
    assert [e.name for e in load_registry(tmp_path).entries] == ["single"]


def test_deep_merge_is_pure():
    base = {"a": {"b": 1}}
    over = {"a": {"c": 2}}
    assert deep_merge(base, over) == {"a": {"b": 1, "c": 2}}
    assert base == {"a": {"b": 1}} and over == {"a": {"c": 2}}


def test_duplicate_name_is_an_error_naming_both(tmp_path):
    path = _write(
        tmp_path / "r.json",
        [
            {"name": "x", "backend": "ollama"},
            {"name": "y", "backend": "ollama"},
            {"name": "x", "backend": "vllm"},
        ],
    )
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert "duplicate name 'x'" in str(info.value)
    assert "items 0 and 2" in str(info.value)


def test_duplicate_name_within_a_layer_is_an_error(tmp_path):
    _write(tmp_path / "model_registry.discovered.json", [{"name": "x", "backend": "ollama"}] * 2)
    with pytest.raises(RegistryError, match="duplicate name 'x'"):
        load_registry(tmp_path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('[{"name": "a", "backend": "ollama"', "invalid JSON"),
        ('{"name": "a"}', "expected a JSON list"),
        ('[{"backend": "ollama"}]', '"name"'),
        ('[{"name": "a"}]', 'missing "backend"'),
        ('[{"name": "a", "backend": "vllm", "backend_config": {"port": "high"}}]',
         "entry 'a': backend_config.port: expected an integer, got 'high'"),
        ("[42]", "entry object"),
    ],
)
def test_bad_registry_is_an_error_naming_the_file(tmp_path, content, expected):
    path = _write(tmp_path / "r.json", content)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_missing_registry_says_how_to_point_at_one(tmp_path):
    with pytest.raises(RegistryError, match="CHAT_PROXY_REGISTRY"):
        load_registry(tmp_path / "nope.json")


# -- hot reload through the running app -----------------------------------------------------------------


async def _ids(client) -> list[str]:
    resp = await client.get("/v1/models")
    assert resp.status == 200
    return sorted(m["extensions"]["logical_id"] for m in (await resp.json())["data"])


async def _poll(check, timeout: float = 3.0):
    """Call ``check`` until it returns a truthy value (bounded; no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def _health(client) -> dict:
    resp = await client.get("/v1/health")
    assert resp.status == 200
    return await resp.json()


ENTRY_A = {"name": "a", "backend": "openai", "backend_config": {"base_url": "http://127.0.0.1:9/v1"}}
ENTRY_B = {"name": "b", "backend": "openai", "backend_config": {"base_url": "http://127.0.0.1:9/v1"}}


async def test_editing_the_registry_file_changes_the_model_list(make_config, registry_file, proxy_client):
    path = registry_file([ENTRY_A])
    client = await proxy_client(make_config(REGISTRY=str(path)))
    assert await _ids(client) == ["a"]

    _write(path, [ENTRY_A, ENTRY_B])
    _bump_mtime(path)

    async def both():
        return await _ids(client) == ["a", "b"]

    assert await _poll(both), "the edit was not picked up"
    health = await _health(client)
    assert health["registry"]["models"] == 2 and health["registry"]["error"] is None


async def test_replacing_the_file_atomically_is_picked_up(make_config, registry_file, proxy_client, tmp_path):
    path = registry_file([ENTRY_A])
    client = await proxy_client(make_config(REGISTRY=str(path)))
    old = path.stat()
    tmp = _write(tmp_path / "new.json", [ENTRY_B])
    assert tmp.stat().st_size == old.st_size
    os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))  # same size, same mtime (rsync -t, one clock tick)
    os.replace(tmp, path)  # editors and tools that write a temp file and rename it

    async def swapped():
        return await _ids(client) == ["b"]

    assert await _poll(swapped)


async def test_broken_edit_keeps_last_good_registry_then_recovers(
    make_config, registry_file, proxy_client, caplog
):
    path = registry_file([ENTRY_A])
    client = await proxy_client(make_config(REGISTRY=str(path)))
    assert (await _health(client))["registry"]["error"] is None

    path.write_text('[{"name": "a", "backend": ')
    _bump_mtime(path)

    async def error_shown():
        h = await _health(client)
        return h if h["registry"]["error"] else None

    health = await _poll(error_shown)
    assert health, "/v1/health never reported the broken registry"
    assert "invalid JSON" in health["registry"]["error"] and str(path) in health["registry"]["error"]
    assert health["registry"]["models"] == 1
    assert await _ids(client) == ["a"], "the last good registry must stay in service"
    assert any("keeping the last good registry" in r.getMessage() for r in caplog.records)

    _write(path, [ENTRY_A, ENTRY_B])
    _bump_mtime(path)

    async def recovered():
        h = await _health(client)
        return h["registry"]["error"] is None and await _ids(client) == ["a", "b"]

    assert await _poll(recovered), "fixing the file did not clear the error"


async def test_duplicate_name_edit_is_reported_in_health(make_config, registry_file, proxy_client):
    path = registry_file([ENTRY_A])
    client = await proxy_client(make_config(REGISTRY=str(path)))
    _write(path, [ENTRY_A, ENTRY_A])
    _bump_mtime(path)

    async def error_shown():
        return (await _health(client))["registry"]["error"]

    assert "duplicate name 'a'" in (await _poll(error_shown) or "")
    assert await _ids(client) == ["a"]


async def test_layered_directory_reloads_when_a_layer_changes(make_config, tmp_path, proxy_client):
    reg = tmp_path / "reg"
    reg.mkdir()
    _write(reg / "model_registry.discovered.json", [ENTRY_A])
    client = await proxy_client(make_config(REGISTRY=str(reg)))
    assert await _ids(client) == ["a"]

    curated = _write(reg / "model_registry.curated.json", [ENTRY_B])  # a new layer file appears
    _bump_mtime(curated)

    async def merged():
        return await _ids(client) == ["a", "b"]

    assert await _poll(merged)


async def test_broken_registry_at_startup_serves_an_empty_list_and_says_why(
    make_config, registry_file, proxy_client
):
    path = registry_file([ENTRY_A])
    path.write_text("not json")
    client = await proxy_client(make_config(REGISTRY=str(path)))
    health = await _health(client)
    assert health["status"] == "ok"
    assert "invalid JSON" in health["registry"]["error"]
    assert await _ids(client) == []

    _write(path, [ENTRY_A])
    _bump_mtime(path)

    async def loaded():
        return await _ids(client) == ["a"]

    assert await _poll(loaded)
