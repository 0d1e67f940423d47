"""A generated registry for the benchmark: one entry served by the upstream stub, the rest a realistic mix.

The other entries are never called; they make ``/v1/models`` and model resolution work at a realistic
size (Ollama tags the stub lists, vLLM entries with and without files on disk, external servers,
deprecated and test entries).
"""

from __future__ import annotations

import json
from pathlib import Path

_QUANTS = ("q4_k_m", "awq", "fp8", "", "q8_0", "gptq")
_FAMILIES = ("llama", "qwen2.5", "mistral", "gemma2", "phi3", "deepseek-r1")


#: The embedding entry served by the stub (its ``/embeddings``).
EMBED_MODEL = "bench-embed"


def entries(n: int, stub_base: str, bench_model: str, files: Path) -> list[dict]:
    out: list[dict] = [
        {
            "name": bench_model,
            "backend": "openai",
            "backend_config": {"base_url": stub_base},
            "served_model_id": "stub",
            "family": bench_model,
            "capabilities": ["tools"],
        },
        {
            "name": EMBED_MODEL,
            "backend": "openai",
            "backend_config": {"base_url": stub_base},
            "served_model_id": "stub-embed",
            "capabilities": ["embedding"],
        },
    ]
    host, port = stub_base.split("//", 1)[1].split("/", 1)[0].split(":")
    for i in range(2, n):
        family = f"{_FAMILIES[i % len(_FAMILIES)]}-{i}"
        size = f"{(i % 70) + 1}b"
        entry: dict = {"name": f"bench-model-{i}", "quantization": _QUANTS[i % len(_QUANTS)]}
        kind = i % 5
        if kind == 0:  # Ollama, tag listed by the stub's /api/tags
            entry.update(
                backend="ollama",
                served_model_id=f"bench{i}",
                backend_config={"model_path": f"ollama:/bench{i}"},
                metadata={"ollama_family": family, "ollama_parameter_size": size.upper()},
            )
        elif kind == 1:  # orchestrated vLLM with weights on disk (half of them present)
            path = files / f"model-{i}"
            if i % 2:
                path.mkdir(parents=True, exist_ok=True)
            entry.update(
                backend="vllm",
                family=f"{family}-{size}",
                download_path=str(path),
                backend_config={"model_path": str(path), "extra_args": ["--max-num-seqs", "8"]},
                served_model_id=f"{family}-{size}",
                generation_defaults={"temperature": 0.7},
            )
        elif kind == 2:  # external vLLM
            entry.update(
                backend="vllm",
                family=f"{family}-{size}",
                served_model_id=f"org/{family}",
                backend_config={"base_url": f"http://{host}:{port}/v1"},
            )
        elif kind == 3:  # another OpenAI-compatible server
            entry.update(
                backend="lmdeploy",
                family=f"{family}-{size}",
                served_model_id=family,
                backend_config={"host": host, "port": int(port)},
            )
        else:
            entry.update(
                backend="openai",
                display_name=f"Bench Model {i}",
                backend_config={"base_url": f"http://{host}:{port}/v1"},
                served_model_id=family,
            )
        entry["capabilities"] = ["vision", "tools"] if i % 3 == 0 else ["tools"]
        if i % 50 == 0:
            entry["deprecated"] = True
        if i % 97 == 0:
            entry.setdefault("metadata", {})["testing"] = True
        out.append(entry)
    return out


def write(work: Path, n: int, stub_base: str, bench_model: str) -> Path:
    path = work / "registry.json"
    path.write_text(json.dumps(entries(n, stub_base, bench_model, work / "weights"), indent=1))
    return path
