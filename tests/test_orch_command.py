"""The vLLM command line built from a registry entry."""

from __future__ import annotations

import pytest

from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.vllm.command import build_command, flag_value


def entry(**bc):
    extra = bc.pop("extra_args", [])
    fields = bc.pop("fields", {})
    return parse_entry(
        {
            "name": "qwen",
            "backend": "vllm",
            "served_model_id": "qwen-7b",
            "backend_config": {"model_path": "/w/qwen", "extra_args": extra, **bc},
            **fields,
        }
    )


def test_seed_flags_follow_the_launcher_and_extra_args_come_last_verbatim(make_config):
    cfg = make_config(VLLM_COMMAND="vllm-bin serve-ish", VLLM_PORT="24123", VLLM_GPU_MEMORY_UTILIZATION="0.6")
    cmd = build_command(cfg, entry(extra_args=["--enforce-eager", "--limit-mm-per-prompt", '{"image": 4}']))
    assert cmd.argv == (
        "vllm-bin",
        "serve-ish",
        "--model",
        "/w/qwen",
        "--host",
        "127.0.0.1",
        "--port",
        "24123",
        "--served-model-name",
        "qwen-7b",
        "--gpu-memory-utilization",
        "0.6",
        "--enforce-eager",
        "--limit-mm-per-prompt",
        '{"image": 4}',
    )
    assert cmd.flags == cmd.argv[2:]
    assert (cmd.port, cmd.served_model_id, cmd.gpu_memory_utilization) == (24123, "qwen-7b", 0.6)


def test_max_model_len_and_chat_template_are_added_when_configured(make_config, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    cfg = make_config(VLLM_MAX_MODEL_LEN="8192")
    cmd = build_command(cfg, entry(fields={"chat_template": {"path": str(template)}}))
    assert flag_value(cmd.argv, "--max-model-len") == "8192"
    assert flag_value(cmd.argv, "--chat-template") == str(template)


@pytest.mark.parametrize("override", [["--gpu-memory-utilization", "0.9"], ["--gpu-memory-utilization=0.9"]])
def test_a_flag_present_in_extra_args_is_not_added_again(make_config, override):
    cfg = make_config(VLLM_GPU_MEMORY_UTILIZATION="0.5", VLLM_MAX_MODEL_LEN="4096")
    cmd = build_command(
        cfg, entry(extra_args=[*override, "--max-model-len", "2048", "--served-model-name", "alias"])
    )
    joined = " ".join(cmd.argv)
    assert joined.count("--gpu-memory-utilization") == 1
    assert joined.count("--max-model-len") == 1 and flag_value(cmd.argv, "--max-model-len") == "2048"
    assert joined.count("--served-model-name") == 1
    assert cmd.gpu_memory_utilization == 0.9
    assert cmd.served_model_id == "alias"  # what the proxy must send upstream


def test_download_path_is_used_when_there_is_no_model_path(make_config):
    e = parse_entry({"name": "m", "backend": "vllm", "download_path": "/weights/m"})
    cmd = build_command(make_config(), e)
    assert flag_value(cmd.argv, "--model") == "/weights/m"
    assert cmd.served_model_id == "m"  # the logical name, which the proxy sends upstream


def test_an_entry_with_nothing_to_load_fails_to_start(make_config):
    with pytest.raises(ProxyError) as exc:
        build_command(make_config(), parse_entry({"name": "m", "backend": "vllm"}))
    assert exc.value.status == 503 and exc.value.code == "model_start_failed"


def test_the_default_launcher_is_this_python_running_vllm(make_config):
    import sys

    cmd = build_command(make_config(), entry())
    assert cmd.argv[:3] == (sys.executable, "-m", "vllm.entrypoints.openai.api_server")
