#!/usr/bin/env python3
"""Benchmark the proxy against a direct upstream and a reference passthrough, in one run.

Starts the upstream stub, the reference passthrough and ``imageworks-chat-proxy`` (request log and
metrics on, a generated 500-entry registry), drives all three with the same load (wrk, or
``loadgen.py`` when wrk is missing): chat completions, streamed and not, and embeddings. Writes a
Markdown report.

    python bench/run.py            # full run, about 5 minutes, writes bench/RESULTS.md
    python bench/run.py --quick    # a few seconds per figure, writes bench/out/RESULTS.quick.md
    python bench/run.py --soak     # adds a 10-minute soak that samples the proxy's memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import drivers  # noqa: E402
import machine  # noqa: E402
import registry_gen  # noqa: E402
import report  # noqa: E402
from procs import Service, Services, cpu_plan, cpu_seconds, free_port, http_get, http_post, rss_mb  # noqa: E402

TARGETS = ("upstream", "reference", "proxy")
MODES = ("non-stream", "stream", "embeddings")
#: The route of each mode, below the /v1 base URL of each target.
ROUTES = {"non-stream": "/chat/completions", "stream": "/chat/completions", "embeddings": "/embeddings"}
CONCURRENCY = (1, 32)
MODEL = "bench-stub"


def chat_body(stream: bool) -> bytes:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello in five words."},
        ],
        "max_tokens": 32,
        "temperature": 0.2,
        "stream": stream,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def embed_body() -> bytes:
    """What OpenWebUI's RAG sends for one chunk of a document (floats, as it asks for them)."""
    body = {
        "model": registry_gen.EMBED_MODEL,
        "input": ["The quick brown fox jumps over the lazy dog; a short passage from a document."],
        "encoding_format": "float",
    }
    return json.dumps(body, separators=(",", ":")).encode()


def body_for(mode: str) -> bytes:
    return embed_body() if mode == "embeddings" else chat_body(mode == "stream")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark imageworks-chat-proxy against a reference passthrough."
    )
    p.add_argument("--quick", action="store_true", help="very short runs (smoke test); numbers are rough")
    p.add_argument(
        "--soak", action="store_true", help="also run a soak and report the proxy's memory over it"
    )
    p.add_argument("--soak-minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--seconds", type=float, help="length of each load run (default 3; --quick 1)")
    p.add_argument(
        "--rounds", type=int, help="rounds over all scenarios; medians are reported (default 5; --quick 1)"
    )
    p.add_argument("--entries", type=int, default=500, help="registry size for /v1/models (default 500)")
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk when installed (auto), or the Python fallback",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin the server under test to its own CPU")
    p.add_argument(
        "--output",
        type=Path,
        help="Markdown report (default bench/RESULTS.md; --quick bench/out/RESULTS.quick.md)",
    )
    p.add_argument("--json", type=Path, help="also write the raw figures as JSON here")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.rounds = args.rounds or (1 if args.quick else 5)
    if args.output is None:
        args.output = HERE / "out" / "RESULTS.quick.md" if args.quick else HERE / "RESULTS.md"
    return args


def proxy_env(port: int, registry: Path, work: Path, stub_base: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update(
        {
            "CHAT_PROXY_HOST": "127.0.0.1",
            "CHAT_PROXY_PORT": str(port),
            "CHAT_PROXY_REGISTRY": str(registry),
            "CHAT_PROXY_LOG_PATH": str(work / "chat_proxy.jsonl"),  # the request log, on as users run it
            "CHAT_PROXY_ENABLE_METRICS": "1",
            "CHAT_PROXY_OLLAMA_BASE_URL": stub_base.removesuffix("/v1"),
            "CHAT_PROXY_VLLM_STATE_PATH": str(work / "active_vllm.json"),
            "CHAT_PROXY_VLLM_LOG_DIR": str(work / "vllm"),
        }
    )
    return env


def probe(base: str) -> str | None:
    """None when the proxy answers a chat and an embeddings request with 200, else why not."""
    for mode in ("non-stream", "embeddings"):
        for _ in range(5):
            status, body = http_post(base + ROUTES[mode], body_for(mode))
            if status == 200:
                break
            time.sleep(0.2)
        else:
            why = body[:200].decode(errors="replace")
            return f"POST /v1{ROUTES[mode]} answered {status or 'nothing'}: {why}"
    return None


def median_result(results: list[drivers.LoadResult]) -> dict:
    cpu = [r.cpu_us for r in results if r.cpu_us is not None]
    out = {
        "cpu_us": statistics.median(cpu) if cpu else None,
        "rps": statistics.median(r.rps for r in results),
        "p50_ms": statistics.median(r.p50_ms for r in results),
        "p99_ms": statistics.median(r.p99_ms for r in results),
        "mean_ms": statistics.median(r.mean_ms for r in results),
        "requests": sum(r.requests for r in results),
        "errors": sum(r.errors for r in results),
    }
    return out


def run_chat(
    args, driver: drivers.Driver, bases: dict[str, str], pids: dict[str, int], skip: set[str]
) -> list[dict]:
    """Every scenario (chat, streamed and not, and embeddings) for every target, interleaved, ``rounds``
    times; medians per (scenario, target)."""
    raw: dict[tuple[str, int, str], list[drivers.LoadResult]] = {}
    warm = 20 if args.quick else 300
    for target in TARGETS:
        if target in skip:
            continue
        for mode in MODES:  # warm pools and caches before anything is measured
            driver.loadgen(bases[target] + ROUTES[mode], concurrency=8, requests=warm, body=body_for(mode))
    for rnd in range(args.rounds):
        for mode in MODES:
            for conc in CONCURRENCY:
                for target in TARGETS:
                    if target in skip:
                        continue
                    cpu0 = cpu_seconds(pids[target])
                    url = bases[target] + ROUTES[mode]
                    r = driver.run(url, concurrency=conc, seconds=args.seconds, body=body_for(mode))
                    cpu1 = cpu_seconds(pids[target])
                    if cpu0 is not None and cpu1 is not None and r.requests:
                        r.cpu_us = (cpu1 - cpu0) / r.requests * 1e6
                    raw.setdefault((mode, conc, target), []).append(r)
                    print(
                        f"  round {rnd + 1}/{args.rounds} {mode:<10} c={conc:<2} {target:<9} "
                        f"{r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
                        f"cpu {r.cpu_us or 0:5.0f} us/req" + (f"  errors {r.errors}" if r.errors else ""),
                        flush=True,
                    )
    return [{"mode": m, "concurrency": c, "target": t, **median_result(rs)} for (m, c, t), rs in raw.items()]


def run_ttfb(args, driver: drivers.Driver, urls: dict[str, str], skip: set[str]) -> dict[str, float]:
    """Median time to the first streamed byte at concurrency 1 (the Python generator times it)."""
    n = 30 if args.quick else 400
    out = {}
    for target in TARGETS:
        if target not in skip:
            r = driver.loadgen(urls[target], concurrency=1, requests=n, body=chat_body(True))
            out[target] = r.ttfb_p50_ms
    return out


def run_models(args, driver: drivers.Driver, base: str) -> dict:
    url = base + "/v1/models"
    status, body, first = http_get(url, timeout=30)
    listed = len(json.loads(body)["data"]) if status == 200 else 0
    r = driver.run(url, concurrency=1, seconds=args.seconds, method="GET")
    return {
        "status": status,
        "listed": listed,
        "first_ms": first * 1e3,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "rps": r.rps,
        "errors": r.errors,
    }


def run_soak(args, driver: drivers.Driver, url: str, pid: int, work: Path) -> dict:
    seconds = args.soak_minutes * 60
    print(f"soak: {args.soak_minutes:g} min of mixed load on the proxy, sampling its RSS", flush=True)
    loads = [
        driver.start_background(
            url, concurrency=8, seconds=seconds, body=chat_body(False), log=work / "soak-plain.log"
        ),
        driver.start_background(
            url, concurrency=8, seconds=seconds, body=chat_body(True), log=work / "soak-stream.log"
        ),
    ]
    samples: list[tuple[float, float]] = []
    began = time.monotonic()
    step = max(1.0, min(10.0, seconds / 60))
    while any(p.poll() is None for p in loads):
        mb = rss_mb(pid)
        if mb is not None:
            samples.append((round(time.monotonic() - began, 1), round(mb, 1)))
        time.sleep(step)
    results = [drivers.read_background(work / name) for name in ("soak-plain.log", "soak-stream.log")]
    settled = [mb for t, mb in samples if t >= seconds / 10] or [mb for _, mb in samples]
    return {
        "minutes": args.soak_minutes,
        "requests": sum(r.requests for r in results),
        "errors": sum(r.errors for r in results),
        "rss_start_mb": samples[0][1] if samples else None,
        "rss_settled_mb": settled[0] if settled else None,
        "rss_end_mb": samples[-1][1] if samples else None,
        "rss_max_mb": max(mb for _, mb in samples) if samples else None,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_wrk = args.loadgen != "python"
    if use_wrk and not drivers.wrk_path():
        if args.loadgen == "wrk":
            print("wrk is not installed: apt-get install wrk", file=sys.stderr)
            return 2
        print(drivers.INSTALL_HINT, file=sys.stderr)
        use_wrk = False
    cpus = cpu_plan(not args.no_pin)
    driver = drivers.Driver(use_wrk, cpus["load"])
    (HERE / "out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=HERE / "out"))
    ports = {name: free_port() for name in TARGETS}
    stub_base = f"http://127.0.0.1:{ports['upstream']}/v1"
    registry = registry_gen.write(work, args.entries, stub_base, MODEL)
    py = sys.executable
    bases = {t: f"http://127.0.0.1:{ports[t]}/v1" for t in TARGETS}
    urls = {t: bases[t] + ROUTES["stream"] for t in TARGETS}  # chat: TTFB and the soak
    results: dict = {"meta": machine.describe(driver.name, args, cpus), "skipped": {}}
    print(
        f"benchmark: {driver.name}; {args.rounds} round(s) of {args.seconds:g} s per figure; work dir {work}",
        flush=True,
    )
    with Services() as services:
        stub = services.start(
            Service(
                "upstream",
                [py, str(HERE / "upstream_stub.py"), str(ports["upstream"]), "16"],
                log_dir=work,
                cpus=cpus["stub"],
            ),
            stub_base + "/health",
        )
        ref = services.start(
            Service(
                "reference",
                [py, str(HERE / "ref_passthrough.py"), str(ports["reference"]), stub_base],
                log_dir=work,
                cpus=cpus["server"],
            ),
            f"http://127.0.0.1:{ports['reference']}/",
        )
        proxy_base = f"http://127.0.0.1:{ports['proxy']}"
        proxy = services.start(
            Service(
                "proxy",
                [py, "-m", "imageworks_proxy"],
                log_dir=work,
                cwd=work,
                env=proxy_env(ports["proxy"], registry, work, stub_base),
                cpus=cpus["server"],
            ),
            proxy_base + "/v1/health",
            timeout=60,
        )
        time.sleep(1.0)
        results["rss"] = {"proxy_idle_mb": rss_mb(proxy.pid), "reference_idle_mb": rss_mb(ref.pid)}
        skip: set[str] = set()
        why = probe(bases["proxy"])
        if why:
            print(f"proxy chat not measured: {why}", file=sys.stderr)
            results["skipped"]["proxy"] = why
            skip.add("proxy")
        results["models"] = run_models(args, driver, proxy_base)
        print(
            f"/v1/models: {results['models']['listed']} listed, p50 {results['models']['p50_ms']:.2f} ms",
            flush=True,
        )
        pids = {"upstream": stub.pid, "reference": ref.pid, "proxy": proxy.pid}
        results["chat"] = run_chat(args, driver, bases, pids, skip)
        results["ttfb"] = run_ttfb(args, driver, urls, skip)
        time.sleep(1.0)
        results["rss"]["proxy_after_load_mb"] = rss_mb(proxy.pid)
        results["metrics_status"] = http_get(proxy_base + "/v1/metrics")[0]
        log = work / "chat_proxy.jsonl"
        results["request_log_lines"] = sum(1 for _ in log.open("rb")) if log.exists() else 0
        if args.soak and "proxy" not in skip:
            results["soak"] = run_soak(args, driver, urls["proxy"], proxy.pid, work)
    text = report.markdown(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=lambda o: asdict(o)))
    print()
    print(text)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
