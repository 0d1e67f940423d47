"""The plugin end to end: the proxy (with this plugin) in front of a fake llama-server subprocess,
driven with the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import openai
import pytest
from llamacpp_testlib import adapter_of, gguf_entry, read_pid

from imageworks_proxy import keys
from imageworks_proxy.testing import pid_alive


def loaded(reply: str) -> dict:
    """What the fake server said it was started with (the JSON before " you said: ")."""
    return json.loads(reply.split(" you said: ")[0])


async def statuses(client) -> dict[str, str]:
    resp = await client.get("/v1/models")
    return {m["extensions"]["logical_id"]: m["extensions"]["status"] for m in (await resp.json())["data"]}


async def test_first_chat_starts_llama_server_with_the_entry_and_its_extra_args(
    openai_sdk, make_proxy, fake_llama, gguf, pid_dir
):
    model = gguf("tiny-q4_k_m.gguf")
    client = await make_proxy([gguf_entry("tiny", model, extra_args=["--ctx-size", "4096", "--jinja"])])
    assert (await statuses(client))["tiny"] == "stopped"

    reply = await openai_sdk(client).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}]
    )

    text = reply.choices[0].message.content
    assert loaded(text) == {
        "alias": "tiny",
        "model": "tiny-q4_k_m.gguf",
        "extra": ["--ctx-size", "4096", "--jinja"],
        "mmproj": None,
    }
    assert text.endswith("you said: hi")
    assert reply.model == "tiny"
    assert (await statuses(client))["tiny"] == "loaded"
    pid = read_pid(pid_dir, "tiny")
    assert pid_alive(pid)
    log = (fake_llama / "tiny.log").read_text()
    assert f"loading {model}" in log

    await client.close()  # the app stops: its llama-server goes with it
    assert not pid_alive(pid)


async def test_streamed_chat_arrives_in_chunks_through_the_sdk(openai_sdk, make_proxy, fake_llama, gguf):
    client = await make_proxy([gguf_entry("tiny", gguf("tiny.gguf"))])
    stream = await openai_sdk(client).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(parts) > 2
    assert "".join(parts).endswith("you said: stream please")


async def test_concurrent_first_requests_share_one_server_start(
    openai_sdk, make_proxy, fake_llama, gguf, monkeypatch
):
    monkeypatch.setenv("FAKE_LLAMA_LOAD_S", "0.5")  # /health says "Loading model" for a while
    client = await make_proxy([gguf_entry("tiny", gguf("tiny.gguf"))])
    api = openai_sdk(client)
    replies = await asyncio.gather(
        *(
            api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"q{i}"}])
            for i in range(4)
        )
    )
    assert sorted(r.choices[0].message.content.rsplit(" ", 1)[-1] for r in replies) == [
        "q0",
        "q1",
        "q2",
        "q3",
    ]
    assert (fake_llama / "tiny.log").read_text().count("fake llama-server: loading") == 1


async def test_asking_for_another_gguf_model_switches_the_single_server(
    openai_sdk, make_proxy, fake_llama, gguf, pid_dir
):
    client = await make_proxy(
        [gguf_entry("alpha", gguf("alpha.gguf")), gguf_entry("beta", gguf("beta.gguf"))]
    )
    api = openai_sdk(client)
    first = await api.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "a"}])
    alpha_pid = read_pid(pid_dir, "alpha")
    second = await api.chat.completions.create(model="beta", messages=[{"role": "user", "content": "b"}])

    assert loaded(first.choices[0].message.content)["model"] == "alpha.gguf"
    assert loaded(second.choices[0].message.content)["model"] == "beta.gguf"
    assert not pid_alive(alpha_pid)
    assert pid_alive(read_pid(pid_dir, "beta"))
    assert await statuses(client) == {"alpha": "stopped", "beta": "loaded"}


async def test_a_switch_waits_for_the_stream_on_the_previous_model(
    openai_sdk, make_proxy, fake_llama, gguf, pid_dir, monkeypatch, tmp_path
):
    gate = tmp_path / "go"
    monkeypatch.setenv("FAKE_LLAMA_GATE", str(gate))
    client = await make_proxy(
        [gguf_entry("alpha", gguf("alpha.gguf")), gguf_entry("beta", gguf("beta.gguf"))]
    )
    api = openai_sdk(client)
    stream = await api.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "long answer"}], stream=True
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            break  # alpha is mid-answer
    switch = asyncio.ensure_future(
        api.chat.completions.create(model="beta", messages=[{"role": "user", "content": "b"}])
    )
    await asyncio.sleep(0.3)
    assert not switch.done() and pid_alive(read_pid(pid_dir, "alpha"))  # beta waits for alpha's stream

    gate.touch()
    text += "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.endswith("you said: long answer")  # alpha's stream was not cut by the switch
    reply = await switch
    assert loaded(reply.choices[0].message.content)["model"] == "beta.gguf"
    assert not pid_alive(read_pid(pid_dir, "alpha"))


async def test_a_model_that_fails_to_load_is_503_with_the_explaining_log_line(
    openai_sdk, make_proxy, fake_llama, gguf
):
    client = await make_proxy([gguf_entry("bad", gguf("bad.gguf", content="broken"))])
    with pytest.raises(openai.APIStatusError) as info:
        await openai_sdk(client).chat.completions.create(
            model="bad", messages=[{"role": "user", "content": "hi"}]
        )
    err = info.value
    assert err.status_code == 503
    assert err.body["code"] == "model_start_failed"
    assert "error loading model" in err.body["message"]
    assert (await statuses(client))["bad"] == "stopped"


async def test_a_model_not_ready_in_time_is_504_and_its_process_is_stopped(
    openai_sdk, make_proxy, fake_llama, gguf, pid_dir
):
    # long enough for the fake to start and write its pid on a loaded machine, short enough for a test
    client = await make_proxy(
        [gguf_entry("slow", gguf("slow.gguf", content="hang"))], vllm_start_timeout_s="4"
    )
    with pytest.raises(openai.APIStatusError) as info:
        await openai_sdk(client).chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 504
    assert info.value.body["code"] == "model_start_timeout"
    assert not pid_alive(read_pid(pid_dir, "slow"))


async def test_without_llama_server_installed_the_error_says_how_to_fix_it(
    make_proxy, fake_llama, gguf, monkeypatch, tmp_path
):
    monkeypatch.setenv("IMAGEWORKS_LLAMACPP_COMMAND", str(tmp_path / "no-such-llama-server"))
    client = await make_proxy([gguf_entry("tiny", gguf("tiny.gguf"))])
    resp = await client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["code"] == "model_start_failed"
    assert "IMAGEWORKS_LLAMACPP_COMMAND" in body["error"]["message"]


async def test_a_server_that_crashed_is_started_again_by_the_next_request(
    openai_sdk, make_proxy, fake_llama, gguf, pid_dir
):
    client = await make_proxy([gguf_entry("tiny", gguf("tiny.gguf"))])
    api = openai_sdk(client)
    await api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "1"}])
    old = read_pid(pid_dir, "tiny")
    os.kill(old, signal.SIGKILL)
    for _ in range(100):  # the proxy notices the exit: the model shows as stopped
        if (await statuses(client))["tiny"] == "stopped":
            break
        await asyncio.sleep(0.05)
    assert (await statuses(client))["tiny"] == "stopped"

    reply = await api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2"}])
    assert reply.choices[0].message.content.endswith("you said: 2")
    new = read_pid(pid_dir, "tiny")
    assert new != old and pid_alive(new)


async def test_installed_only_listing_follows_the_model_file(make_proxy, fake_llama, gguf, tmp_path):
    entries = [gguf_entry("here", gguf("here.gguf")), gguf_entry("gone", tmp_path / "missing.gguf")]
    listed = await statuses(await make_proxy(entries))
    assert set(listed) == {"here"}
    listed_all = await statuses(await make_proxy(entries, include_non_installed="1"))
    assert set(listed_all) == {"here", "gone"}


class RecordingTenancy:
    """A GPU tenancy that makes each tenant active at once and records what happened."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.tenants = {}
        self.residents: list[str] = []

    def add_resident(self, tenant) -> None:
        self.residents.append(tenant.key)  # Ollama says it may hold GPU memory from before

    async def acquire(self, tenant, call):
        self.events.append(f"acquire {tenant.key}")
        self.tenants[tenant.key] = tenant
        if tenant.start is not None:
            await tenant.start()
        events = self.events

        class Lease:
            def release(self) -> None:
                events.append(f"release {tenant.key}")

        return Lease()


async def test_each_request_holds_a_gpu_tenancy_lease_until_its_stream_ends(
    openai_sdk, make_proxy, fake_llama, gguf, pid_dir, monkeypatch, tmp_path
):
    gate = tmp_path / "go"
    monkeypatch.setenv("FAKE_LLAMA_GATE", str(gate))
    tenancy = RecordingTenancy()
    client = await make_proxy([gguf_entry("tiny", gguf("tiny.gguf"))], tenancy=tenancy)
    stream = await openai_sdk(client).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # the first words arrived; the server holds the rest back
    assert tenancy.events == ["acquire llamacpp:tiny"]  # still streaming: not released
    gate.touch()
    async for _ in stream:
        pass
    assert tenancy.events == ["acquire llamacpp:tiny", "release llamacpp:tiny"]

    # The tenancy evicts the model through the tenant's stop callback.
    pid = read_pid(pid_dir, "tiny")
    await tenancy.tenants["llamacpp:tiny"].stop()
    assert not pid_alive(pid)
    assert (await statuses(client))["tiny"] == "stopped"


async def test_a_refused_connection_restarts_a_dead_server_but_not_a_live_one(
    openai_sdk, make_proxy, fake_llama, gguf, pid_dir
):
    client = await make_proxy([gguf_entry("tiny", gguf("tiny.gguf"))])
    await openai_sdk(client).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "1"}]
    )
    adapter = adapter_of(client)
    entry = keys.models(client.server.app).store.registry.by_name["tiny"]
    live = read_pid(pid_dir, "tiny")
    assert await adapter.slot.recover(entry) is False  # alive: a retry would not help
    assert read_pid(pid_dir, "tiny") == live

    os.kill(live, signal.SIGKILL)
    assert await adapter.slot.recover(entry) is True  # what the adapter does when the connection is refused
    fresh = read_pid(pid_dir, "tiny")
    assert fresh != live and pid_alive(fresh)
    assert (await statuses(client))["tiny"] == "loaded"
