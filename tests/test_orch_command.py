"""The vLLM command line built from a registry entry."""

from __future__ import annotations

import sys

import pytest

from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.testing.fakes import vllm as fake_vllm
from imageworks_proxy.vllm.command import build_command, flag_value, launch_capabilities, loaded_model


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
    cmd = build_command(make_config(VLLM_COMMAND="python -m vllm.entrypoints.openai.api_server"), e)
    assert flag_value(cmd.argv, "--model") == "/weights/m"
    assert cmd.served_model_id == "m"  # the logical name, which the proxy sends upstream


def test_an_entry_with_nothing_to_load_fails_to_start(make_config):
    with pytest.raises(ProxyError) as exc:
        build_command(make_config(), parse_entry({"name": "m", "backend": "vllm"}))
    assert exc.value.status == 503 and exc.value.code == "model_start_failed"


def test_the_default_launcher_is_vllm_serve_run_by_this_python_with_the_model_first(make_config):
    cmd = build_command(make_config(), entry())
    assert cmd.argv[:4] == (sys.executable, "-m", "vllm.entrypoints.cli.main", "serve")
    # `vllm serve <model>`: its --model option is deprecated
    assert cmd.flags[0] == "/w/qwen" and "--model" not in cmd.flags


def test_a_serve_launcher_takes_the_model_first_and_the_api_server_form_takes_model(make_config):
    serve = build_command(make_config(VLLM_COMMAND="vllm serve"), entry())
    assert serve.argv[:3] == ("vllm", "serve", "/w/qwen")
    api = build_command(make_config(VLLM_COMMAND="python -m vllm.entrypoints.openai.api_server"), entry())
    assert flag_value(api.flags, "--model") == "/w/qwen" and "/w/qwen" not in api.flags[:1]
    # --model in extra_args wins, and then nothing is put first
    own = build_command(make_config(VLLM_COMMAND="vllm serve"), entry(extra_args=["--model", "/other"]))
    assert own.flags[0] == "--host" and flag_value(own.flags, "--model") == "/other"


def test_the_loaded_model_is_read_back_from_either_form(make_config):
    assert loaded_model(build_command(make_config(VLLM_COMMAND="vllm serve"), entry()).flags) == "/w/qwen"
    api = build_command(make_config(VLLM_COMMAND="python -m vllm.entrypoints.openai.api_server"), entry())
    assert loaded_model(api.flags) == "/w/qwen"
    assert loaded_model(("--port", "1")) is None


def test_tool_call_parser_turns_on_auto_tool_choice_with_that_parser(make_config):
    cmd = build_command(make_config(), entry(tool_call_parser="hermes"))
    assert "--enable-auto-tool-choice" in cmd.flags
    assert flag_value(cmd.flags, "--tool-call-parser") == "hermes"
    # extra_args that already have the flags keep theirs, once
    both = ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    cmd = build_command(make_config(), entry(tool_call_parser="hermes", extra_args=both))
    assert cmd.flags.count("--enable-auto-tool-choice") == 1 and cmd.flags.count("--tool-call-parser") == 1
    assert flag_value(cmd.flags, "--tool-call-parser") == "llama3_json"
    plain = build_command(make_config(), entry())
    assert not {"--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser"} & set(plain.flags)


def test_reasoning_parser_adds_its_flag(make_config):
    cmd = build_command(make_config(), entry(reasoning_parser="qwen3"))
    assert flag_value(cmd.flags, "--reasoning-parser") == "qwen3"


ENTRIES = [
    {},
    {"tool_call_parser": "hermes"},
    {"tool_call_parser": "hermes", "reasoning_parser": "qwen3"},
    {"extra_args": ["--max-num-seqs", "8", "--enforce-eager"]},
]


@pytest.mark.parametrize("fields", ENTRIES)
@pytest.mark.parametrize("launcher", [None, "python -m vllm.entrypoints.openai.api_server"])
def test_vllm_0_33_accepts_every_option_of_the_command_line(make_config, tmp_path, fields, launcher):
    """The options the proxy writes exist in vLLM 0.33 (its own option list); an unknown one would make
    vLLM exit with status 2 before loading anything."""
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    settings = {"VLLM_MAX_MODEL_LEN": "8192", **({"VLLM_COMMAND": launcher} if launcher else {})}
    cmd = build_command(
        make_config(**settings), entry(**dict(fields), fields={"chat_template": {"path": str(template)}})
    )
    options = {a.split("=", 1)[0] for a in cmd.flags if a.startswith("--")}
    assert options and options <= fake_vllm.vllm_options(), options - fake_vllm.vllm_options()


def test_launch_flags_say_whether_vllm_takes_tools_and_reasoning(make_config):
    def caps(**bc):
        return launch_capabilities(build_command(make_config(), entry(**bc)).flags).flags

    assert caps() == {"tools": False}
    assert caps(tool_call_parser="hermes") == {"tools": True}
    assert caps(tool_call_parser="hermes", reasoning_parser="qwen3") == {"tools": True, "reasoning": True}
    assert caps(extra_args=["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]) == {"tools": True}
    assert caps(reasoning_parser="none") == {"tools": False}
    # Mistral-tokenizer models take tools without a parser in vLLM: unknown, not "no"
    assert caps(extra_args=["--tokenizer-mode", "mistral"]) == {}
