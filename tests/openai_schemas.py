"""Validate proxy output against the official OpenAI schemas (subset in tests/data/openai_schemas.json).

The file is OpenAPI 3.1 but still uses 3.0's ``nullable: true``, which JSON Schema 2020-12 does not know
(a validator ignores it and rejects every ``null``); it is rewritten to ``anyOf [.., null]`` before
validation.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_FILE = Path(__file__).parent / "data" / "openai_schemas.json"


def _fix_nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _fix_nullable(v) for k, v in node.items()}
        return {"anyOf": [node, {"type": "null"}]} if node.pop("nullable", False) is True else node
    if isinstance(node, list):
        return [_fix_nullable(x) for x in node]
    return node


@cache
def _validator(component: str) -> Draft202012Validator:
    spec = _fix_nullable(json.loads(_FILE.read_text()))
    registry = Registry().with_resource(
        "urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{component}"}, registry=registry)


def validate(component: str, instance: Any) -> None:
    """Raise ``AssertionError`` listing every schema violation of ``instance``."""
    errors = sorted(_validator(component).iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        lines = [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:10]]
        raise AssertionError(f"{component} schema violations:\n" + "\n".join(lines))


def validate_completion(body: Any) -> None:
    validate("CreateChatCompletionResponse", body)


def validate_chunk(body: Any) -> None:
    validate("CreateChatCompletionStreamResponse", body)


def validate_error(body: Any) -> None:
    validate("ErrorResponse", body)


def validate_models(body: Any) -> None:
    validate("ListModelsResponse", body)


def validate_embeddings(body: Any) -> None:
    validate("CreateEmbeddingResponse", body)


def validate_text_completion(body: Any) -> None:
    validate("CreateCompletionResponse", body)


def validate_text_completion_chunk(body: Any) -> None:
    """One streamed text completion chunk. OpenAI's streams carry ``finish_reason: null`` until a choice
    ends, which the schema (shared with the non-streamed object) does not allow; that one field is checked
    as "null or a finish reason", everything else as the schema says."""
    relaxed = json.loads(json.dumps(body))
    for choice in relaxed.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason") is None and "finish_reason" in choice:
            choice["finish_reason"] = "stop"
    validate("CreateCompletionResponse", relaxed)
