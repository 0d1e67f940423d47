#!/usr/bin/env python3
"""A small closed-loop HTTP/1.1 load generator, run as its own process by ``bench/run.py``.

It is the fallback when ``wrk`` is not installed, and it measures what wrk cannot: the time to the
first body byte of a streamed answer (TTFB). CONCURRENCY keep-alive connections each send a request,
read the whole answer (Content-Length or chunked) and send the next, until DURATION seconds passed or
REQUESTS answers arrived. One JSON line goes to stdout, with the same keys as ``wrk_bench.lua`` plus
``ttfb_p50_us``/``ttfb_p99_us``.

Usage: ``loadgen.py URL --concurrency N (--duration S | --requests N) [--method M] [--body JSON]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


class Stats:
    def __init__(self) -> None:
        self.latency: list[float] = []
        self.ttfb: list[float] = []
        self.bytes = 0
        self.err_status = 0
        self.err_read = 0
        self.err_connect = 0


async def _read_answer(reader: asyncio.StreamReader, started: float) -> tuple[int, float, int, bool]:
    """Read one response: (status, ttfb seconds, body bytes, keep the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = headers.get("connection") != "close"
    ttfb = 0.0
    size = 0
    if headers.get("transfer-encoding") == "chunked":
        while True:
            n = int((await reader.readline()).split(b";", 1)[0], 16)
            if n == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected; the blank line ends the answer
                break
            data = await reader.readexactly(n + 2)
            if not ttfb:
                ttfb = time.perf_counter() - started
            size += len(data) - 2
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            await reader.readexactly(n)
        ttfb = time.perf_counter() - started
        size = n
    else:
        data = await reader.read()
        ttfb = time.perf_counter() - started
        size = len(data)
        keep = False
    return status, ttfb, size, keep


async def _worker(
    host: str, port: int, request: bytes, stats: Stats, stop_at: float, budget: list[int]
) -> None:
    reader = writer = None
    while time.perf_counter() < stop_at and budget[0] != 0:
        budget[0] -= 1
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.perf_counter()
            writer.write(request)
            status, ttfb, size, keep = await _read_answer(reader, started)
        except OSError:
            stats.err_connect += 1
            writer = None
            await asyncio.sleep(0.01)
            continue
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            stats.err_read += 1
            writer = None
            continue
        stats.latency.append(time.perf_counter() - started)
        stats.ttfb.append(ttfb)
        stats.bytes += size
        if status >= 400:
            stats.err_status += 1
        if not keep:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def run(args: argparse.Namespace) -> dict:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path + (f"?{url.query}" if url.query else "")
    body = args.body.encode() if args.body else b""
    head = f"{args.method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n"
    if args.method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    request = head.encode() + b"\r\n" + body
    stats = Stats()
    began = time.perf_counter()
    stop_at = began + (args.duration if args.duration else 1e9)
    budget = [args.requests if args.requests else -1]
    await asyncio.gather(
        *(_worker(host, port, request, stats, stop_at, budget) for _ in range(args.concurrency))
    )
    elapsed = time.perf_counter() - began
    lat = sorted(stats.latency)
    ttfb = sorted(stats.ttfb)
    us = 1e6
    return {
        "requests": len(lat),
        "duration_us": int(elapsed * us),
        "bytes": stats.bytes,
        "p50_us": int(percentile(lat, 50) * us),
        "p99_us": int(percentile(lat, 99) * us),
        "mean_us": (sum(lat) / len(lat) * us) if lat else 0.0,
        "max_us": int((lat[-1] if lat else 0) * us),
        "ttfb_p50_us": int(percentile(ttfb, 50) * us),
        "ttfb_p99_us": int(percentile(ttfb, 99) * us),
        "err_connect": stats.err_connect,
        "err_read": stats.err_read,
        "err_write": 0,
        "err_status": stats.err_status,
        "err_timeout": 0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--requests", type=int, default=0)
    p.add_argument("--method", default="POST")
    p.add_argument("--body", default="")
    args = p.parse_args(argv)
    if not args.duration and not args.requests:
        p.error("give --duration or --requests")
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
