"""Configuration: defaults, precedence, error messages, --print-config, documentation coverage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from imageworks_proxy.config import SETTINGS, Config, ConfigError, describe_config, load_config

ROOT = Path(__file__).resolve().parents[1]

# The defaults users and deployments rely on, written out so that changing one in SETTINGS is a deliberate
# change here too. "" means unset.
DOCUMENTED_DEFAULTS = [
    ("CHAT_PROXY_HOST", "127.0.0.1"),
    ("CHAT_PROXY_PORT", "8100"),
    ("CHAT_PROXY_SUPPRESS_DECORATIONS", "1"),
    ("CHAT_PROXY_INCLUDE_NON_INSTALLED", "0"),
    ("CHAT_PROXY_LOOPBACK_ALIAS", ""),
    ("CHAT_PROXY_ENABLE_METRICS", "0"),
    ("CHAT_PROXY_REQUIRE_TEMPLATE", "1"),
    ("CHAT_PROXY_MAX_IMAGE_BYTES", "6000000"),
    ("CHAT_PROXY_BACKEND_TIMEOUT_MS", "120000"),
    ("CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS", "60000"),
    ("CHAT_PROXY_LOG_PATH", "logs/chat_proxy.jsonl"),
    ("CHAT_PROXY_MAX_LOG_BYTES", "25000000"),
    ("CHAT_PROXY_DISABLE_TOOL_NORMALIZATION", "0"),
    ("CHAT_PROXY_LOG_PROMPTS", "0"),
    ("CHAT_PROXY_SCHEMA_VERSION", "1"),
    ("CHAT_PROXY_AUTOSTART_ENABLED", "0"),
    ("CHAT_PROXY_AUTOSTART_MAP", ""),
    ("CHAT_PROXY_AUTOSTART_GRACE_PERIOD_S", "120"),
    ("CHAT_PROXY_VLLM_SINGLE_PORT", "1"),
    ("CHAT_PROXY_VLLM_PORT", "24001"),
    ("CHAT_PROXY_VLLM_STATE_PATH", "_staging/active_vllm.json"),
    ("CHAT_PROXY_VLLM_START_TIMEOUT_S", "180"),
    ("CHAT_PROXY_VLLM_STOP_TIMEOUT_S", "30"),
    ("CHAT_PROXY_VLLM_HEALTH_TIMEOUT_S", "120"),
    ("CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION", "0.75"),
    ("CHAT_PROXY_VLLM_MAX_MODEL_LEN", ""),
    ("CHAT_PROXY_VISION_TRUNCATE_HISTORY", "1"),
    ("CHAT_PROXY_VISION_KEEP_SYSTEM", "1"),
    ("CHAT_PROXY_VISION_KEEP_LAST_N_TURNS", "0"),
    # (the registry default depends on IMAGEWORKS_REGISTRY_DIR and is tested separately)
    ("CHAT_PROXY_INCLUDE_TEST_MODELS", "0"),
    ("CHAT_PROXY_OLLAMA_BASE_URL", "http://127.0.0.1:11434"),
    ("CHAT_PROXY_GPU_EXCLUSIVE", "1"),
    ("CHAT_PROXY_VLLM_HOST", "127.0.0.1"),
    ("CHAT_PROXY_VLLM_MAX_QUEUE", "64"),
    ("CHAT_PROXY_API_KEYS", ""),
    ("CHAT_PROXY_MAX_BODY_BYTES", "67108864"),
    ("CHAT_PROXY_METRICS_WINDOW_S", "300"),
    # safe by default: nothing but loopback names, IPs and this machine's name; no browser origins
    ("CHAT_PROXY_ADMIN_KEYS", ""),
    ("CHAT_PROXY_ALLOWED_HOSTS", ""),
    ("CHAT_PROXY_ALLOWED_ORIGINS", ""),
    ("CHAT_PROXY_IMAGE_FETCH_ALLOW", ""),
    ("CHAT_PROXY_HEADER_TIMEOUT_S", "10"),
    ("CHAT_PROXY_BODY_TIMEOUT_S", "60"),
    ("CHAT_PROXY_KEEPALIVE_TIMEOUT_S", "75"),
    ("CHAT_PROXY_MAX_CONNECTIONS", "512"),
]


def _shown(config: Config) -> dict[str, tuple[str, str]]:
    return {env: (value, source) for env, value, source, _meaning in describe_config(config)}


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHAT_PROXY_") and k != "IMAGEWORKS_REGISTRY_DIR"
    }
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "imageworks_proxy", *args],
        env=clean,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(("env", "default"), DOCUMENTED_DEFAULTS, ids=[e for e, _ in DOCUMENTED_DEFAULTS])
def test_every_documented_variable_exists_with_its_default(env, default):
    shown = _shown(load_config({}))
    assert env in shown, f"{env} is not a setting"
    assert shown[env] == (default, "default")


def test_typed_defaults_are_the_documented_ones():
    cfg = load_config({})
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8100)
    assert cfg.suppress_decorations is True and cfg.include_non_installed is False
    assert cfg.loopback_alias is None and cfg.autostart_map == {} and cfg.vllm_max_model_len is None
    assert cfg.max_image_bytes == 6_000_000 and cfg.max_log_bytes == 25_000_000
    assert cfg.autostart_grace_period_s == 120 and cfg.vllm_gpu_memory_utilization == 0.75
    assert cfg.vllm_command.split()[0] == sys.executable
    assert cfg.vllm_command.endswith("-m vllm.entrypoints.openai.api_server")


def test_registry_default_comes_from_imageworks_registry_dir():
    assert load_config({}).registry == "configs"
    cfg = load_config({"IMAGEWORKS_REGISTRY_DIR": "/srv/registry"})
    assert cfg.registry == "/srv/registry"
    assert _shown(cfg)["CHAT_PROXY_REGISTRY"] == ("/srv/registry", "env (IMAGEWORKS_REGISTRY_DIR)")
    cfg = load_config({"IMAGEWORKS_REGISTRY_DIR": "/srv/registry", "CHAT_PROXY_REGISTRY": "r.json"})
    assert _shown(cfg)["CHAT_PROXY_REGISTRY"] == ("r.json", "env")


def test_config_is_frozen():
    cfg = load_config({})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]
    assert attrs.evolve(cfg, port=9000).port == 9000


def test_precedence_env_over_file_over_default(tmp_path):
    toml = tmp_path / "proxy.toml"
    toml.write_text('port = 8200\nhost = "0.0.0.0"\ninclude_non_installed = true\n')
    cfg = load_config({"CHAT_PROXY_CONFIG_FILE": str(toml), "CHAT_PROXY_PORT": "8300"})
    assert (cfg.port, cfg.host, cfg.include_non_installed, cfg.schema_version) == (8300, "0.0.0.0", True, 1)
    shown = _shown(cfg)
    assert shown["CHAT_PROXY_PORT"] == ("8300", "env")
    assert shown["CHAT_PROXY_HOST"] == ("0.0.0.0", "file")
    assert shown["CHAT_PROXY_INCLUDE_NON_INSTALLED"] == ("1", "file")
    assert shown["CHAT_PROXY_SCHEMA_VERSION"] == ("1", "default")


def test_file_accepts_a_chat_proxy_table_lists_and_tables(tmp_path):
    toml = tmp_path / "proxy.toml"
    toml.write_text(
        '[chat_proxy]\napi_keys = ["k1", "k2"]\nvllm_gpu_memory_utilization = 0.5\n'
        '[chat_proxy.autostart_map]\nmy-model = ["run", "--fast"]\n'
    )
    cfg = load_config({"CHAT_PROXY_CONFIG_FILE": str(toml)})
    assert cfg.api_keys == ("k1", "k2")
    assert cfg.vllm_gpu_memory_utilization == 0.5
    assert cfg.autostart_map == {"my-model": ("run", "--fast")}


def test_empty_environment_value_counts_as_unset(tmp_path):
    # docker compose often passes `- CHAT_PROXY_X=`; an empty host must never mean "all interfaces".
    cfg = load_config({"CHAT_PROXY_HOST": "", "CHAT_PROXY_SUPPRESS_DECORATIONS": " ", "CHAT_PROXY_PORT": ""})
    assert (cfg.host, cfg.suppress_decorations, cfg.port) == ("127.0.0.1", True, 8100)


@pytest.mark.parametrize(
    ("env", "raw", "expected"),
    [
        ("CHAT_PROXY_PORT", "abc", "port number"),
        ("CHAT_PROXY_PORT", "70000", "port number"),
        ("CHAT_PROXY_SUPPRESS_DECORATIONS", "maybe", "expected 0/1"),
        ("CHAT_PROXY_MAX_IMAGE_BYTES", "-5", "> 0"),
        ("CHAT_PROXY_BACKEND_TIMEOUT_MS", "1.5s", "integer"),
        ("CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION", "1.5", "between 0 and 1"),
        ("CHAT_PROXY_VISION_KEEP_LAST_N_TURNS", "-1", ">= 0"),
        ("CHAT_PROXY_OLLAMA_BASE_URL", "localhost:11434", "http://"),
        ("CHAT_PROXY_AUTOSTART_MAP", "{not json", "JSON object"),
        ("CHAT_PROXY_AUTOSTART_MAP", '["a"]', "JSON object"),
        ("CHAT_PROXY_AUTOSTART_MAP", '{"m": 5}', "command string"),
        ("CHAT_PROXY_LOG_LEVEL", "chatty", "DEBUG, INFO"),
        ("CHAT_PROXY_VLLM_START_TIMEOUT_S", "soon", "number"),
        ("CHAT_PROXY_IMAGE_FETCH_ALLOW", "192.168.1.0/33", "IP address or network"),
        ("CHAT_PROXY_IMAGE_FETCH_ALLOW", "http://nas.lan", "host name"),
        ("CHAT_PROXY_HEADER_TIMEOUT_S", "0", "> 0"),
    ],
)
def test_malformed_value_is_a_one_line_error_naming_variable_value_and_expectation(env, raw, expected):
    with pytest.raises(ConfigError) as info:
        load_config({env: raw})
    message = str(info.value)
    assert "\n" not in message
    assert env in message
    assert repr(raw) in message
    assert expected in message


def test_malformed_file_value_names_the_setting_the_file_and_the_value(tmp_path):
    toml = tmp_path / "proxy.toml"
    toml.write_text('port = "eighty"\n')
    with pytest.raises(ConfigError) as info:
        load_config({"CHAT_PROXY_CONFIG_FILE": str(toml)})
    message = str(info.value)
    assert "CHAT_PROXY_PORT" in message and str(toml) in message and "'eighty'" in message
    assert "port number" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        ("port = = 1\n", "cannot read TOML"),
        ("prot = 1\n", "unknown setting(s) prot"),
    ],
)
def test_bad_config_file_is_an_error(tmp_path, content, expected):
    toml = tmp_path / "proxy.toml"
    if content is not None:
        toml.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config({"CHAT_PROXY_CONFIG_FILE": str(toml)})
    assert expected in str(info.value) and "CHAT_PROXY_CONFIG_FILE" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_config_reads_only_the_mapping_it_is_given(monkeypatch):
    monkeypatch.setenv("CHAT_PROXY_PORT", "9999")
    assert load_config({}).port == 8100
    assert load_config().port == 9999


def test_api_keys_are_masked_everywhere_they_are_shown():
    cfg = load_config({"CHAT_PROXY_API_KEYS": "sk-secret-one, sk-secret-two"})
    assert cfg.api_keys == ("sk-secret-one", "sk-secret-two")
    assert "sk-secret" not in repr(cfg)
    assert _shown(cfg)["CHAT_PROXY_API_KEYS"] == ("<2 key(s)>", "env")
    admin = load_config({"CHAT_PROXY_ADMIN_KEYS": "sk-admin-secret"})
    assert "sk-admin" not in repr(admin)
    assert _shown(admin)["CHAT_PROXY_ADMIN_KEYS"] == ("<1 key(s)>", "env")


def test_cli_bad_port_exits_nonzero_with_one_line_on_stderr(tmp_path):
    result = _cli(env={"CHAT_PROXY_PORT": "abc"}, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "CHAT_PROXY_PORT" in lines[0] and "'abc'" in lines[0] and "port number" in lines[0]
    assert result.stdout == ""


def test_cli_print_config_shows_value_source_and_meaning_and_masks_keys(tmp_path):
    toml = tmp_path / "proxy.toml"
    toml.write_text("schema_version = 3\n")
    result = _cli(
        "--print-config",
        env={
            "CHAT_PROXY_CONFIG_FILE": str(toml),
            "CHAT_PROXY_PORT": "8111",
            "CHAT_PROXY_API_KEYS": "sk-topsecret",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows, meanings = {}, {}
    for line in result.stdout.splitlines():
        m = re.match(r"^(CHAT_PROXY_\w+)\s+(.*?)\s*\(([^()]*(?:\([^()]*\))?)\)\s+(\S.*)$", line)
        assert m, f"unparsable line: {line!r}"
        rows[m.group(1)] = (m.group(2), m.group(3))
        meanings[m.group(1)] = m.group(4)
    assert set(rows) == {s.env for s in SETTINGS}
    assert rows["CHAT_PROXY_PORT"] == ("8111", "env")
    assert rows["CHAT_PROXY_SCHEMA_VERSION"] == ("3", "file")
    assert rows["CHAT_PROXY_HOST"] == ("127.0.0.1", "default")
    assert rows["CHAT_PROXY_API_KEYS"] == ("<1 key(s)>", "env")
    assert "sk-topsecret" not in result.stdout + result.stderr
    assert meanings["CHAT_PROXY_PORT"] == "Listen port"
    assert meanings["CHAT_PROXY_LOG_PROMPTS"] == "Include prompt payloads in the JSONL log"


def _docs_config_table() -> dict[str, str]:
    """Variable -> documented default, from the tables under "## Variables" in docs/configuration.md."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text.split("\n## Variables\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*`(CHAT_PROXY_\w+)`\s*\|(.*)\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(3).strip().strip("`")
    return rows


def test_every_setting_is_documented_in_the_configuration_docs():
    table = _docs_config_table()
    missing = [s.env for s in SETTINGS if s.env not in table]
    assert not missing, f"add these to the tables in docs/configuration.md: {missing}"
    unknown = sorted(set(table) - {s.env for s in SETTINGS})
    assert not unknown, f"docs/configuration.md documents settings that do not exist: {unknown}"


def test_documented_defaults_match_the_code():
    table = _docs_config_table()
    shown = _shown(load_config({}))
    for env, documented in table.items():
        value, _source = shown[env]
        if documented == "*(unset)*":
            assert value == "", f"{env}: docs say unset, code default is {value!r}"
        elif env not in ("CHAT_PROXY_REGISTRY", "CHAT_PROXY_VLLM_COMMAND"):
            assert documented == value, f"{env}: docs say {documented!r}, code default is {value!r}"
