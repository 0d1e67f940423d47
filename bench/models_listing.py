"""Measure GET /v1/models with a generated 500-entry registry (target: under 20 ms).

Starts the proxy in-process on loopback with a fake Ollama (/api/tags), then times sequential
requests from an aiohttp client. Prints figures; asserts nothing.

    .venv/bin/python bench/models_listing.py [--entries 500] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from imageworks_proxy import create_app, keys
from imageworks_proxy.config import load_config
from imageworks_proxy.plugins import make_plugin_manager


def generate(n: int, weights: Path, ollama_url: str) -> list[dict]:
    """A registry mix like a real one: Ollama tags, orchestrated vLLM with weights, external servers."""
    entries = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            entries.append({"name": f"ollama-{i}", "backend": "ollama", "served_model_id": f"model{i}:7b",
                            "backend_config": {"base_url": ollama_url}, "quantization": "q4_k_m",
                            "capabilities": {"vision": i % 8 == 0},
                            "metadata": {"ollama_family": f"llama{i}", "ollama_parameter_size": "7.2B"}})
        elif kind == 1:
            d = weights / f"m{i}"
            if i % 3:
                d.mkdir()
                (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
            entries.append({"name": f"vllm-{i}", "backend": "vllm", "download_path": str(d),
                            "family": f"Qwen2.5-VL-{i}B-Instruct-AWQ", "quantization": "awq",
                            "download_size_bytes": 123456789, "capabilities": ["vision", "tools"]})
        elif kind == 2:
            entries.append({"name": f"ext-{i}", "backend": "vllm", "family": f"gpt-oss-{i}b",
                            "backend_config": {"base_url": "http://127.0.0.1:9/v1"}, "quantization": "mxfp4"})
        else:
            entries.append({"name": f"lmd-{i}", "backend": "lmdeploy", "family": f"InternVL2-{i}B",
                            "backend_config": {"host": "127.0.0.1", "port": 23333},
                            "deprecated": i % 20 == 3})
    return entries


def fake_ollama(n: int) -> web.Application:
    tags = [{"name": f"model{i}:7b"} for i in range(0, n, 8)]

    async def api_tags(_request: web.Request) -> web.Response:
        return web.json_response({"models": tags})

    app = web.Application()
    app.router.add_get("/api/tags", api_tags)
    return app


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main(entries: int, requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ollama_runner = web.AppRunner(fake_ollama(entries))
        await ollama_runner.setup()
        ollama_site = web.TCPSite(ollama_runner, "127.0.0.1", 0)
        await ollama_site.start()
        ollama_port = ollama_runner.addresses[0][1]

        weights = tmp_path / "weights"
        weights.mkdir()
        registry = tmp_path / "registry.json"
        registry.write_text(json.dumps(generate(entries, weights, f"http://127.0.0.1:{ollama_port}")))
        config = load_config(
            {
                "CHAT_PROXY_REGISTRY": str(registry),
                "CHAT_PROXY_LOG_PATH": str(tmp_path / "l.jsonl"),
                # the state lock and the remembered model ids live next to it: in the temp dir, not in ./
                "CHAT_PROXY_VLLM_STATE_PATH": str(tmp_path / "state" / "active_vllm.json"),
            }
        )
        app = create_app(config, plugin_manager=make_plugin_manager(load_entrypoints=False))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/models"

        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:  # first call: waits (briefly) for Ollama's tags
                listed = len((await resp.json())["data"])
            for _ in range(20):
                async with session.get(url) as resp:
                    await resp.read()
            client_ms = []
            for _ in range(requests):
                t0 = time.perf_counter()
                async with session.get(url) as resp:
                    body = await resp.read()
                client_ms.append((time.perf_counter() - t0) * 1000)

        models = keys.models(app)
        warm_ms, cold_ms = [], []
        for _ in range(requests):
            t0 = time.perf_counter()
            await models.listing()
            warm_ms.append((time.perf_counter() - t0) * 1000)
        for _ in range(min(requests, 50)):
            models._fs_cache.clear()  # as after the 2 s filesystem-facts cache expires
            models._fs_checked_at = float("-inf")
            t0 = time.perf_counter()
            await models.listing()
            cold_ms.append((time.perf_counter() - t0) * 1000)

        await runner.cleanup()
        await ollama_runner.cleanup()

    print(f"registry entries: {entries}, listed: {listed}, response: {len(body)} bytes")
    for label, values in (
        ("GET /v1/models (client, loopback)", client_ms),
        ("listing() in process, caches warm", warm_ms),
        ("listing() in process, filesystem cache cold", cold_ms),
    ):
        print(
            f"{label:<46} median {statistics.median(values):6.2f} ms  p95 {pct(values, 95):6.2f} ms  "
            f"max {max(values):6.2f} ms  (n={len(values)})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.entries, args.requests))
