"""The registry's JSON Schema, shipped in the package: it accepts the registries the proxy loads, refuses
the values the proxy refuses, and names every field the proxy reads or knows to ignore."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from imageworks_proxy.catalogue.entry import CAPABILITY_SYNONYMS, fields_read
from imageworks_proxy.catalogue.registry import RegistryError, parse_entry
from imageworks_proxy.catalogue.registry_keys import known_keys
from imageworks_proxy.testing.fakes.ollama import ollama_entry
from tests.orch_helpers import vllm_entry
from tests.test_registry import ENTRY_A

ROOT = Path(__file__).parent.parent

# object path in the registry -> its definition in the schema
DEFS = {
    "": "entry",
    "backend_config": "backendConfig",
    "chat_template": "chatTemplate",
    "generation_defaults": "generationDefaults",
    "probes": "probes",
    "probes.vision": "visionProbe",
    "metadata": "metadata",
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    text = resources.files("imageworks_proxy.catalogue").joinpath("registry.schema.json").read_text()
    data = json.loads(text)
    Draft202012Validator.check_schema(data)
    return data


def _errors(schema: dict[str, Any], registry: Any) -> list[str]:
    return [e.message for e in Draft202012Validator(schema).iter_errors(registry)]


def test_the_example_and_test_registries_are_valid(schema, tmp_path):
    registries = {
        "examples/registry.json": json.loads((ROOT / "examples" / "registry.json").read_text()),
        "imageworks-shaped": json.loads(
            (ROOT / "tests" / "data" / "registry_imageworks_shaped.json").read_text()
        ),
        "test entries": [
            ollama_entry("http://127.0.0.1:11434"),
            vllm_entry("alpha", tmp_path, "--max-num-seqs", "4"),
            ENTRY_A,
        ],
    }
    for name, registry in registries.items():
        assert _errors(schema, registry) == [], name
    assert _errors(schema, {"models": registries["examples/registry.json"]}) == []


def test_the_schema_names_every_key_the_proxy_reads_or_ignores_on_purpose(schema):
    props = {path: set(schema["$defs"][name]["properties"]) for path, name in DEFS.items()}
    for path, keys in known_keys().items():
        if path != "capabilities":
            assert props[path] == keys, f"schema and converter disagree on {path or 'the entry'}"
    for path, keys in fields_read().items():
        assert keys <= props[path], path
    capability_forms = schema["$defs"]["capabilities"]["anyOf"]
    named = next(f["properties"] for f in capability_forms if f.get("type") == "object")
    assert set(CAPABILITY_SYNONYMS.values()) <= set(named)


def test_every_metadata_key_the_proxy_reads_is_in_the_schema(schema):
    read: set[str] = set()
    for path in (ROOT / "imageworks_proxy").rglob("*.py"):
        read |= set(re.findall(r'\bmeta(?:data)?\.get\("([a-z_]+)"', path.read_text()))
    assert "default_system_prompt" in read  # the pattern finds them
    assert read - fields_read()["metadata"] == set()
    assert read - set(schema["$defs"]["metadata"]["properties"]) == set()


GOOD = [
    {"backend_config": {"port": "8000", "extra_args": "--max-model-len 8192"}},
    {"backend_config": {"port": 0, "host": None, "base_url": ""}},
    {"served_model_id": "None", "display_name": "", "quantization": 4},
    {"download_size_bytes": "123", "deprecated": "false"},
    {"capabilities": "vision, tools"},
    {"capabilities": {"vision": {"enabled": True, "target_long_edge": 448}, "tools": 0, "o1": None}},
    {"chat_template": "/t.jinja"},
    {"chat_template": {"path": None, "source": "embedded", "sha256": None}},
    {
        "generation_defaults": {
            "temperature": "0.7",
            "top_k": 40,
            "stop_sequences": [],
            "context_window": None,
        }
    },
    {"probes": {"vision": None}},
    {"probes": {"vision": {"vision_ok": True, "latency_ms": 12}}},
    {"metadata": None, "future_field": {"x": 1}},
]

BAD = [
    {"backend_config": {"port": "abc"}},
    {"backend_config": {"port": 70000}},
    {"backend_config": "localhost"},
    {"backend_config": {"extra_args": 8}},
    {"display_name": ["Qwen"]},
    {"download_size_bytes": "7GB"},
    {"capabilities": 3},
    {"capabilities": ["vision", 3]},
    {"capabilities": {"vision": "maybe"}},
    {"chat_template": ["/t.jinja"]},
    {"generation_defaults": {"temperature": "hot"}},
    {"generation_defaults": {"max_tokens": 1.5}},
    {"deprecated": "maybe"},
    {"metadata": ["testing"]},
    {"probes": {"vision": {"vision_ok": "sure"}}},
    {"backend": " "},
]


@pytest.mark.parametrize("fields", GOOD, ids=lambda f: json.dumps(f))
def test_schema_and_proxy_both_accept(schema, fields):
    entry = {"name": "m", "backend": "vllm", **fields}
    assert _errors(schema, [entry]) == []
    parse_entry(entry)


@pytest.mark.parametrize("fields", BAD, ids=lambda f: json.dumps(f))
def test_schema_and_proxy_both_refuse(schema, fields):
    entry = {"name": "m", "backend": "vllm", **fields}
    assert _errors(schema, [entry]) != []
    with pytest.raises(RegistryError, match="entry 'm': "):
        parse_entry(entry)


def test_schema_requires_a_name_and_a_backend(schema):
    assert _errors(schema, [{"name": "m"}]) == ["'backend' is a required property"]
    assert _errors(schema, [{"backend": "vllm"}]) == ["'name' is a required property"]
