"""Observability of orchestrated vLLM: swaps, queue time and the active model in the log and the metrics.

Runs once the vLLM orchestrator is present (it reads the orchestrator's ``stats()``)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imageworks_proxy.testing import free_port, user
from tests import orch_helpers
from tests.proxy_helpers import log_records

pytest.importorskip("imageworks_proxy.gpu.scheduler", reason="the vLLM orchestrator is not merged yet")


async def test_switches_show_up_as_swaps_queue_time_and_the_active_model(tmp_path, make_config, registry_file,
                                                                         proxy_client):
    registry_file([orch_helpers.vllm_entry("alpha", tmp_path), orch_helpers.vllm_entry("beta", tmp_path)])
    client = await proxy_client(make_config(**orch_helpers.orch_settings(free_port(), enable_metrics="1")))
    for model in ("alpha", "beta", "alpha"):
        resp = await client.post("/v1/chat/completions", json={"model": model, "messages": user("hi")})
        assert resp.status == 200
    records = await log_records(client)
    assert [r["logical_name"] for r in records] == ["alpha", "beta", "alpha"]
    assert all(r["adapter"] == "vllm-orchestrated" and r["queue_ms"] > 0 for r in records)  # each waited
    m = await (await client.get("/v1/metrics")).json()
    assert m["swaps"]["count"] == 3 and m["swaps"]["failures"] == 0
    assert m["swaps"]["duration_s"]["samples"] == 3
    assert m["vllm"] == {"active_model": "alpha", "state": "loaded"}
    assert m["queue_depth"] == 0
    families = {
        f.name: f for f in text_string_to_metric_families(await (await client.get("/metrics")).text())
    }
    swap = {s.name: s.value for s in families["imageworks_proxy_model_swap_duration_seconds"].samples}
    assert swap["imageworks_proxy_model_swap_duration_seconds_count"] == 3
    assert [s.labels["model"] for s in families["imageworks_proxy_active_model"].samples] == ["alpha"]
    waits = [
        s.value
        for s in families["imageworks_proxy_queue_wait_seconds"].samples
        if s.name.endswith("_count") and s.labels["model"] == "alpha"
    ]
    assert waits == [2]
