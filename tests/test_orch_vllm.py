"""Single-port vLLM orchestration end to end, with a fake vLLM running as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from pathlib import Path

import pytest

from imageworks_proxy import keys
from imageworks_proxy.adapters.vllm_orchestrated import orchestrator
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.testing import free_port
from imageworks_proxy.upstream import process
from tests.orch_helpers import Call, chat, events, orch_settings, overlaps, pid_of, started, until, vllm_entry


@pytest.fixture
def orch(tmp_path, make_config, registry_file, make_app, aiohttp_client):
    """Start a proxy app whose registry holds ``entries``; returns the test client."""

    async def start(entries, port=None, **overrides):
        registry_file(entries)
        cfg = make_config(**orch_settings(port or free_port(), **overrides))
        return await aiohttp_client(make_app(cfg))

    return start


async def models_status(client) -> dict[str, str]:
    data = await (await client.get("/v1/models")).json()
    return {m["extensions"]["logical_id"]: m["extensions"]["status"] for m in data["data"]}


async def test_a_cold_model_is_started_on_first_request_and_reported_loading_then_loaded(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path, "--fake-start-delay", "0.5")])
    assert await models_status(client) == {"alpha": "stopped"}
    health = await (await client.get("/v1/health")).json()
    assert health["vllm"]["active"] is None and health["vllm"]["state"] == "stopped"

    task = asyncio.create_task(chat(client.app, "alpha", stream=True))
    await until(
        lambda: orchestrator(client.app).model_status(keys.models(client.app).resolve("alpha")) == "loading"
    )
    assert await models_status(client) == {"alpha": "loading"}
    health = await (await client.get("/v1/health")).json()  # answers during the start
    assert health["vllm"]["active"] == "alpha" and health["vllm"]["state"] == "loading"

    text, call, waited = await task
    assert text.startswith("served by served-alpha pid ")
    assert waited == [True]  # the stream was told to commit and send keep-alives before the wait
    assert call.queue_ms > 0
    assert await models_status(client) == {"alpha": "loaded"}
    health = await (await client.get("/v1/health")).json()
    assert health["vllm"]["state"] == "loaded" and health["vllm"]["pid"] == pid_of(text)
    # warm: no wait, same process
    text2, _, waited2 = await chat(client.app, "alpha")
    assert pid_of(text2) == pid_of(text) and waited2 == []
    assert len(started(tmp_path)) == 1
    # the fake got the flags built from the entry and the settings
    argv = started(tmp_path)[0]["argv"]
    assert argv[argv.index("--served-model-name") + 1] == "served-alpha"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.75"
    state = json.loads(Path(keys.config(client.app).vllm_state_path).read_text())
    assert state["logical_name"] == "alpha" and state["pid"] == pid_of(text)
    assert os.path.exists(os.path.join(keys.config(client.app).vllm_log_dir, "alpha.log"))


async def test_switching_never_kills_a_running_answer_and_never_runs_two_vllms(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)])
    app = client.app
    long_a = asyncio.create_task(chat(app, "alpha", stream=True, fake_chunks=10, fake_chunk_delay=0.1))
    await until(lambda: orchestrator(app).public_state()["state"] == "loaded")
    await until(lambda: orchestrator(app).scheduler.stats()["inflight"] == 1)
    b = asyncio.create_task(chat(app, "beta"))
    await until(lambda: orchestrator(app).scheduler.queue_depth == 1)
    a2 = asyncio.create_task(chat(app, "alpha"))  # queues behind beta now
    text_a, _, _ = await long_a
    assert text_a == "served by served-alpha pid " + text_a.rsplit(" ", 1)[1]  # complete, not cut off
    text_b, call_b, waited_b = await b
    assert text_b.startswith("served by served-beta") and waited_b == [True]
    text_a2, _, _ = await a2
    assert text_a2.startswith("served by served-alpha") and pid_of(text_a2) != pid_of(text_a)
    assert [e["model"] for e in started(tmp_path)] == ["served-alpha", "served-beta", "served-alpha"]
    assert overlaps(tmp_path) == []
    stats = orchestrator(app).stats()
    assert stats["swaps"] == 3 and stats["swap_failures"] == 0 and stats["vllm_launches"] == 3


async def test_a_start_failure_reaches_every_waiter_with_vllms_reason_and_is_not_retried_at_once(
    orch, tmp_path
):
    bad = vllm_entry(
        "broken",
        tmp_path,
        "--fake-fail",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
    )
    client = await orch([bad])
    results = await asyncio.gather(
        *(chat(client.app, "broken", stream=s) for s in (True, False, True)), return_exceptions=True
    )
    for r in results:
        assert isinstance(r, ProxyError) and r.status == 503 and r.code == "model_start_failed"
        assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB" in r.message
        assert r.hint and r.hint.endswith("broken.log")
    assert len(started(tmp_path)) == 1  # one start for all waiters
    with pytest.raises(ProxyError) as again:
        await chat(client.app, "broken")
    assert "CUDA out of memory" in again.value.message and "Retry-After" in again.value.headers
    assert len(started(tmp_path)) == 1  # backoff: no relaunch in a tight loop
    health = await (await client.get("/v1/health")).json()
    assert health["vllm"]["state"] == "stopped" and "CUDA out of memory" in health["vllm"]["last_error"]
    assert not os.path.exists(keys.config(client.app).vllm_state_path)


async def test_a_crash_mid_stream_ends_that_stream_with_an_error_and_the_next_request_restarts(
    orch, tmp_path
):
    client = await orch([vllm_entry("alpha", tmp_path)])
    text, _, _ = await chat(client.app, "alpha")
    first_pid = pid_of(text)
    with pytest.raises(ProxyError):
        await chat(client.app, "alpha", stream=True, fake_crash_after=1, fake_chunks=4)
    assert [e["event"] for e in events(tmp_path)][-1] == "crash"
    text2, _, _ = await chat(client.app, "alpha")
    assert pid_of(text2) != first_pid
    assert len(started(tmp_path)) == 2 and overlaps(tmp_path) == []
    assert orchestrator(client.app).scheduler.stats()["inflight"] == 0


async def test_an_unexpected_exit_is_noticed_and_the_state_file_cleared(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path)])
    text, _, _ = await chat(client.app, "alpha")
    state_path = keys.config(client.app).vllm_state_path
    assert os.path.exists(state_path)
    os.kill(pid_of(text), signal.SIGKILL)
    await until(lambda: orchestrator(client.app).public_state()["state"] == "stopped")
    assert not os.path.exists(state_path)
    assert "exited unexpectedly" in orchestrator(client.app).public_state()["last_error"]
    text2, _, _ = await chat(client.app, "alpha")
    assert pid_of(text2) != pid_of(text)


async def test_the_proxy_stops_its_vllm_when_it_shuts_down(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path, "--fake-engine-child")])
    text, _, _ = await chat(client.app, "alpha")
    pid = pid_of(text)
    state_path = keys.config(client.app).vllm_state_path
    await client.close()
    assert not process.pid_alive(pid) and process.group_pids(pid) == []
    assert not os.path.exists(state_path)


async def test_a_restarted_proxy_adopts_the_running_vllm_instead_of_starting_another(orch, tmp_path):
    port = free_port()
    entries = [vllm_entry("alpha", tmp_path)]
    first = await orch(entries, port=port, VLLM_KEEP_ON_EXIT="1")
    text, _, _ = await chat(first.app, "alpha")
    await first.close()
    pid = pid_of(text)
    assert process.pid_alive(pid)  # left running on purpose, recorded in the state file

    second = await orch(entries, port=port)
    assert await models_status(second) == {"alpha": "loaded"}
    health = await (await second.get("/v1/health")).json()
    assert health["vllm"]["active"] == "alpha" and health["vllm"]["adopted"] is True
    text2, _, waited = await chat(second.app, "alpha")
    assert pid_of(text2) == pid and waited == []
    assert len(started(tmp_path)) == 1 and overlaps(tmp_path) == []
    await second.close()  # this one does not keep it
    assert not process.pid_alive(pid)


async def test_a_stale_state_file_naming_an_unrelated_process_leaves_it_alone(orch, tmp_path, make_config):
    import sys

    victim = process.spawn(
        [sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "victim.log")
    )
    try:
        state_path = tmp_path / "state" / "active_vllm.json"
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(
            json.dumps(
                {
                    "logical_name": "alpha",
                    "served_model_id": "served-alpha",
                    "host": "127.0.0.1",
                    "port": 1,
                    "pid": victim,
                    "pgid": victim,
                    "started_at": 0,
                    "command": ["vllm", "--model", "/models/alpha"],
                    "prefix_len": 1,
                }
            )
        )
        client = await orch([vllm_entry("alpha", tmp_path)])
        assert await models_status(client) == {"alpha": "stopped"}
        text, _, _ = await chat(client.app, "alpha")
        assert text.startswith("served by served-alpha")
        await client.close()
        assert process.pid_alive(victim)
    finally:
        await process.stop_group(victim, term_timeout=2)


async def _exclusive_app(tmp_path, make_config, registry_file, make_app, aiohttp_client, entries, unloads):
    registry_file(entries)
    cfg = make_config(**orch_settings(free_port(), GPU_EXCLUSIVE="1"))
    app = make_app(cfg)

    async def unload_all() -> None:
        unloads.append(len(started(tmp_path)))

    keys.models(app).adapters["ollama"].unload_all = unload_all  # what the Ollama adapter exposes
    return await aiohttp_client(app), unload_all


OLLAMA = {"name": "llama", "backend": "ollama", "backend_config": {"model_path": "ollama:/llama3"}}


async def test_gpu_exclusive_unloads_ollama_before_starting_vllm(
    tmp_path, make_config, registry_file, make_app, aiohttp_client
):
    unloads: list[int] = []
    client, unload_all = await _exclusive_app(
        tmp_path,
        make_config,
        registry_file,
        make_app,
        aiohttp_client,
        [vllm_entry("alpha", tmp_path), OLLAMA],
        unloads,
    )
    await chat(client.app, "alpha")
    assert unloads == [0]  # before the vLLM process was launched
    # an Ollama request while vLLM is active is a switch: drain, stop vLLM, then forward
    from imageworks_proxy.gpu.tenancy import Tenant, tenancy

    lease = await tenancy(client.app).acquire(Tenant("ollama", "Ollama", stop=unload_all), Call())
    assert orchestrator(client.app).public_state()["state"] == "stopped"
    lease.release()
    await chat(client.app, "alpha")
    assert unloads == [0, 1] and len(started(tmp_path)) == 2 and overlaps(tmp_path) == []


async def test_without_ollama_models_the_proxy_never_talks_to_ollama(
    tmp_path, make_config, registry_file, make_app, aiohttp_client
):
    unloads: list[int] = []
    client, _ = await _exclusive_app(
        tmp_path,
        make_config,
        registry_file,
        make_app,
        aiohttp_client,
        [vllm_entry("alpha", tmp_path)],
        unloads,
    )
    await chat(client.app, "alpha")
    assert unloads == [] and len(started(tmp_path)) == 1


@pytest.mark.parametrize("seed", [7, 2024])
async def test_random_interleaved_requests_all_succeed_with_one_vllm_and_few_switches(orch, tmp_path, seed):
    rng = random.Random(seed)
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)])
    arrivals: list[str] = []

    async def user(model: str, stream: bool, delay: float):
        await asyncio.sleep(delay)
        arrivals.append(model)
        return model, await chat(
            client.app, model, stream=stream, fake_chunks=3, fake_chunk_delay=rng.choice([0, 0.02])
        )

    plan = [(rng.choice(["alpha", "beta"]), rng.random() < 0.5, rng.uniform(0, 1.5)) for _ in range(12)]
    results = await asyncio.gather(*(user(*p) for p in plan))
    for model, (text, _, _) in results:
        assert text.startswith(f"served by served-{model} pid ")
    runs = sum(1 for i, m in enumerate(arrivals) if i == 0 or arrivals[i - 1] != m)
    assert len(started(tmp_path)) <= runs
    assert overlaps(tmp_path) == []
    assert orchestrator(client.app).scheduler.stats()["inflight"] == 0


async def test_editing_the_running_models_registry_entry_restarts_it_with_the_new_flags(
    orch, tmp_path, registry_file
):
    entry = vllm_entry("alpha", tmp_path)
    client = await orch([entry])
    text, _, _ = await chat(client.app, "alpha")
    entry["backend_config"]["extra_args"].append("--enforce-eager")
    registry_file([entry])  # the proxy polls the file
    await until(lambda: orchestrator(client.app).public_state()["state"] == "stopped")
    text2, _, _ = await chat(client.app, "alpha")
    assert pid_of(text2) != pid_of(text)
    assert (
        "--enforce-eager" in started(tmp_path)[-1]["argv"]
        and "--enforce-eager" not in started(tmp_path)[0]["argv"]
    )
