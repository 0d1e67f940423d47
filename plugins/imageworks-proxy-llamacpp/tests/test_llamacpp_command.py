"""How a registry entry becomes a llama-server command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from imageworks_proxy_llamacpp.server import LlamaCppSettings, build_argv, explaining_line

from imageworks_proxy.catalogue.registry import parse_entry
from imageworks_proxy.config import load_config
from imageworks_proxy.errors import ProxyError


def settings(**env: str) -> LlamaCppSettings:
    config = load_config({"CHAT_PROXY_VLLM_PORT": "24555", "CHAT_PROXY_VLLM_LOG_DIR": "/var/log/px/vllm"})
    return LlamaCppSettings.from_env(env, config)


def entry(path: Path | str, **extra) -> object:
    obj = {"name": "m", "backend": "gguf", "backend_config": {"model_path": str(path)}, **extra}
    return parse_entry(obj)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_command_has_model_single_port_alias_and_extra_args_verbatim(tmp_path):
    model = touch(tmp_path / "m.gguf")
    e = parse_entry(
        {
            "name": "m",
            "backend": "gguf",
            "served_model_id": "served-m",
            "backend_config": {"model_path": str(model), "extra_args": ["-ngl", "99", "--ctx-size", "8192"]},
        }
    )
    assert build_argv(settings(), e) == [
        "llama-server",
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        "24555",
        "--alias",
        "served-m",
        "-ngl",
        "99",
        "--ctx-size",
        "8192",
    ]


def test_launcher_prefix_and_log_dir_come_from_the_environment(tmp_path):
    s = settings(IMAGEWORKS_LLAMACPP_COMMAND="/opt/llama.cpp/bin/llama-server --verbose")
    assert build_argv(s, entry(touch(tmp_path / "m.gguf")))[:3] == [
        "/opt/llama.cpp/bin/llama-server",
        "--verbose",
        "-m",
    ]
    assert settings().log_dir == Path("/var/log/px/llamacpp")  # beside the vLLM logs by default
    assert settings(IMAGEWORKS_LLAMACPP_LOG_DIR="/tmp/x").log_dir == Path("/tmp/x")


def test_a_folder_resolves_to_its_first_shard_and_a_vision_model_gets_its_projector(tmp_path):
    folder = tmp_path / "gemma"
    first = touch(folder / "gemma-3-27b-q4_k_m-00001-of-00002.gguf")
    touch(folder / "gemma-3-27b-q4_k_m-00002-of-00002.gguf")
    projector = touch(folder / "mmproj-gemma-3-27b-f16.gguf")
    argv = build_argv(settings(), entry(folder, capabilities=["vision"]))
    assert argv[argv.index("-m") + 1] == str(first)
    assert argv[argv.index("--mmproj") + 1] == str(projector)
    # no projector for a text-only entry, nor when extra_args already names one
    assert "--mmproj" not in build_argv(settings(), entry(folder))
    own = parse_entry(
        {
            "name": "m",
            "backend": "gguf",
            "capabilities": ["vision"],
            "backend_config": {"model_path": str(folder), "extra_args": ["--mmproj", "/x.gguf"]},
        }
    )
    assert build_argv(settings(), own).count("--mmproj") == 1


def test_an_ambiguous_folder_is_a_start_error_naming_the_files(tmp_path):
    touch(tmp_path / "a.gguf")
    touch(tmp_path / "b.gguf")
    with pytest.raises(ProxyError) as info:
        build_argv(settings(), entry(tmp_path))
    assert info.value.status == 503 and info.value.code == "model_start_failed"
    assert "a.gguf, b.gguf" in info.value.message


def test_download_path_is_used_when_there_is_no_model_path(tmp_path):
    model = touch(tmp_path / "dl" / "only.gguf")
    e = parse_entry({"name": "m", "backend": "gguf", "download_path": str(model.parent)})
    assert build_argv(settings(), e)[2] == str(model)


def test_the_explaining_log_line_is_the_last_error_line(tmp_path):
    log = tmp_path / "m.log"
    log.write_text("loading\nllama_model_load: error loading model: bad magic\nshutting down\n")
    assert explaining_line(log) == "llama_model_load: error loading model: bad magic"
    log.write_text("just this\n")
    assert explaining_line(log) == "just this"
    assert explaining_line(tmp_path / "missing.log") == ""


def test_llama_cpp_has_every_option_of_the_command_line(tmp_path):
    """llama-server ends at once on an option it does not have; the plugin writes only real ones."""
    from fake_llama_server import FLAGS

    folder = tmp_path / "gemma"
    touch(folder / "gemma-3-q4_k_m.gguf")
    touch(folder / "mmproj-gemma-3-f16.gguf")
    argv = build_argv(settings(), entry(folder, capabilities=["vision"]))
    known = {line.strip() for line in FLAGS.read_text().splitlines() if line.startswith("-")}
    assert {a for a in argv[1:] if a.startswith("-")} <= known


def test_the_fake_llama_server_refuses_an_option_llama_cpp_does_not_have(tmp_path):
    import subprocess
    import sys

    from llamacpp_testlib import FAKE_SERVER

    model = touch(tmp_path / "m.gguf")
    done = subprocess.run(
        [sys.executable, str(FAKE_SERVER), "-m", str(model), "--port", "1", "--num-ctx", "4096"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "error: invalid argument: --num-ctx" in done.stderr
