#!/usr/bin/env python3
"""Instructions per request, counted by valgrind's callgrind: a figure that machine load does not move.

The wall-clock benchmark (``run.py``) shares the machine with everything else on it; this one counts the
CPU instructions the server under test executes in user space for each request, so a change worth 3 %
shows as 3 % on a busy machine too. It starts the upstream stub, then each target under callgrind with
instrumentation off, warms it up, turns instrumentation on for ``-n`` requests sent one after another
over one keep-alive connection, and divides.

    python bench/instructions.py                      # the reference and this checkout
    python bench/instructions.py --target old=/path/to/other/checkout -n 300

Each ``--target NAME=DIR`` runs the proxy from another checkout's source tree (``PYTHONPATH=DIR``), so
two versions are compared in one run. Needs ``valgrind`` (``apt-get install valgrind``); the counts are
for user-space instructions only (system calls are not counted), at concurrency 1.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import registry_gen  # noqa: E402
from procs import Service, Services, free_port  # noqa: E402
from run import MODEL, chat_body, proxy_env  # noqa: E402

MODES = {"plain": False, "stream": True}


def send(port: int, n: int, stream: bool) -> None:
    """``n`` chat requests, one after another on one connection; each must answer 200."""
    body = chat_body(stream)
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(n):
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"answered {resp.status}: {data[:200]!r}")
    finally:
        conn.close()


def dump_total(pid: int, out_dir: Path) -> int:
    """Ask callgrind to write what it counted since the last reset; the instruction total of that dump."""
    before = set(out_dir.glob("callgrind.out*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        new = set(out_dir.glob("callgrind.out*")) - before
        for path in new:
            for line in reversed(path.read_text(errors="replace").splitlines()):
                if line.startswith("totals:"):  # the last line: the dump is complete
                    return int(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError(f"callgrind wrote no dump in {out_dir}")


def measure(port: int, pid: int, out_dir: Path, n: int, warm: int) -> dict[str, float]:
    """Instructions per request for each of :data:`MODES`."""
    figures = {}
    for mode, stream in MODES.items():
        send(port, warm, stream)
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
        send(port, n, stream)
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
        figures[mode] = dump_total(pid, out_dir) / n
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Instructions per chat request, counted by callgrind.")
    p.add_argument("--target", action="append", default=[], metavar="NAME=DIR",
                   help="also measure the proxy from another checkout's source tree")
    p.add_argument("-n", type=int, default=200, help="requests counted per mode (default 200)")
    p.add_argument("--warm", type=int, default=30, help="requests sent first, not counted (default 30)")
    args = p.parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    (HERE / "out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="instructions-", dir=HERE / "out"))
    py = sys.executable
    stub_port = free_port()
    stub_base = f"http://127.0.0.1:{stub_port}/v1"
    registry = registry_gen.write(work, 500, stub_base, MODEL)
    targets = [("reference", None), ("proxy", HERE.parent)]
    targets += [(name, Path(src)) for name, _, src in (t.partition("=") for t in args.target)]
    with Services() as services:
        services.start(Service("upstream", [py, str(HERE / "upstream_stub.py"), str(stub_port), "16"],
                               log_dir=work), stub_base + "/health")
        for name, src in targets:
            out_dir = work / name
            out_dir.mkdir()
            valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                        f"--callgrind-out-file={out_dir / 'callgrind.out'}"]
            port = free_port()
            if src is None:
                argv = [*valgrind, py, str(HERE / "ref_passthrough.py"), str(port), stub_base]
                ready = f"http://127.0.0.1:{port}/"
                svc = services.start(Service(name, argv, log_dir=work), ready, timeout=120)
            else:
                env = proxy_env(port, registry, out_dir, stub_base)
                env["PYTHONPATH"] = str(src)
                argv = [*valgrind, py, "-m", "imageworks_proxy"]
                svc = services.start(Service(name, argv, log_dir=work, cwd=out_dir, env=env),
                                     f"http://127.0.0.1:{port}/v1/health", timeout=300)
            figures = measure(port, svc.pid, out_dir, args.n, args.warm)
            print(f"{name:12} " + "   ".join(f"{m} {v / 1000:7.0f}k instructions/request"
                                              for m, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
