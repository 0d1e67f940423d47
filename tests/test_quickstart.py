"""The README's quick start: exactly two commands; the test one is what CI runs and lints before it tests,
the run one points at real files."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from imageworks_proxy.catalogue.registry import load_registry
from tests.process_helpers import wait_for_json

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M)
    assert [lang for lang, _ in blocks] == ["sh", "sh"], "the quick start has exactly two sh blocks"
    commands = []
    for _lang, body in blocks:
        lines = [ln for ln in body.strip().splitlines() if ln.strip()]
        assert len(lines) == 1, f"each quick-start block is one command: {body!r}"
        commands.append(lines[0].strip())
    return commands


def test_quick_start_has_exactly_two_commands():
    run, test = _quick_start_commands()
    assert "imageworks-chat-proxy" in run
    assert "pytest" in test


def test_test_command_lints_before_it_runs_the_tests():
    _run, test = _quick_start_commands()
    steps = [step.strip() for step in test.split("&&")]
    assert ".venv/bin/ruff check ." in steps, "the test command runs ruff on the whole tree"
    assert steps.index(".venv/bin/ruff check .") < steps.index(".venv/bin/python -m pytest -q")


def test_ci_runs_the_readme_test_command_verbatim():
    _run, test = _quick_start_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), ".ci/run must run the README's test command as it is written"
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def test_run_command_points_at_the_example_registry_which_loads():
    run, _test = _quick_start_commands()
    words = shlex.split(run.replace("&&", " && "))
    settings = dict(w.split("=", 1) for w in words if re.match(r"^CHAT_PROXY_\w+=", w))
    registry = ROOT / settings["CHAT_PROXY_REGISTRY"]
    assert registry.is_file()
    reg = load_registry(registry)
    assert {e.backend for e in reg.entries} >= {"ollama", "vllm"}, "the example shows one entry of each kind"


def test_both_commands_install_the_package_from_this_checkout():
    for command in _quick_start_commands():
        assert "python3 -m venv .venv" in command
        assert re.search(r"pip install -q -e '\.\[[a-z,]+\]'", command)


def test_run_command_serves_the_example_models_with_clean_names(tmp_path):
    """What the README promises: start the proxy on the example registry, curl /v1/models."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update(
        CHAT_PROXY_REGISTRY=str(ROOT / "examples" / "registry.json"),
        CHAT_PROXY_PORT=str(port),
        CHAT_PROXY_LOG_PATH=str(tmp_path / "chat.jsonl"),
        CHAT_PROXY_VLLM_STATE_PATH=str(tmp_path / "s.json"),
    )
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "imageworks-chat-proxy")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = wait_for_json(proc, f"http://127.0.0.1:{port}/v1/models")
        ids = {m["id"] for m in body["data"]}
        # The Ollama entry is listed only when a local Ollama has the tag pulled.
        assert {"qwen2.5-vl-7b-instruct (AWQ)", "gpt-oss-20b (MXFP4)", "internvl2-8b"} <= ids
        assert ids <= {
            "qwen2.5-vl-7b-instruct (AWQ)",
            "gpt-oss-20b (MXFP4)",
            "internvl2-8b",
            "llama 10.7b (Q4 K M)",
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the proxy did not stop on SIGTERM") from None
    assert proc.returncode == 0, err
