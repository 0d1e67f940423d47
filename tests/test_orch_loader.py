"""``imageworks-loader`` as a user runs it, in another process: through the admin API of a running proxy,
or directly on the state file when no proxy runs."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from imageworks_proxy import keys
from imageworks_proxy.adapters.vllm_orchestrated import orchestrator
from imageworks_proxy.testing import free_port
from imageworks_proxy.upstream import process
from tests.orch_helpers import orch_settings, started, vllm_entry


@pytest.fixture
def setup(tmp_path, make_config, registry_file):
    """Registry + settings shared by the loader (environment) and in-test proxies (Config)."""
    registry_file(
        [
            vllm_entry("alpha", tmp_path),
            vllm_entry("beta", tmp_path),
            {"name": "llama", "backend": "ollama", "backend_config": {"model_path": "ollama:/llama3"}},
        ]
    )
    settings = orch_settings(free_port(), PORT=str(free_port()))  # nothing listens on the proxy port
    config = make_config(**settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update({"CHAT_PROXY_" + k: v for k, v in settings.items()})
    for attr in ("registry", "vllm_state_path", "vllm_log_dir", "log_path"):
        env["CHAT_PROXY_" + attr.upper()] = getattr(config, attr)
    return config, env


async def loader(env, *args):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from imageworks_proxy.cli.loader import main; sys.exit(main())",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode, json.loads(out) if out.strip() else None, err.decode()


async def test_without_a_proxy_the_loader_starts_a_model_that_a_proxy_then_adopts(
    setup, tmp_path, make_app, aiohttp_client
):
    config, env = setup
    code, out, err = await loader(env, "activate-model", "alpha")
    assert code == 0, err
    assert out["logical_name"] == "alpha" and out["state"] == "loaded" and out["source"] == "state-file"
    pid = out["pid"]
    try:
        assert process.pid_alive(pid)  # keeps running after the loader exited
        code, current, _ = await loader(env, "current-model")
        assert code == 0 and current["pid"] == pid and current["state"] == "loaded"

        client = await aiohttp_client(make_app(config))
        state = orchestrator(client.app).public_state()
        assert state["active"] == "alpha" and state["pid"] == pid and state["adopted"]
        resp = await client.post(
            "/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}]}
        )
        assert (await resp.json())["choices"][0]["message"]["content"].endswith(f"pid {pid}")
        assert len(started(tmp_path)) == 1  # adopted, not duplicated
        await client.close()  # this proxy does not keep it
        assert not process.pid_alive(pid)
        code, current, _ = await loader(env, "current-model")
        assert code == 0 and current is None
    finally:
        await process.stop_group(pid, term_timeout=2)


async def test_without_a_proxy_the_loader_switches_and_stops(setup, tmp_path):
    config, env = setup
    code, alpha, err = await loader(env, "activate-model", "alpha")
    assert code == 0, err
    code, beta, err = await loader(env, "activate-model", "beta")
    assert code == 0, err
    assert beta["logical_name"] == "beta" and not process.pid_alive(alpha["pid"])
    code, out, err = await loader(env, "activate-model", "--stop")
    assert code == 0 and out is None
    assert not process.pid_alive(beta["pid"]) and not os.path.exists(config.vllm_state_path)
    assert [e["model"] for e in started(tmp_path)] == ["served-alpha", "served-beta"]


async def test_the_loader_never_kills_a_pid_whose_command_line_does_not_match(setup, tmp_path):
    config, env = setup
    victim = process.spawn(
        [sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "victim.log")
    )
    try:
        os.makedirs(os.path.dirname(config.vllm_state_path), exist_ok=True)
        with open(config.vllm_state_path, "w") as fh:
            json.dump(
                {
                    "logical_name": "alpha",
                    "served_model_id": "served-alpha",
                    "host": "127.0.0.1",
                    "port": 1,
                    "pid": victim,
                    "pgid": victim,
                    "started_at": 0,
                    "command": ["vllm", "--model", "/m"],
                    "prefix_len": 1,
                },
                fh,
            )
        code, out, err = await loader(env, "activate-model", "--stop")
        assert code == 0 and out is None
        assert process.pid_alive(victim)
        assert not os.path.exists(config.vllm_state_path)  # the stale record is gone
    finally:
        await process.stop_group(victim, term_timeout=2)


async def test_a_failed_direct_start_exits_1_with_vllms_reason(setup, tmp_path, make_config, registry_file):
    config, env = setup
    registry_file(
        [vllm_entry("broken", tmp_path, "--fake-fail", "ValueError: Unknown quantization method: foo")]
    )
    code, out, err = await loader(env, "activate-model", "broken")
    assert code == 1 and out is None
    assert "Unknown quantization method: foo" in err
    assert not os.path.exists(config.vllm_state_path)


async def test_with_a_running_proxy_the_loader_uses_its_admin_api(setup, tmp_path, make_app, aiohttp_server):
    config, env = setup
    server = await aiohttp_server(make_app(config))
    url = str(server.make_url("")).rstrip("/")
    code, out, err = await loader(env, "--url", url, "activate-model", "beta")
    assert code == 0, err
    assert out["logical_name"] == "beta" and out["source"] == "proxy"
    assert orchestrator(server.app).public_state()["pid"] == out["pid"]
    code, current, _ = await loader(env, "--url", url, "current-model")
    assert current["logical_name"] == "beta" and current["state"] == "loaded"
    code, out, err = await loader(env, "--url", url, "activate-model", "llama")
    assert code == 1 and "not an orchestrated vLLM model" in err
    code, out, err = await loader(env, "--url", url, "activate-model", "no-such-model")
    assert code == 1 and "model_not_found" in err
    code, out, _ = await loader(env, "--url", url, "activate-model", "--stop")
    assert code == 0 and out is None
    assert orchestrator(server.app).public_state()["state"] == "stopped"
    assert not os.path.exists(keys.config(server.app).vllm_state_path)


async def test_usage_errors_exit_2_and_list_shows_the_registry(setup):
    _, env = setup
    assert (await loader(env, "activate-model"))[0] == 2
    assert (await loader(env, "activate-model", "alpha", "--stop"))[0] == 2
    assert (await loader(env, "bogus"))[0] == 2
    code, rows, _ = await loader(env, "list")
    assert code == 0
    assert {r["logical_name"]: r["backend"] for r in rows} == {
        "alpha": "vllm",
        "beta": "vllm",
        "llama": "ollama",
    }
    bad_env = {**env, "CHAT_PROXY_VLLM_PORT": "not-a-port"}
    assert (await loader(bad_env, "current-model"))[0] == 2


async def test_with_sleep_mode_the_loader_lists_sleepers_and_puts_to_sleep_or_stops(setup, tmp_path):
    config, env = setup
    env = {**env, "CHAT_PROXY_VLLM_SLEEP_LEVEL": "1"}
    code, alpha, err = await loader(env, "activate-model", "alpha")
    assert code == 0, err
    code, beta, err = await loader(env, "activate-model", "beta")
    assert code == 0, err
    assert process.pid_alive(alpha["pid"])  # put to sleep, not stopped
    code, current, _ = await loader(env, "current-model")
    assert code == 0 and current["logical_name"] == "beta"
    assert [(s["logical_name"], s["pid"], s["sleep_level"]) for s in current["sleeping"]] == [
        ("alpha", alpha["pid"], 1)
    ]
    code, current, err = await loader(env, "sleep-model", "beta")
    assert code == 0, err
    assert current["logical_name"] is None and [s["logical_name"] for s in current["sleeping"]] == [
        "alpha", "beta"
    ]
    code, current, err = await loader(env, "stop-model", "alpha")
    assert code == 0, err
    assert not process.pid_alive(alpha["pid"])
    assert [s["logical_name"] for s in current["sleeping"]] == ["beta"]
    code, _, err = await loader(env, "stop-model", "alpha")
    assert code == 1 and "no vLLM runs model 'alpha'" in err
    code, out, _ = await loader(env, "activate-model", "--stop")  # every model, asleep ones too
    assert code == 0 and out is None and not process.pid_alive(beta["pid"])
    assert not os.path.exists(config.vllm_state_path)
    assert len(started(tmp_path)) == 2


async def test_through_the_admin_api_the_loader_sleeps_and_stops_models(
    setup, make_app, aiohttp_server, make_config
):
    config, env = setup
    settings = orch_settings(config.vllm_port, PORT=str(config.port), VLLM_SLEEP_LEVEL="1")
    config = make_config(**settings)
    server = await aiohttp_server(make_app(config))
    url = str(server.make_url("")).rstrip("/")
    for name in ("alpha", "beta"):
        code, _, err = await loader(env, "--url", url, "activate-model", name)
        assert code == 0, err
    code, current, _ = await loader(env, "--url", url, "current-model")
    assert current["logical_name"] == "beta"
    assert [s["logical_name"] for s in current["sleeping"]] == ["alpha"]
    code, current, err = await loader(env, "--url", url, "sleep-model")
    assert code == 0, err
    assert current["logical_name"] is None and len(current["sleeping"]) == 2
    code, current, err = await loader(env, "--url", url, "stop-model", "alpha")
    assert code == 0, err
    assert [s["logical_name"] for s in current["sleeping"]] == ["beta"]
    code, out, _ = await loader(env, "--url", url, "activate-model", "--stop")
    assert code == 0 and out is None
    assert orchestrator(server.app).supervisor.instances == []
