"""A vLLM started on the host (``CHAT_PROXY_VLLM_SINGLE_PORT=0``) serves its model under the ``--model`` it
was given; registry entries without ``served_model_id`` (ImageWorks writes ``"None"``) get the name that
server really serves, asked once from its ``/v1/models``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imageworks_proxy.adapters.vllm_served import pick_served_name
from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.testing import free_port
from tests.process_helpers import wait_for_json


@pytest.fixture
def host_vllm():
    """The fake vLLM as the host started it: ``--model /srv/weights/Qwen2.5-7B-Instruct``, no served name."""
    port = free_port()
    argv = [sys.executable, "-m", "imageworks_proxy.testing.fakes.vllm", "--model",
            "/srv/weights/Qwen2.5-7B-Instruct", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_json(proc, f"http://127.0.0.1:{port}/v1/models")
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


async def test_an_entry_without_a_served_id_gets_the_name_the_host_vllm_serves(
    host_vllm, make_config, registry_file, proxy_client
):
    port, pid = host_vllm
    registry_file([
        {
            "name": "qwen2.5-7b-instruct",
            "backend": "vllm",
            "served_model_id": "None",
            # the registry records where ImageWorks downloaded it; the host started vLLM from elsewhere
            "backend_config": {"host": "127.0.0.1", "port": port, "model_path": "/home/me/Qwen2.5-7B"},
        }
    ])
    client = await proxy_client(make_config(VLLM_SINGLE_PORT="0", INCLUDE_NON_INSTALLED="1"))
    for _ in range(2):
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        served = "/srv/weights/Qwen2.5-7B-Instruct"
        assert body["choices"][0]["message"]["content"] == f"served by {served} pid {pid}"
        assert body["model"] == "qwen2.5-7b-instruct"  # the client sees the name it asked for


def _entry(**fields):
    return parse_entry({"name": "qwen", "backend": "vllm", **fields})


@pytest.mark.parametrize(
    ("fields", "served", "expected"),
    [
        ({"backend_config": {"model_path": "/w/qwen"}}, ["/w/qwen", "/w/other"], "/w/qwen"),  # exact
        ({"download_path": "/w/qwen"}, ["other", "/w/qwen"], "/w/qwen"),
        ({"backend_config": {"model_path": "/a/Qwen"}}, ["/b/qwen"], "/b/qwen"),  # the only one
        ({"backend_config": {"model_path": "/a/Qwen"}}, ["/b/other", "Org/qwen"], "Org/qwen"),  # same tail
        ({"backend_config": {"model_path": "/a/x"}}, ["/b/y", "/b/z"], None),  # nothing fits
    ],
)
def test_which_served_name_belongs_to_an_entry(fields, served, expected):
    assert pick_served_name(_entry(**fields), served) == expected
