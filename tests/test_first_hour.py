"""The first hour with the real command line, run as a user runs it (a subprocess): each common mistake
gets a message that names it, the options mirror the settings, and the start-up summary says what is
served, what is hidden and why."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.process_helpers import PROXY, ServedProxy, clean_env

DEMO = {"name": "demo", "backend": "demo"}


def _run(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROXY, *args], env=clean_env(**settings), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def _registry(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(entries))
    return path


def _summary_logged(served: ServedProxy) -> str:
    """Wait until the start-up summary is in the log, then stop the proxy and return its log."""
    served.wait_for_log("listening on")
    return served.stop()


def _squeezed(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines()]


# -- mistakes that stop the start, with one line ---------------------------------------------------------


def test_a_registry_that_does_not_exist_stops_the_start_naming_the_path_and_the_variable(tmp_path):
    result = _run(tmp_path, CHAT_PROXY_REGISTRY=str(tmp_path / "nope.json"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "registry not found" in line and "nope.json" in line and "CHAT_PROXY_REGISTRY" in line
    option = _run(tmp_path, "--registry", "missing/registry.json")
    assert option.returncode == 2
    assert "--registry" in option.stderr and "missing/registry.json" in option.stderr
    default = _run(tmp_path)  # nothing set: ./configs is the default, and it is not there
    assert default.returncode == 2
    assert "'configs'" in default.stderr and "the default" in default.stderr
    assert len(default.stderr.strip().splitlines()) == 1


def test_a_registry_folder_without_registry_files_stops_the_start(tmp_path):
    (tmp_path / "configs").mkdir()
    result = _run(tmp_path, IMAGEWORKS_REGISTRY_DIR=str(tmp_path / "configs"))
    assert result.returncode == 2
    assert "holds no model_registry.json" in result.stderr and "IMAGEWORKS_REGISTRY_DIR" in result.stderr


def test_a_bad_option_value_names_the_option(tmp_path):
    result = _run(tmp_path, "--port", "eighty", "--registry", str(_registry(tmp_path, [DEMO])))
    assert result.returncode == 2
    assert "--port='eighty'" in result.stderr and "port number" in result.stderr


# -- mistakes that are named while the proxy runs ----------------------------------------------------------


def test_unknown_variables_and_registry_keys_and_unservable_entries_are_named_at_start_up(tmp_path):
    registry = _registry(tmp_path, [
        DEMO,
        {"name": "typo", "backend": "demo", "backend_confg": {}, "capabilities": {"visoin": True}},
        {"name": "nowhere", "backend": "lmdeploy"},  # the passthrough fallback, but no URL to reach
        {"name": "other", "backend": "openai", "backend_config": {"adapter": "no-such-adapter"}},
    ])
    served = ServedProxy(tmp_path, "--registry", str(registry), CHAT_PROXY_INCLUDE_NON_INSTALED="1",
                    CHAT_PROXY_FROBNICATE="1")
    health = served.get("/v1/health")
    models = {m["id"]: m["extensions"]["status"] for m in served.get("/v1/models")["data"]}
    log = _summary_logged(served)

    assert (
        "CHAT_PROXY_INCLUDE_NON_INSTALED is not a setting (did you mean 'CHAT_PROXY_INCLUDE_NON_INSTALLED'?)"
    ) in log
    assert "CHAT_PROXY_FROBNICATE is not a setting; ignored" in log
    warnings = health["registry"]["warnings"]
    assert "entry 'typo': unknown key 'backend_confg' (did you mean 'backend_config'?)" in warnings
    assert "entry 'typo': capabilities: unknown key 'visoin' (did you mean 'vision'?)" in warnings
    for warning in warnings:
        assert warning in log
    problems = health["registry"]["problems"]
    assert any(p.startswith("entry 'nowhere': ") and "base_url" in p for p in problems), problems
    assert any(p.startswith("entry 'other': ") and "'no-such-adapter'" in p for p in problems), problems
    assert "entry 'nowhere' cannot be served" in log and "entry 'other' cannot be served" in log
    assert models == {"demo": "loaded", "typo": "loaded", "nowhere": "unavailable", "other": "unavailable"}


def test_the_start_up_summary_lists_models_hidden_entries_and_backend_servers(tmp_path):
    registry = _registry(tmp_path, [
        DEMO,
        {"name": "gone", "backend": "vllm", "download_path": str(tmp_path / "weights" / "gone")},
        {"name": "old", "backend": "demo", "deprecated": True},
        {"name": "probe", "backend": "demo", "metadata": {"testing": True}},
        {"name": "llama", "backend": "ollama", "backend_config": {"model_path": "ollama:/llama3.2:3b"},
         "download_path": "ollama:/llama3.2:3b"},
    ])
    served = ServedProxy(tmp_path, "--registry", str(registry))
    log = _summary_logged(served)
    assert f"listening on {served.url}" in log and f"registry: {registry} (5 entries)" in log
    summary = log.split("listening on", 1)[1]
    assert "models listed (2):" in summary
    assert [ln.split() for ln in summary.splitlines() if ln.strip().startswith(("demo ", "llama "))] == [
        ["demo", "demo", "loaded"],
        ["llama", "ollama", "unavailable"],  # an importer's ollama:/ path is no file: listed anyway
    ]
    lines = _squeezed(summary)
    assert "hidden (3):" in lines
    assert f"gone not installed: {tmp_path / 'weights' / 'gone'} not found" in lines
    assert "old deprecated" in lines
    assert "probe test model (CHAT_PROXY_INCLUDE_TEST_MODELS=1 lists it)" in lines
    assert any(ln.endswith("DOES NOT ANSWER (ollama)") for ln in lines)
    # Ollama not answering is a warning of its own, not a debug line.
    assert any(" WARNING imageworks_proxy.ollama: Ollama at " in ln for ln in log.splitlines())


# -- configuration ----------------------------------------------------------------------------------------


def test_options_win_over_the_environment_which_wins_over_the_file(tmp_path):
    toml = tmp_path / "proxy.toml"
    toml.write_text(
        'port = 8201\nhost = "127.0.0.2"\nlog_level = "DEBUG"\nmax_log_bytes = 1234\n'
        "[chat_proxy]\nschema_version = 4\n"
    )
    result = _run(
        tmp_path, "--print-config", "--config", str(toml), "--port", "8300", "--log-level", "warning",
        CHAT_PROXY_PORT="8299", CHAT_PROXY_HOST="127.0.0.3",
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in result.stdout.splitlines()}
    assert rows["CHAT_PROXY_PORT"] == ["8300", "(command"]
    assert rows["CHAT_PROXY_LOG_LEVEL"] == ["WARNING", "(command"]
    assert rows["CHAT_PROXY_CONFIG_FILE"] == [str(toml), "(command"]
    assert rows["CHAT_PROXY_HOST"] == ["127.0.0.3", "(env)"]
    # A [chat_proxy] table and top-level keys in one file are both read.
    assert rows["CHAT_PROXY_SCHEMA_VERSION"] == ["4", "(file)"]
    assert rows["CHAT_PROXY_MAX_LOG_BYTES"] == ["1234", "(file)"]


def test_the_imageworks_sectioned_config_file_is_read_and_unsupported_keys_are_named(tmp_path):
    # As ImageWorks writes configs/chat_proxy.toml.
    toml = tmp_path / "chat_proxy.toml"
    toml.write_text(
        "[general]\nschema_version = 1\nrequire_template = true\n"
        '[server]\nhost = "127.0.0.1"\nport = 8123\nloopback_alias = ""\nenable_metrics = true\n'
        "[timeouts]\nbackend_timeout_ms = 90000\n"
        '[autostart]\nautostart_enabled = true\nautostart_map_raw = "{\\"m\\": \\"run-m\\"}"\n'
        '[vision_preprocess]\nauto_downscale_images = false\nmax_image_pixels = 512\n'
        'image_jpeg_quality = 85\nvision_downscale_backends = ["vllm", "lmdeploy"]\n'
        "[reasoning_history]\nreasoning_keep_last_n_turns = 1\n"
        '[vllm]\nvllm_port = 24011\nvllm_max_model_len = ""\n'
        '[ollama]\nollama_base_url = "http://127.0.0.1:11500"\n'
    )
    result = _run(tmp_path, "--print-config", CHAT_PROXY_CONFIG_FILE=str(toml))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in result.stdout.splitlines()}
    assert rows["CHAT_PROXY_PORT"] == ["8123", "(file)"]
    assert rows["CHAT_PROXY_ENABLE_METRICS"] == ["1", "(file)"]
    assert rows["CHAT_PROXY_BACKEND_TIMEOUT_MS"] == ["90000", "(file)"]
    assert rows["CHAT_PROXY_AUTOSTART_MAP"] == ['{"m":"run-m"}', "(file)"]
    assert rows["CHAT_PROXY_VLLM_PORT"] == ["24011", "(file)"]
    assert rows["CHAT_PROXY_LOOPBACK_ALIAS"][0] == "(default)"  # "" is unset: no value shown
    assert rows["CHAT_PROXY_VISION_DOWNSCALE"] == ["0", "(file)"]  # auto_downscale_images
    assert rows["CHAT_PROXY_VISION_TARGET_LONG_EDGE"] == ["512", "(file)"]  # max_image_pixels
    assert rows["CHAT_PROXY_VISION_DOWNSCALE_BACKENDS"] == ["vllm,lmdeploy", "(file)"]
    for key in ("image_jpeg_quality", "reasoning_keep_last_n_turns"):
        assert f"{key} is not supported by imageworks-proxy" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_typo_in_our_own_config_file_is_an_error_with_a_suggestion(tmp_path):
    toml = tmp_path / "proxy.toml"
    toml.write_text("[chat_proxy]\nprot = 8200\n")
    result = _run(tmp_path, "--print-config", "--config", str(toml))
    assert result.returncode == 2
    assert "--config=" in result.stderr and "unknown setting(s) [chat_proxy] prot (did you mean 'port'?)" in (
        result.stderr
    )


@pytest.mark.parametrize("option", ["--print-config", "--list-plugins"])
def test_listing_commands_piped_into_head_print_no_traceback_and_no_registry_error(tmp_path, option):
    # The registry does not exist: irrelevant to what was asked.
    env = clean_env(CHAT_PROXY_REGISTRY=str(tmp_path / "nope.json"))
    result = subprocess.run(
        f"{PROXY} {option} | head -n 1", shell=True, env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr == ""
