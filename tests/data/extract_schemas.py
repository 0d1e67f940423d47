"""Regenerate openai_schemas.json from the official OpenAPI file (needs PyYAML).

Usage: python tests/data/extract_schemas.py PATH/TO/openapi.yaml

(``openapi.yaml`` from a checkout of github.com/openai/openai-openapi, at the commit named in the output.)
"""

import json
import sys
from pathlib import Path

import yaml

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "ListModelsResponse",
         "ErrorResponse", "Model", "CreateEmbeddingResponse", "CreateCompletionResponse"]


def refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v.rsplit("/", 1)[-1]
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for x in node:
            yield from refs(x)


def main(path: str) -> None:
    schemas = yaml.safe_load(Path(path).read_text())["components"]["schemas"]
    seen, stack = {}, list(ROOTS)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen[name] = schemas[name]
            stack.extend(refs(schemas[name]))
    out = {
        "$comment": "Subset of components.schemas from github.com/openai/openai-openapi openapi.yaml at "
        "commit f85dbe223d40e1a31cba812ab2d755c7e98a92a3 (info.version 2.3.0), copied unchanged "
        "(MIT licence, see OPENAI_OPENAPI_LICENSE). Extracted by tests/data/extract_schemas.py.",
        "components": {"schemas": dict(sorted(seen.items()))},
    }
    (Path(__file__).parent / "openai_schemas.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
