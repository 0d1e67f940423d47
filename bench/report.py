"""The Markdown report of a benchmark run (``bench/RESULTS.md``)."""

from __future__ import annotations

#: The scenarios, in report order: chat without and with streaming, then embeddings.
MODES = ("non-stream", "stream", "embeddings")
#: The project's performance goal against the reference passthrough (docs/benchmarks.md).
GOAL_RPS_RATIO = 0.80
GOAL_ADDED_RATIO = 1.2
GOAL_MODELS_MS = 20.0
GOAL_IDLE_RSS_MB = 80.0
#: Soak growth (after the first tenth of it) that still counts as flat memory.
FLAT_MB = 10.0


def _f(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("**yes**" if ok else "**no**")


def _index(chat: list[dict]) -> dict[tuple[str, int, str], dict]:
    return {(r["mode"], r["concurrency"], r["target"]): r for r in chat}


def _added(idx: dict, mode: str, conc: int, target: str) -> float | None:
    row, up = idx.get((mode, conc, target)), idx.get((mode, conc, "upstream"))
    return row["p50_ms"] - up["p50_ms"] if row and up else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(results: dict) -> list[tuple[str, str, str, str, str, bool | None]]:
    """Rows (what, proxy, reference, ratio, goal, met) for the performance targets; met None: not measured."""
    idx = _index(results.get("chat", []))
    rows = []
    for mode in MODES:
        p, r = idx.get((mode, 32, "proxy")), idx.get((mode, 32, "reference"))
        ratio = _ratio(p and p["rps"], r and r["rps"])
        rows.append(
            (
                f"{mode}, c=32: requests/s",
                _f(p and p["rps"], 0),
                _f(r and r["rps"], 0),
                _f(ratio and ratio * 100, 0, " %"),
                f"≥ {GOAL_RPS_RATIO * 100:.0f} %",
                None if ratio is None else ratio >= GOAL_RPS_RATIO,
            )
        )
        pa, ra = _added(idx, mode, 1, "proxy"), _added(idx, mode, 1, "reference")
        ratio = _ratio(pa, ra)
        rows.append(
            (
                f"{mode}, c=1: added p50 latency",
                _f(pa, 3, " ms"),
                _f(ra, 3, " ms"),
                _f(ratio, 2, "×"),
                f"≤ {GOAL_ADDED_RATIO:g}×",
                None if ratio is None else ratio <= GOAL_ADDED_RATIO,
            )
        )
    m = results.get("models") or {}
    p50 = m.get("p50_ms") if m.get("status") == 200 else None
    rows.append(
        (
            f"/v1/models p50, {results['meta']['entries']} entries",
            _f(p50, 2, " ms"),
            "",
            "",
            "< 20 ms",
            None if p50 is None else p50 < GOAL_MODELS_MS,
        )
    )
    rss = results.get("rss", {})
    idle = rss.get("proxy_idle_mb")
    rows.append(
        (
            "idle RSS",
            _f(idle, 1, " MB"),
            _f(rss.get("reference_idle_mb"), 1, " MB"),
            "",
            "< 80 MB",
            None if idle is None else idle < GOAL_IDLE_RSS_MB,
        )
    )
    soak = results.get("soak")
    if soak and soak.get("rss_settled_mb") is not None:
        growth = soak["rss_end_mb"] - soak["rss_settled_mb"]
        rows.append(
            (
                f"RSS growth over a {soak['minutes']:g}-minute soak",
                _f(growth, 1, " MB"),
                "",
                "",
                f"flat (< {FLAT_MB:g} MB)",
                growth < FLAT_MB,
            )
        )
    return rows


def markdown(results: dict) -> str:
    meta = results["meta"]
    v = meta["versions"]
    pin = meta["pinning"]
    lines = [
        "# Benchmark results",
        "",
        f"Run {meta['date']} on {meta['cpu']} ({meta['cpus']} CPUs, {meta['memory_gib']} GiB), {meta['os']}, "
        f"Python {meta['python']}, aiohttp {v['aiohttp']}, orjson {v['orjson']}, uvloop {v['uvloop']}; "
        f"proxy {v['imageworks-proxy']} at commit {meta['commit']}.",
        "",
        f"Load: {meta['loadgen']}, {meta['seconds']:g} s per figure, median of {meta['rounds']} round(s)"
        + (" (**--quick**: rough numbers)" if meta["quick"] else "")
        + ". "
        + (
            f"Server under test pinned to CPU {pin['server']}, stub on {pin['stub']}, "
            f"load generator on {pin['load']}. "
            if pin["server"]
            else "No CPU pinning. "
        )
        + "The proxy runs as users run it: request log and metrics on, a generated "
        f"{meta['entries']}-entry registry. Upstream = the stub called directly; reference = "
        "`bench/ref_passthrough.py`; added latency = p50 minus the upstream's p50 in the same scenario; "
        "server CPU = user + system CPU time of the server under test per request (less sensitive to other "
        "load on the machine than the wall-clock figures).",
        "",
    ]
    for target, why in results.get("skipped", {}).items():
        lines += [f"> **{target} not measured**: {why}", ""]
    lines += [
        "## Targets",
        "",
        "| target | proxy | reference | ratio | goal | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    lines += [f"| {w} | {p} | {r} | {q} | {g} | {_met(ok)} |" for w, p, r, q, g, ok in targets(results)]
    lines += [
        "",
        "## Chat completions and embeddings",
        "",
        "| mode | conc. | target | req/s | p50 ms | p99 ms | added p50 ms | req/s vs ref | added p50 vs ref "
        "| server CPU µs/req | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    idx = _index(results.get("chat", []))
    for mode in MODES:
        for conc in (1, 32):
            ref = idx.get((mode, conc, "reference"))
            for target in ("upstream", "reference", "proxy"):
                row = idx.get((mode, conc, target))
                if not row:
                    continue
                added = _added(idx, mode, conc, target) if target != "upstream" else None
                vs_rps = _ratio(row["rps"], ref and ref["rps"]) if target == "proxy" else None
                vs_added = _ratio(added, _added(idx, mode, conc, "reference")) if target == "proxy" else None
                lines.append(
                    f"| {mode} | {conc} | {target} | {row['rps']:.0f} | {row['p50_ms']:.3f} | "
                    f"{row['p99_ms']:.3f} | "
                    f"{_f(added, 3)} | {_f(vs_rps and vs_rps * 100, 0, ' %')} | {_f(vs_added, 2, '×')} | "
                    f"{_f(row.get('cpu_us'), 0)} | {row['errors']} |"
                )
    ttfb = results.get("ttfb") or {}
    if ttfb:
        up = ttfb.get("upstream")
        lines += [
            "",
            "## Streams: time to first byte (16 chunks, c=1, median)",
            "",
            "| target | TTFB ms | added ms |",
            "|---|---:|---:|",
        ]
        for target in ("upstream", "reference", "proxy"):
            if ttfb.get(target) is not None:
                added = ttfb[target] - up if up is not None and target != "upstream" else None
                lines.append(f"| {target} | {ttfb[target]:.3f} | {_f(added, 3)} |")
    m = results.get("models") or {}
    if m:
        lines += [
            "",
            f"## /v1/models ({meta['entries']}-entry registry)",
            "",
            "| status | models listed | first call ms | p50 ms | p99 ms | req/s |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {m['status']} | {m['listed']} | {m['first_ms']:.2f} | {m['p50_ms']:.2f} | "
            f"{m['p99_ms']:.2f} | {m['rps']:.0f} |",
        ]
    rss = results.get("rss", {})
    lines += [
        "",
        "## Memory (RSS)",
        "",
        "| proxy idle after start | proxy idle after the load | reference idle |",
        "|---:|---:|---:|",
        f"| {_f(rss.get('proxy_idle_mb'), 1, ' MB')} | {_f(rss.get('proxy_after_load_mb'), 1, ' MB')} | "
        f"{_f(rss.get('reference_idle_mb'), 1, ' MB')} |",
    ]
    soak = results.get("soak")
    if soak:
        lines += [
            "",
            f"Soak: {soak['minutes']:g} minutes of mixed load (8 non-streaming + 8 streaming connections), "
            f"{soak['requests']} requests, {soak['errors']} errors. "
            f"RSS at start {_f(soak['rss_start_mb'], 1)} MB, "
            f"after the first tenth {_f(soak['rss_settled_mb'], 1)} MB, "
            f"at the end {_f(soak['rss_end_mb'], 1)} MB, "
            f"highest {_f(soak['rss_max_mb'], 1)} MB.",
        ]
    lines += [
        "",
        f"Checks: the request log got {results.get('request_log_lines', 0)} lines; "
        f"`/v1/metrics` answered {results.get('metrics_status')}.",
        "",
    ]
    return "\n".join(lines)
