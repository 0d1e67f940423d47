"""Registry entries: the quirks the proxy accepts, the errors a user reads for bad values, and the warnings
that name keys nobody reads."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest

from imageworks_proxy.catalogue.registry import RegistryError, load_registry

DATA = Path(__file__).parent / "data"


def _load(tmp_path: Path, *entries: dict):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(list(entries)))
    return load_registry(path)


def _one(tmp_path: Path, **fields):
    return _load(tmp_path, {"name": "qwen", "backend": "vllm", **fields}).entries[0]


def _error(tmp_path: Path, *entries: dict) -> str:
    with pytest.raises(RegistryError) as info:
        _load(tmp_path, *entries)
    return str(info.value)


# -- what the registry may say ----------------------------------------------------------------------


def test_numbers_given_as_strings_are_numbers(tmp_path):
    entry = _one(
        tmp_path,
        download_size_bytes=" 123456 ",
        backend_config={"port": "8000"},
        generation_defaults={"temperature": "0.7", "top_k": "40", "max_tokens": 512.0},
    )
    assert entry.backend_config.port == 8000
    assert entry.download_size_bytes == 123456
    assert entry.generation_defaults == {"temperature": 0.7, "top_k": 40, "max_tokens": 512}


@pytest.mark.parametrize("absent", [None, "", "None"])
def test_null_empty_and_none_string_mean_absent_everywhere(tmp_path, absent):
    entry = _one(
        tmp_path,
        display_name=absent,
        quantization=absent,
        download_size_bytes=absent,
        backend_config={"host": absent, "port": absent, "model_path": "org/m"},
        chat_template={"path": absent},
    )
    assert (entry.display_name, entry.quantization, entry.download_size_bytes) == (None, None, None)
    bc = entry.backend_config
    assert (bc.host, bc.port, entry.chat_template_path) == (None, None, None)


def test_extra_args_as_one_shell_string(tmp_path):
    entry = _one(
        tmp_path,
        backend_config={"extra_args": "--max-model-len 8192 --chat-template '/templates/my model.jinja'"},
    )
    assert entry.backend_config.extra_args == (
        "--max-model-len",
        "8192",
        "--chat-template",
        "/templates/my model.jinja",
    )


def test_capabilities_in_string_list_and_object_form_fold_synonyms(tmp_path):
    by = _load(
        tmp_path,
        {"name": "s", "backend": "vllm", "capabilities": "Multimodal, function_calling"},
        {"name": "l", "backend": "vllm", "capabilities": ["vl", "Thinking", "embeddings"]},
        {
            "name": "o",
            "backend": "vllm",
            "capabilities": {
                "vision": {"enabled": False, "target_long_edge": 448},
                "tool_use": True,
                "audio": 0,
            },
        },
        {
            "name": "p",
            "backend": "vllm",
            "capabilities": {"image": True},
            "probes": {"vision": {"vision_ok": False}},
        },
    ).by_name
    assert by["s"].capabilities == {"vision", "tools"}
    assert by["l"].capabilities == {"vision", "reasoning", "embedding"}
    assert by["o"].capabilities == {"tools"}
    assert not by["p"].vision


def test_chat_template_may_be_the_path_itself(tmp_path):
    assert _one(tmp_path, chat_template="~/t/chat.jinja").chat_template_path == "~/t/chat.jinja"


def test_empty_stop_lists_and_nulls_in_generation_defaults_are_dropped(tmp_path):
    entry = _one(
        tmp_path,
        generation_defaults={"stop_sequences": [], "temperature": None, "top_p": 0.9, "context_window": 8192},
    )
    assert dict(entry.generation_defaults) == {"top_p": 0.9, "context_window": 8192}


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("True", True), (0, False), (None, False)])
def test_deprecated_reads_spelled_out_flags(tmp_path, value, expected):
    assert _one(tmp_path, deprecated=value).deprecated is expected


# -- what a user reads for a bad value ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"backend_config": {"port": "abc"}}, "backend_config.port: expected an integer, got 'abc'"),
        (
            {"backend_config": {"port": 70000}},
            "backend_config.port: expected a port number (1-65535), got 70000",
        ),
        ({"backend_config": "localhost"}, "backend_config: expected an object, got 'localhost'"),
        (
            {"backend_config": {"extra_args": 8}},
            "backend_config.extra_args: expected a list of arguments or one string, got 8",
        ),
        (
            {"backend_config": {"extra_args": ["--a", {"b": 1}]}},
            "backend_config.extra_args[1]: expected a string, got {'b': 1}",
        ),
        (
            {"backend_config": {"extra_args": "--chat-template '/t.jinja"}},
            'backend_config.extra_args: cannot split "--chat-template \'/t.jinja" into arguments: '
            "No closing quotation",
        ),
        ({"display_name": ["Qwen"]}, "display_name: expected a string, got ['Qwen']"),
        ({"download_size_bytes": "7GB"}, "download_size_bytes: expected an integer, got '7GB'"),
        (
            {"capabilities": 3},
            "capabilities: expected a list of names, an object of flags or a string, got 3",
        ),
        ({"capabilities": ["vision", 3]}, "capabilities[1]: expected a capability name, got 3"),
        ({"capabilities": {"vision": "maybe"}}, "capabilities.vision: expected true or false, got 'maybe'"),
        (
            {"probes": {"vision": {"vision_ok": "sure"}}},
            "probes.vision.vision_ok: expected true or false, got 'sure'",
        ),
        ({"chat_template": ["/t.jinja"]}, "chat_template: expected an object, got ['/t.jinja']"),
        (
            {"generation_defaults": {"temperature": "hot"}},
            "generation_defaults.temperature: expected a number, got 'hot'",
        ),
        (
            {"generation_defaults": {"max_tokens": 1.5}},
            "generation_defaults.max_tokens: expected an integer, got 1.5",
        ),
        (
            {"generation_defaults": {"stop_sequences": [1]}},
            "generation_defaults.stop_sequences: expected a string or a list of strings, got [1]",
        ),
        ({"deprecated": "maybe"}, "deprecated: expected true or false, got 'maybe'"),
        ({"metadata": ["testing"]}, "metadata: expected an object, got ['testing']"),
        (
            {"backend": " "},
            """backend: expected a backend name such as "ollama", "vllm" or "openai", got ' '""",
        ),
    ],
)
def test_a_bad_value_names_the_file_the_entry_and_the_field(tmp_path, fields, message):
    text = _error(tmp_path, {"name": "qwen", "backend": "vllm", **fields})
    assert text == f"{tmp_path / 'registry.json'}: entry 'qwen': {message}"


def test_every_bad_value_of_an_entry_is_named(tmp_path):
    text = _error(tmp_path, {"name": "qwen", "backend_config": {"port": "abc"}, "deprecated": "maybe"})
    assert text.endswith(
        "entry 'qwen': missing \"backend\"; backend_config.port: expected an integer, got 'abc'; "
        "deprecated: expected true or false, got 'maybe'"
    )


def test_every_bad_entry_is_named_up_to_five(tmp_path):
    bad = [{"name": f"m{i}", "backend": "vllm", "backend_config": {"port": "x"}} for i in range(7)]
    text = _error(tmp_path, {"name": "good", "backend": "ollama"}, *bad)
    assert "entry 'm0': backend_config.port" in text and "entry 'm4': backend_config.port" in text
    assert "entry 'm5'" not in text and text.endswith("; and 2 more entries")
    assert "'good'" not in text


def test_a_bad_value_in_a_layered_directory_names_the_directory(tmp_path):
    (tmp_path / "model_registry.discovered.json").write_text(json.dumps([{"name": "m", "backend": "vllm"}]))
    (tmp_path / "model_registry.curated.json").write_text(
        json.dumps([{"name": "m", "backend_config": {"port": "auto"}}])
    )
    with pytest.raises(RegistryError) as info:
        load_registry(tmp_path)
    assert str(info.value) == f"{tmp_path}: entry 'm': backend_config.port: expected an integer, got 'auto'"


# -- named mistakes: keys nobody reads -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "warning"),
    [
        ({"backend_confg": {}}, "entry 'qwen': unknown key 'backend_confg' (did you mean 'backend_config'?)"),
        ({"served_model": "q"}, "entry 'qwen': unknown key 'served_model' (did you mean 'served_model_id'?)"),
        (
            {"backend_config": {"prot": 8000}},
            "entry 'qwen': backend_config: unknown key 'prot' (did you mean 'port'?)",
        ),
        (
            {"generation_defaults": {"temprature": 0.2}},
            "entry 'qwen': generation_defaults: unknown key 'temprature' (did you mean 'temperature'?)",
        ),
        (
            {"chat_template": {"pth": "/t.jinja"}},
            "entry 'qwen': chat_template: unknown key 'pth' (did you mean 'path'?)",
        ),
        (
            {"capabilities": {"visoin": True}},
            "entry 'qwen': capabilities: unknown key 'visoin' (did you mean 'vision'?)",
        ),
        ({"gpu_memory": 0.9}, "entry 'qwen': unknown key 'gpu_memory'"),
    ],
)
def test_an_unknown_key_is_named_with_the_closest_known_one(tmp_path, fields, warning):
    registry = _load(tmp_path, {"name": "qwen", "backend": "vllm", **fields})
    assert registry.warnings == (warning,)
    assert [e.name for e in registry.entries] == ["qwen"]  # a warning never stops the load


def test_imageworks_entries_metadata_and_comment_keys_do_not_warn(tmp_path):
    assert load_registry(DATA / "registry_imageworks_shaped.json").warnings == ()
    registry = _load(
        tmp_path,
        {
            "name": "a",
            "backend": "ollama",
            "_comment": "kept for the lab",
            "metadata": {"anything": 1},
            "capabilities": {"Vision": True, " tools ": True},
        },
    )
    assert registry.warnings == ()


async def test_warnings_are_logged_once_per_load_and_shown_in_health(
    make_config, registry_file, proxy_client, caplog
):
    caplog.set_level(logging.WARNING, logger="imageworks_proxy.catalogue.registry")
    path = registry_file([{"name": "qwen", "backend": "openai", "backend_confg": {}}])
    client = await proxy_client(make_config(REGISTRY=str(path)))
    warning = "entry 'qwen': unknown key 'backend_confg' (did you mean 'backend_config'?)"
    health = await (await client.get("/v1/health")).json()
    assert health["registry"]["warnings"] == [warning]
    assert [r.levelno for r in caplog.records if warning in r.getMessage()] == [logging.WARNING]

    path.write_text(json.dumps([{"name": "qwen", "backend": "openai", "backend_config": {}}]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    deadline = time.monotonic() + 3
    while health["registry"]["warnings"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        health = await (await client.get("/v1/health")).json()
    assert health["registry"]["warnings"] == []
    assert len([r for r in caplog.records if warning in r.getMessage()]) == 1
