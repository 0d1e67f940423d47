#!/usr/bin/env python3
"""Profile the proxy under load with py-spy (``pip install py-spy``; Linux, needs ptrace rights).

Starts the stub and the proxy exactly as ``run.py`` does, drives one scenario with wrk (or the Python
generator) and records the proxy with ``py-spy record``. Writes collapsed stacks (``--format raw``, for
flame-graph tools) and prints the functions with the most samples, inclusive and self.

    python bench/profile.py --mode stream --concurrency 32 --seconds 15
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import drivers  # noqa: E402
import registry_gen  # noqa: E402
from procs import Service, Services, cpu_plan, free_port  # noqa: E402
from run import MODEL, ROUTES, body_for, proxy_env  # noqa: E402


def summarise(collapsed: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"{n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"{n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description="Profile the proxy under one load scenario with py-spy.")
    p.add_argument("--mode", choices=("non-stream", "stream", "embeddings", "models"), default="non-stream")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--output", type=Path, default=HERE / "out" / "profile.txt")
    args = p.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    cpus = cpu_plan(True)
    driver = drivers.Driver(drivers.wrk_path() is not None, cpus["load"])
    (HERE / "out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=HERE / "out"))
    stub_port, proxy_port = free_port(), free_port()
    stub_base = f"http://127.0.0.1:{stub_port}/v1"
    registry = registry_gen.write(work, 500, stub_base, MODEL)
    base = f"http://127.0.0.1:{proxy_port}"
    with Services() as services:
        services.start(
            Service(
                "upstream",
                [sys.executable, str(HERE / "upstream_stub.py"), str(stub_port), "16"],
                log_dir=work,
                cpus=cpus["stub"],
            ),
            stub_base + "/health",
        )
        proxy = services.start(
            Service(
                "proxy",
                [sys.executable, "-m", "imageworks_proxy"],
                log_dir=work,
                cwd=work,
                env=proxy_env(proxy_port, registry, work, stub_base),
                cpus=cpus["server"],
            ),
            base + "/v1/health",
            timeout=60,
        )
        url = base + ("/v1/models" if args.mode == "models" else "/v1" + ROUTES[args.mode])
        method, body = ("GET", b"") if args.mode == "models" else ("POST", body_for(args.mode))
        driver.loadgen(url, concurrency=8, requests=300, method=method, body=body)
        collapsed = work / "profile.collapsed"
        spy = subprocess.Popen(
            [
                pyspy,
                "record",
                "-p",
                str(proxy.pid),
                "-r",
                str(args.rate),
                "-d",
                str(args.seconds + 1),
                "--format",
                "raw",
                "-o",
                str(collapsed),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        result = driver.run(url, concurrency=args.concurrency, seconds=args.seconds, method=method, body=body)
        spy.wait(timeout=60)
    text = (
        f"{args.mode} c={args.concurrency}: {result.rps:.0f} req/s, p50 {result.p50_ms:.2f} ms "
        f"(under py-spy)\n\n" + summarise(collapsed, args.top)
    )
    args.output.write_text(text)
    print(text)
    print(f"\ncollapsed stacks: {collapsed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
