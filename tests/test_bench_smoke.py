"""Smoke test of the benchmark harness: ``bench/run.py --quick`` starts everything and produces numbers.

No timed assertions: performance is judged from ``bench/RESULTS.md``, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"


def _run_quick(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out_md, out_json = tmp_path / "RESULTS.md", tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--quick",
            "--seconds",
            "0.5",
            "--entries",
            "60",
            "--output",
            str(out_md),
            "--json",
            str(out_json),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out_json.read_text()), out_md.read_text()


def _check(results: dict, report: str) -> None:
    assert not results["skipped"], results["skipped"]
    chat = {(r["mode"], r["concurrency"], r["target"]): r for r in results["chat"]}
    for mode in ("non-stream", "stream", "embeddings"):
        for conc in (1, 32):
            for target in ("upstream", "reference", "proxy"):
                row = chat[(mode, conc, target)]
                assert row["requests"] > 0 and row["rps"] > 0 and row["p50_ms"] > 0, (mode, conc, target, row)
                assert row["errors"] == 0, (mode, conc, target, row)
    assert not results["skipped"], results["skipped"]
    assert all(results["ttfb"][t] > 0 for t in ("upstream", "reference", "proxy"))
    models = results["models"]
    assert models["status"] == 200 and models["listed"] > 0 and models["p50_ms"] > 0
    assert results["rss"]["proxy_idle_mb"] > 0
    # the proxy ran as users run it: every chat request went into the request log, metrics are on
    assert results["request_log_lines"] >= sum(
        r["requests"] for r in results["chat"] if r["target"] == "proxy"
    )
    assert results["metrics_status"] == 200
    assert "## Targets" in report
    assert "| non-stream | 32 | proxy |" in report
    assert "| stream | 1 | proxy |" in report
    assert "| embeddings | 32 | proxy |" in report
    assert "embeddings, c=32: requests/s" in report


def test_quick_benchmark_produces_numbers_for_every_scenario(tmp_path):
    results, report = _run_quick(tmp_path)
    _check(results, report)


def test_the_switch_latency_benchmark_splits_cold_starts_and_wake_ups(tmp_path):
    out_md, out_json = tmp_path / "SWITCH.md", tmp_path / "switch.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "switch.py"), "--rounds", "1", "--levels", "1",
         "--start-delay", "0.2", "--wake-delay", "0.05", "--sleep-delay", "0.02",
         "--output", str(out_md), "--json", str(out_json)],
        capture_output=True, text=True, timeout=240, check=False, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out_json.read_text())["summary"]
    rows = {r["what"]: r for r in summary}
    assert set(rows) == {
        "cold start (nothing running)",
        "cold switch (the other model put to sleep)",
        "wake-up (the other model put to sleep)",
    }
    wake = rows["wake-up (the other model put to sleep)"]
    assert wake["kind"] == "wake" and wake["n"] == 1 and wake["reported_p50_s"] is not None
    assert "| 1 | wake-up (the other model put to sleep) | 1 |" in out_md.read_text()
