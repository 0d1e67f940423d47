#!/usr/bin/env python3
"""Switch latency of orchestrated vLLM: cold starts against wake-ups, and the proxy's own share of each.

Runs ``imageworks-chat-proxy`` as users run it, with two fake vLLM models (``imageworks_proxy.testing.fakes.
vllm``: real processes, ready ``--start-delay`` seconds after their imports, waking in ``--wake-delay``
seconds and falling asleep in ``--sleep-delay``), and asks for them in turn: alpha, beta, alpha, beta, ...
Every fake records when it was created, became ready, received SIGTERM, exited, fell asleep and woke up
(``time.monotonic()``, the clock this script uses), so each switch splits into

- the engine's own time: its start-up (process creation to ready) or its wake-up, plus the exit or sleep of
  the model it replaced;
- the proxy's share: the rest of the time from sending the request to receiving the answer (scheduling,
  spawning, noticing readiness, forwarding), split into the part before the engine starts or wakes and the
  part after it is ready.

    python bench/switch.py                  # sleep mode off and level 1, 5 rounds; writes bench/SWITCH.md
    python bench/switch.py --quick          # 2 rounds, bench/out/SWITCH.quick.md

Targets: the proxy's share of a cold start under 0.15 s, of a wake-up under 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from procs import Service, Services, free_port, http_get, http_post  # noqa: E402

FAKE = REPO / "imageworks_proxy" / "testing" / "fakes" / "vllm.py"
GOALS = {"cold": 0.15, "wake": 0.5}
MODELS = ("alpha", "beta")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Switch latency: cold starts, wake-ups and the proxy's share.")
    p.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    p.add_argument("--rounds", type=int, help="alpha/beta round trips per sleep level (default 5; --quick 2)")
    p.add_argument("--levels", default="0,1", help="CHAT_PROXY_VLLM_SLEEP_LEVEL values to run (default 0,1)")
    p.add_argument("--start-delay", type=float, default=1.0, help="the fake engine's start-up (default 1 s)")
    p.add_argument("--wake-delay", type=float, default=0.2, help="the fake engine's wake-up (default 0.2 s)")
    p.add_argument("--sleep-delay", type=float, default=0.1, help="the fake engine's sleep (default 0.1 s)")
    p.add_argument("--output", type=Path, help="Markdown report (default bench/SWITCH.md)")
    p.add_argument("--json", type=Path, help="also write the raw figures as JSON here")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if args.output is None:
        args.output = HERE / "out" / "SWITCH.quick.md" if args.quick else HERE / "SWITCH.md"
    return args


def registry(work: Path, args: argparse.Namespace) -> Path:
    extra = ["--fake-events", str(work / "events.jsonl"), "--fake-lock", str(work / "gpu.lock"),
             "--fake-start-delay", str(args.start_delay), "--fake-wake-delay", str(args.wake_delay),
             "--fake-sleep-delay", str(args.sleep_delay)]
    entries = [
        {"name": m, "backend": "vllm", "served_model_id": f"served-{m}",
         "backend_config": {"model_path": f"/models/{m}", "extra_args": extra}}
        for m in MODELS
    ]
    path = work / "registry.json"
    path.write_text(json.dumps(entries))
    return path


def proxy_env(port: int, work: Path, reg: Path, level: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update({
        "CHAT_PROXY_HOST": "127.0.0.1",
        "CHAT_PROXY_PORT": str(port),
        "CHAT_PROXY_REGISTRY": str(reg),
        "CHAT_PROXY_LOG_PATH": str(work / "chat_proxy.jsonl"),
        "CHAT_PROXY_ENABLE_METRICS": "1",
        "CHAT_PROXY_INCLUDE_NON_INSTALLED": "1",
        "CHAT_PROXY_REQUIRE_TEMPLATE": "0",
        "CHAT_PROXY_GPU_EXCLUSIVE": "0",
        "CHAT_PROXY_VLLM_COMMAND": f"{sys.executable} {FAKE}",
        "CHAT_PROXY_VLLM_PORT": str(free_port()),
        "CHAT_PROXY_VLLM_STATE_PATH": str(work / "active_vllm.json"),
        "CHAT_PROXY_VLLM_LOG_DIR": str(work / "vllm"),
        "CHAT_PROXY_VLLM_STOP_TIMEOUT_S": "5",
        "CHAT_PROXY_VLLM_SLEEP_LEVEL": str(level),
    })
    return env


def events(work: Path) -> list[dict]:
    path = work / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ask(base: str, model: str) -> tuple[float, float, int]:
    """One chat request: (sent, answered) on the monotonic clock and the pid that answered."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sent = time.monotonic()
    status, reply = http_post(base + "/v1/chat/completions", body, timeout=120)
    answered = time.monotonic()
    if status != 200:
        raise RuntimeError(f"{model}: {status} {reply[:300]!r}")
    text = json.loads(reply)["choices"][0]["message"]["content"]
    return sent, answered, int(text.rsplit("pid ", 1)[1])


def split(sent: float, answered: float, pid: int, evs: list[dict]) -> dict | None:
    """The switch behind one request, from the fakes' events: kind, engine and proxy times (None: none)."""
    window = [e for e in evs if sent - 0.005 <= e["t"] <= answered + 0.005]
    mine = {e["event"]: e for e in window if e["pid"] == pid}
    evicted = 0.0
    for e in window:
        if e["event"] == "sleep" and e["pid"] != pid:
            evicted += e["t"] - e["began"]
        if e["event"] == "stop" and e["pid"] != pid:
            gone = next((x for x in window if x["event"] == "exit" and x["pid"] == e["pid"]), None)
            evicted += (gone["t"] if gone else answered) - e["t"]
    if "start" in mine and "ready" in mine and mine["start"].get("exec_t"):
        kind, began, ready = "cold", mine["start"]["exec_t"], mine["ready"]["t"]
    elif "wake" in mine:
        kind, began, ready = "wake", mine["wake"]["began"], mine["wake"]["t"]
    else:
        return None
    total = answered - sent
    engine = ready - began
    return {
        "kind": kind,
        "total_s": total,
        "engine_s": engine,
        "evict_s": evicted,
        "proxy_s": total - engine - evicted,
        "proxy_before_s": began - sent - evicted,
        "proxy_after_s": answered - ready,
        "first": not any(e["event"] in ("stop", "sleep") for e in window),
    }


def run_level(args: argparse.Namespace, level: int) -> dict:
    (HERE / "out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"switch-{level}-", dir=HERE / "out"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rows: list[dict] = []
    with Services() as services:
        services.start(
            Service("proxy", [sys.executable, "-m", "imageworks_proxy"], log_dir=work, cwd=work,
                    env=proxy_env(port, work, registry(work, args), level)),
            base + "/v1/health",
            timeout=60,
        )
        asks = [ask(base, MODELS[i % 2]) for i in range(2 * args.rounds + 1)]
        time.sleep(0.3)  # the last events are flushed
        evs = events(work)
        for sent, answered, pid in asks:
            row = split(sent, answered, pid, evs)
            if row is not None:
                rows.append(row)
        status, body, _ = http_get(base + "/v1/metrics")
        reported = json.loads(body)["swaps"].get("by_kind", {}) if status == 200 else {}
    return {"level": level, "rows": rows, "reported": reported}


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarise(results: list[dict]) -> list[dict]:
    out = []
    for res in results:
        groups = {
            "cold start (nothing running)": [r for r in res["rows"] if r["kind"] == "cold" and r["first"]],
            "cold switch (the other model " + ("stopped)" if res["level"] == 0 else "put to sleep)"): [
                r for r in res["rows"] if r["kind"] == "cold" and not r["first"]
            ],
            "wake-up (the other model put to sleep)": [r for r in res["rows"] if r["kind"] == "wake"],
        }
        for what, rows in groups.items():
            if not rows:
                continue
            kind = rows[0]["kind"]
            share = _median(rows, "proxy_s")
            reported = (res["reported"].get(kind) or {}).get("proxy_s") or {}
            out.append({
                "level": res["level"], "what": what, "kind": kind, "n": len(rows),
                **{k: _median(rows, k) for k in ("total_s", "engine_s", "evict_s", "proxy_s",
                                                  "proxy_before_s", "proxy_after_s")},
                "proxy_max_s": max(r["proxy_s"] for r in rows),
                "reported_p50_s": reported.get("p50"),
                "goal_s": GOALS[kind],
                "met": share < GOALS[kind],
            })
    return out


def markdown(summary: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Switch latency (fake vLLM)",
        "",
        f"`python bench/switch.py{' --quick' if args.quick else ''}`: {args.rounds} alpha/beta round trips "
        f"per sleep level; the fake engines are ready {args.start_delay:g} s after their imports, wake in "
        f"{args.wake_delay:g} s and fall asleep in {args.sleep_delay:g} s. Medians in seconds; the proxy's "
        "share is the time to the answer minus the engine's own start-up or wake-up and the exit or sleep "
        "of the model it replaced (docs/benchmarks.md).",
        "",
        "| sleep level | switch | n | total | engine start / wake | replaced model exit / sleep "
        "| proxy share | before the engine | after it is ready | max share | proxy's own metric (p50) "
        "| goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        reported = "—" if r["reported_p50_s"] is None else f"{r['reported_p50_s']:.3f}"
        lines.append(
            f"| {r['level']} | {r['what']} | {r['n']} | {r['total_s']:.3f} | {r['engine_s']:.3f} | "
            f"{r['evict_s']:.3f} | **{r['proxy_s']:.3f}** | {r['proxy_before_s']:.3f} | "
            f"{r['proxy_after_s']:.3f} | {r['proxy_max_s']:.3f} | {reported} | < {r['goal_s']:g} | "
            f"{'yes' if r['met'] else '**no**'} |"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Machine: {os.cpu_count()} CPUs (load average {load} at the end), Python "
              f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    results = [run_level(args, level) for level in levels]
    summary = summarise(results)
    text = markdown(summary, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "summary": summary}, indent=2))
    print(text)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
