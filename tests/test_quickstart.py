"""The README's quick start: exactly two commands; the test one is what CI runs and lints before it tests,
the run one points at real files and, on a machine with no GPU, no Ollama and no network, serves a model
that answers the README's curl lines and its `openai` SDK snippet."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from imageworks_proxy.adapters.demo import demo_reply
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


def _try_it_blocks() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M)


@pytest.fixture(scope="module")
def quick_start_proxy(tmp_path_factory):
    """The README's run command as a new user runs it: the example registry, the default address moved to
    a free port, in an empty folder, with no Ollama, no vLLM and no GPU."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run, _test = _quick_start_commands()
    registry = re.search(r"CHAT_PROXY_REGISTRY=(\S+)", run).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update(
        CHAT_PROXY_REGISTRY=str(ROOT / registry),
        CHAT_PROXY_PORT=str(port),
        CHAT_PROXY_OLLAMA_BASE_URL=f"http://127.0.0.1:{_closed_port()}",  # no Ollama, whatever the machine
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
        wait_for_json(proc, f"http://127.0.0.1:{port}/v1/health")
        yield port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the proxy did not stop on SIGTERM") from None
        assert proc.returncode == 0, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_command_serves_the_example_models_with_clean_names(quick_start_proxy):
    """What the README promises: start the proxy on the example registry, curl /v1/models."""
    port, proc = quick_start_proxy
    body = wait_for_json(proc, f"http://127.0.0.1:{port}/v1/models")
    status = {m["id"]: m["extensions"]["status"] for m in body["data"]}
    assert status == {
        "demo": "loaded",
        "qwen2.5-vl-7b-instruct (AWQ)": "stopped",
        "gpt-oss-20b (MXFP4)": None,
        "internvl2-8b": None,
        "llama 10.7b (Q4 K M)": "unavailable",  # Ollama does not answer: listed, marked unavailable
    }


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's commands need curl")
def test_the_readmes_curl_lines_print_the_demo_models_reply(quick_start_proxy):
    port, _proc = quick_start_proxy
    (lang, body), *_rest = _try_it_blocks()
    assert lang == "sh"
    plain, streamed = [ln for ln in body.strip().splitlines() if ln.strip()]
    assert "stream" not in plain and '"stream": true' in streamed

    def run(command: str) -> str:
        command = command.replace("127.0.0.1:8100", f"127.0.0.1:{port}")
        result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    reply = json.loads(run(plain))["choices"][0]["message"]["content"]
    assert reply == demo_reply([{"role": "user", "content": "Hello!"}])
    assert "demo model" in reply and "docs/registry.md" in reply
    events = [ln.removeprefix("data: ") for ln in run(streamed).splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert len(pieces) > 20, "streamed word by word"
    assert "".join(pieces) == reply


def test_the_readmes_openai_sdk_snippet_prints_the_reply(quick_start_proxy):
    port, _proc = quick_start_proxy
    code = next(body for lang, body in _try_it_blocks() if lang == "python")
    code = code.replace("127.0.0.1:8100", f"127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert first == demo_reply([{"role": "user", "content": "Hello!"}])
    assert second == demo_reply([{"role": "user", "content": "Hi"}])
