"""vLLM sleep mode end to end, with fake vLLM processes that serve the sleep API and hold a lock file (the
GPU) only while awake: a switch puts the awake model to sleep, a request for a sleeping one wakes it."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from imageworks_proxy import keys
from imageworks_proxy.adapters.vllm_orchestrated import orchestrator
from imageworks_proxy.testing import free_port
from imageworks_proxy.upstream import process
from tests.orch_helpers import Call, chat, events, orch_settings, overlaps, pid_of, started, vllm_entry


@pytest.fixture
def orch(tmp_path, make_config, registry_file, make_app, aiohttp_client):
    """A proxy app with sleep mode (level 1 unless overridden) whose registry holds ``entries``."""

    async def start(entries, port=None, **overrides):
        registry_file(entries)
        settings = {"VLLM_SLEEP_LEVEL": "1", **overrides}
        cfg = make_config(**orch_settings(port or free_port(), **settings))
        return await aiohttp_client(make_app(cfg))

    return start


def of(tmp: Path, name: str) -> list[dict]:
    return [e for e in events(tmp) if e["event"] == name]


def never_two_awake(tmp: Path) -> None:
    """What a test must never see: two engines holding the GPU, or a request reaching a sleeping one."""
    assert overlaps(tmp) == [] and of(tmp, "asleep_request") == []


async def models_status(client) -> dict[str, str]:
    data = await (await client.get("/v1/models")).json()
    return {m["extensions"]["logical_id"]: m["extensions"]["status"] for m in data["data"]}


async def test_switching_back_to_a_sleeping_model_wakes_the_same_process(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)])
    app = client.app
    a1, _, _ = await chat(app, "alpha")
    b1, _, _ = await chat(app, "beta")
    assert await models_status(client) == {"alpha": "asleep", "beta": "loaded"}
    health = (await (await client.get("/v1/health")).json())["vllm"]
    assert health["active"] == "beta" and health["state"] == "loaded" and health["sleep_level"] == 1
    sleeping = [(s["model"], s["pid"], s["sleep_level"]) for s in health["sleeping"]]
    assert sleeping == [("alpha", pid_of(a1), 1)]
    assert health["sleeping"][0]["port"] != health["port"]  # each instance on its own port

    a2, call, waited = await chat(app, "alpha", stream=True)
    assert pid_of(a2) == pid_of(a1) and waited == [True] and call.queue_ms > 0
    b2, _, _ = await chat(app, "beta")
    assert pid_of(b2) == pid_of(b1)
    # back and forth: each process was started exactly once, and woken instead of started again
    assert [e["model"] for e in started(tmp_path)] == ["served-alpha", "served-beta"]
    assert [(e["event"], e["model"]) for e in events(tmp_path) if e["event"] in ("sleep", "wake")] == [
        ("sleep", "served-alpha"), ("sleep", "served-beta"), ("wake", "served-alpha"),
        ("sleep", "served-alpha"), ("wake", "served-beta"),
    ]
    never_two_awake(tmp_path)
    stats = orchestrator(app).stats()
    assert stats["vllm_launches"] == 2 and stats["vllm_wakes"] == 2 and stats["vllm_sleeps"] == 3
    kinds = [(s["to"], s["kind"], s.get("slept", [])) for s in stats["recent_swaps"]]
    assert kinds == [
        ("vllm:alpha", "cold", []), ("vllm:beta", "cold", ["vllm:alpha"]),
        ("vllm:alpha", "wake", ["vllm:beta"]), ("vllm:beta", "wake", ["vllm:alpha"]),
    ]
    for swap in stats["recent_swaps"]:
        assert swap["ok"] and 0 <= swap["proxy_s"] <= swap["total_s"]


async def test_the_state_file_records_every_resident_instance_and_a_new_proxy_adopts_them(orch, tmp_path):
    port = free_port()
    entries = [vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)]
    first = await orch(entries, port=port, VLLM_KEEP_ON_EXIT="1")
    a1, _, _ = await chat(first.app, "alpha")
    b1, _, _ = await chat(first.app, "beta")
    state = json.loads(Path(keys.config(first.app).vllm_state_path).read_text())
    assert state["format"] == 2
    recorded = {i["logical_name"]: i for i in state["instances"]}
    assert recorded["alpha"]["pid"] == pid_of(a1) and recorded["alpha"]["sleep_level"] == 1
    assert recorded["alpha"]["asleep_since"] is not None
    assert recorded["beta"]["pid"] == pid_of(b1) and recorded["beta"]["sleep_level"] == 0
    await first.close()
    assert process.pid_alive(pid_of(a1)) and process.pid_alive(pid_of(b1))

    second = await orch(entries, port=port)
    assert await models_status(second) == {"alpha": "asleep", "beta": "loaded"}
    b2, _, waited = await chat(second.app, "beta")
    assert pid_of(b2) == pid_of(b1) and waited == []  # adopted awake: served at once
    a2, _, _ = await chat(second.app, "alpha")
    assert pid_of(a2) == pid_of(a1)  # adopted asleep: woken
    assert len(started(tmp_path)) == 2
    never_two_awake(tmp_path)
    await second.close()  # this one does not keep them: awake and asleep, all stopped
    assert not process.pid_alive(pid_of(a1)) and not process.pid_alive(pid_of(b1))
    assert not os.path.exists(keys.config(second.app).vllm_state_path)


async def test_no_more_than_max_asleep_sleep_and_the_least_recently_used_is_stopped(orch, tmp_path):
    names = ("alpha", "beta", "gamma")
    client = await orch([vllm_entry(n, tmp_path) for n in names], VLLM_MAX_ASLEEP="1")
    pids = {n: pid_of((await chat(client.app, n))[0]) for n in names}
    sup = orchestrator(client.app).supervisor
    assert [s.logical_name for s in sup.sleepers] == ["beta"]
    assert not process.pid_alive(pids["alpha"])  # beyond the cap: stopped, not kept asleep
    assert await models_status(client) == {"alpha": "stopped", "beta": "asleep", "gamma": "loaded"}
    b2, _, _ = await chat(client.app, "beta")
    assert pid_of(b2) == pids["beta"]
    a2, _, _ = await chat(client.app, "alpha")
    assert pid_of(a2) != pids["alpha"]  # a cold start
    assert [s.logical_name for s in sup.sleepers] == ["beta"]  # gamma was stopped for beta's room
    never_two_awake(tmp_path)


@pytest.mark.parametrize("mode", ["error", "ignore"])
async def test_a_failed_sleep_falls_back_to_a_stop_and_no_request_fails(orch, tmp_path, mode):
    client = await orch(
        [vllm_entry("alpha", tmp_path, "--fake-sleep-fail", mode), vllm_entry("beta", tmp_path)]
    )
    a1, _, _ = await chat(client.app, "alpha")
    results = await asyncio.gather(chat(client.app, "beta"), chat(client.app, "beta", stream=True))
    assert all(text.startswith("served by served-beta") for text, _, _ in results)
    assert not process.pid_alive(pid_of(a1))  # stopped instead of left awake
    a2, _, _ = await chat(client.app, "alpha")
    assert pid_of(a2) != pid_of(a1)
    assert orchestrator(client.app).stats()["swap_failures"] == 0
    never_two_awake(tmp_path)


async def test_a_failed_wake_up_falls_back_to_a_cold_start(orch, tmp_path, caplog):
    client = await orch([vllm_entry("alpha", tmp_path, "--fake-wake-fail"), vllm_entry("beta", tmp_path)])
    a1, _, _ = await chat(client.app, "alpha")
    await chat(client.app, "beta")
    a2, _, _ = await chat(client.app, "alpha")
    assert a2.startswith("served by served-alpha") and pid_of(a2) != pid_of(a1)
    assert "starting it cold" in caplog.text
    kinds = [s["kind"] for s in orchestrator(client.app).stats()["recent_swaps"]]
    assert kinds == ["cold", "cold", "cold"]
    never_two_awake(tmp_path)


async def test_level_2_reloads_the_weights_and_resets_the_prefix_cache_on_wake_up(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)], VLLM_SLEEP_LEVEL="2")
    a1, _, _ = await chat(client.app, "alpha")
    await chat(client.app, "beta")
    a2, _, _ = await chat(client.app, "alpha")
    assert a2 == a1  # the same process, answering with its weights (not garbage)
    assert [e["level"] for e in of(tmp_path, "sleep")] == [2, 2]
    assert [e["method"] for e in of(tmp_path, "collective_rpc")] == ["reload_weights"]
    assert len(of(tmp_path, "reset_prefix_cache")) == 1 and of(tmp_path, "no_weights") == []
    never_two_awake(tmp_path)


async def test_a_sleeping_model_that_dies_is_forgotten_and_started_again(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)])
    a1, _, _ = await chat(client.app, "alpha")
    await chat(client.app, "beta")
    os.kill(pid_of(a1), 9)
    sup = orchestrator(client.app).supervisor
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while sup.sleepers:
        assert loop.time() < deadline, "the dead sleeper was never noticed"
        await asyncio.sleep(0.05)
    assert await models_status(client) == {"alpha": "stopped", "beta": "loaded"}
    a2, _, _ = await chat(client.app, "alpha")
    assert pid_of(a2) != pid_of(a1)
    never_two_awake(tmp_path)


async def test_editing_a_sleeping_models_entry_stops_it(orch, tmp_path, registry_file):
    alpha, beta = vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)
    client = await orch([alpha, beta])
    a1, _, _ = await chat(client.app, "alpha")
    await chat(client.app, "beta")
    alpha["backend_config"]["extra_args"].append("--enforce-eager")
    registry_file([alpha, beta])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while process.pid_alive(pid_of(a1)):
        assert loop.time() < deadline, "the edited sleeper was never stopped"
        await asyncio.sleep(0.05)
    a2, _, _ = await chat(client.app, "alpha")
    assert pid_of(a2) != pid_of(a1) and "--enforce-eager" in started(tmp_path)[-1]["argv"]


async def test_sleep_mode_launches_with_the_flag_and_the_dev_mode_environment(orch, tmp_path):
    client = await orch([vllm_entry("alpha", tmp_path)])
    await chat(client.app, "alpha")
    argv = started(tmp_path)[0]["argv"]
    assert "--enable-sleep-mode" in argv
    # the fake serves the sleep API only with VLLM_SERVER_DEV_MODE=1, like vLLM: it did, or no sleep
    await orchestrator(client.app).sleep()
    assert of(tmp_path, "sleep") and await models_status(client) == {"alpha": "asleep"}


async def test_with_sleep_mode_off_a_switch_stops_the_model_on_the_one_port(orch, tmp_path):
    port = free_port()
    client = await orch([vllm_entry("alpha", tmp_path), vllm_entry("beta", tmp_path)], port=port,
                        VLLM_SLEEP_LEVEL="0")
    a1, _, _ = await chat(client.app, "alpha")
    await chat(client.app, "beta")
    assert not process.pid_alive(pid_of(a1)) and of(tmp_path, "sleep") == []
    assert "--enable-sleep-mode" not in started(tmp_path)[0]["argv"]
    assert orchestrator(client.app).public_state()["port"] == port
    assert orchestrator(client.app).public_state()["sleeping"] == []
    state = json.loads(Path(keys.config(client.app).vllm_state_path).read_text())
    assert state["format"] == 1 and state["logical_name"] == "beta" and "sleep_level" not in state


def weights(tmp: Path, name: str, size: int) -> str:
    """A model directory whose weight files take ``size`` bytes on disk."""
    folder = tmp / "models" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    (folder / "config.json").write_text("{}")
    return str(folder)


async def test_level_1_sleepers_weights_must_fit_the_host_memory_budget(orch, tmp_path):
    entries = [vllm_entry(n, tmp_path) for n in ("alpha", "beta", "gamma", "huge")]
    for entry, size in zip(entries, (10_000, 10_000, 10_000, 20_000), strict=True):
        entry["backend_config"]["model_path"] = weights(tmp_path, entry["name"], size)
    client = await orch(entries, VLLM_SLEEP_MAX_HOST_BYTES="15000")
    sup = orchestrator(client.app).supervisor
    for name in ("alpha", "beta", "gamma"):
        await chat(client.app, name)
    # beta's 10 kB and alpha's would not fit in 15 kB together: alpha, the least recently used, was stopped
    assert [(s.logical_name, s.host_bytes) for s in sup.sleepers] == [("beta", 10_000)]
    await chat(client.app, "huge")
    await chat(client.app, "alpha")
    # huge's 20 kB never fit: it was stopped instead of put to sleep
    assert [s.logical_name for s in sup.sleepers] == ["gamma"]
    assert [e["model"] for e in started(tmp_path)].count("served-huge") == 1
    assert not any(e["model"] == "served-huge" for e in of(tmp_path, "sleep"))
    never_two_awake(tmp_path)


async def test_ollama_and_vllm_take_turns_with_vllm_sleeping_instead_of_stopping(orch, tmp_path):
    from imageworks_proxy.gpu.tenancy import Tenant, tenancy

    unloads: list[str] = []
    client = await orch(
        [vllm_entry("alpha", tmp_path), {"name": "llama", "backend": "ollama",
                                          "backend_config": {"model_path": "ollama:/llama3"}}],
        GPU_EXCLUSIVE="1",
    )

    async def unload_all() -> None:
        unloads.append("ollama")

    keys.models(client.app).adapters["ollama"].unload_all = unload_all
    a1, _, _ = await chat(client.app, "alpha")

    lease = await tenancy(client.app).acquire(Tenant("ollama", "Ollama", stop=unload_all), Call())
    assert (await models_status(client))["alpha"] == "asleep"
    lease.release()
    a2, _, _ = await chat(client.app, "alpha")
    assert pid_of(a2) == pid_of(a1) and unloads == ["ollama", "ollama"]
    kinds = [s["kind"] for s in orchestrator(client.app).stats()["recent_swaps"]]
    assert kinds == ["cold", "switch", "wake"]
    never_two_awake(tmp_path)


async def test_a_model_asleep_although_recorded_awake_is_adopted_as_a_sleeper(orch, tmp_path):
    import aiohttp

    port = free_port()
    entries = [vllm_entry("alpha", tmp_path)]
    first = await orch(entries, port=port, VLLM_KEEP_ON_EXIT="1")
    a1, _, _ = await chat(first.app, "alpha")
    await first.close()
    # a proxy that stopped between putting it to sleep and recording that
    url = f"http://127.0.0.1:{port}/sleep?level=1"
    async with aiohttp.ClientSession() as session, session.post(url) as resp:
        assert resp.status == 200
    second = await orch(entries, port=port)
    assert await models_status(second) == {"alpha": "asleep"}
    a2, _, _ = await chat(second.app, "alpha")
    assert a2 == a1  # woken (weights reloaded, as the level was unknown), never sent a request asleep
    assert [e["method"] for e in of(tmp_path, "collective_rpc")] == ["reload_weights"]
    never_two_awake(tmp_path)
    await second.close()
