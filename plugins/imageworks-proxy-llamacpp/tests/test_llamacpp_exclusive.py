"""llama-server shares vLLM's port and the GPU: its tenants are scheduled like vLLM's, one at a time, even
with CHAT_PROXY_GPU_EXCLUSIVE=0 (which only lets Ollama and external servers skip the queue)."""

from __future__ import annotations

from llamacpp_testlib import gguf_entry, read_pid

from imageworks_proxy.testing import pid_alive
from imageworks_proxy.testing.fakes import vllm as fake_vllm


def vllm_entry(name: str, lock: str) -> dict:
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": name,
        "backend_config": {"model_path": f"/models/{name}", "extra_args": ["--fake-lock", lock]},
    }


async def test_llama_cpp_and_vllm_take_turns_without_gpu_exclusivity(
    openai_sdk, make_proxy, fake_llama, gguf, pid_dir, tmp_path
):
    entries = [gguf_entry("tiny", gguf("tiny.gguf")), vllm_entry("big", str(tmp_path / "gpu.lock"))]
    client = await make_proxy(
        entries, gpu_exclusive="0", vllm_command=fake_vllm.command(), include_non_installed="1",
        require_template="0",
    )
    api = openai_sdk(client)
    hi = [{"role": "user", "content": "hi"}]
    first = await api.chat.completions.create(model="big", messages=hi)
    vllm_pid = int(first.choices[0].message.content.rsplit("pid ", 1)[1])
    # llama-server needs the port vLLM holds: the scheduler stops vLLM first instead of letting the start fail
    reply = await api.chat.completions.create(model="tiny", messages=hi)
    assert reply.choices[0].message.content.endswith("you said: hi")
    llama_pid = read_pid(pid_dir, "tiny")
    assert not pid_alive(vllm_pid) and pid_alive(llama_pid)
    again = await api.chat.completions.create(model="big", messages=hi)
    assert "served by big" in again.choices[0].message.content
    assert not pid_alive(llama_pid)
