"""The active-vLLM state file: atomic writes, adoption checks, stale and corrupt files."""

from __future__ import annotations

import json
import os
import sys

import pytest

from imageworks_proxy.upstream import process
from imageworks_proxy.vllm.state import StateFile, VllmState


def state_for(pid: int, command: list[str], prefix_len: int = 1) -> VllmState:
    return VllmState(
        "alpha", "served-alpha", "127.0.0.1", 24001, pid, pid, 1.0, tuple(command), prefix_len, None
    )


def test_write_then_read_round_trips_and_leaves_no_temp_files(tmp_path):
    sf = StateFile(str(tmp_path / "state" / "active_vllm.json"))
    st = state_for(123, ["python", "--model", "/m", "--port", "24001"])
    sf.write(st)
    assert sf.read_raw() == st
    assert os.listdir(tmp_path / "state") == ["active_vllm.json"]
    sf.clear()
    assert sf.read_raw() is None
    sf.clear()  # idempotent


def test_a_corrupt_file_is_cleared(tmp_path, caplog):
    path = tmp_path / "active_vllm.json"
    for junk in ("{not json", '{"logical_name": "x"}', "[1, 2]", '{"command": [], "pid": 1}'):
        path.write_text(junk)
        assert StateFile(str(path)).load_live() is None
        assert not path.exists()
    assert "corrupt" in caplog.text


def test_a_file_naming_a_dead_process_is_cleared(tmp_path):
    pid = process.spawn([sys.executable, "-c", "pass"], str(tmp_path / "x.log"))
    while process.pid_alive(pid):
        pass
    sf = StateFile(str(tmp_path / "active_vllm.json"))
    sf.write(state_for(pid, [sys.executable, "-c", "pass"]))
    assert sf.load_live() is None
    assert not os.path.exists(sf.path)


async def test_a_pid_running_something_else_is_never_adopted_nor_killed(tmp_path):
    # pid reuse: the recorded pid now runs an unrelated program
    pid = process.spawn([sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path / "x.log"))
    try:
        sf = StateFile(str(tmp_path / "active_vllm.json"))
        sf.write(state_for(pid, ["vllm", "--model", "/m", "--port", "24001"]))
        assert sf.load_live() is None
        assert not os.path.exists(sf.path)
        assert process.pid_alive(pid)
    finally:
        await process.stop_group(pid, term_timeout=2)


async def test_a_live_matching_process_is_returned_even_if_launched_differently(tmp_path):
    # the console-script case: recorded ["vllm", *flags], running as [python, script, *flags]
    flags = ["-c", "import time; time.sleep(30)"]
    pid = process.spawn([sys.executable, *flags], str(tmp_path / "x.log"))
    try:
        sf = StateFile(str(tmp_path / "active_vllm.json"))
        sf.write(state_for(pid, ["some-launcher", *flags], prefix_len=1))
        assert sf.load_live() == sf.read_raw()
    finally:
        await process.stop_group(pid, term_timeout=2)


def test_the_file_keeps_its_format_and_field_names(tmp_path):
    sf = StateFile(str(tmp_path / "active_vllm.json"))
    sf.write(state_for(123, ["vllm", "--model", "/m"]))
    data = json.loads((tmp_path / "active_vllm.json").read_text())
    assert data == {
        "format": 1,
        "logical_name": "alpha",
        "served_model_id": "served-alpha",
        "host": "127.0.0.1",
        "port": 24001,
        "pid": 123,
        "pgid": 123,
        "started_at": 1.0,
        "command": ["vllm", "--model", "/m"],
        "prefix_len": 1,
        "log_path": None,
    }


def test_a_file_without_host_prefix_or_format_still_reads(tmp_path):
    path = tmp_path / "active_vllm.json"
    older = {
        "logical_name": "alpha",
        "served_model_id": "served-alpha",
        "port": "24001",
        "pid": 7,
        "pgid": 7,
        "started_at": 5,
        "command": ["vllm", "--port", "24001"],
        "prefix_len": None,
        "log_path": "",
    }
    path.write_text(json.dumps(older))
    assert StateFile(str(path)).read_raw() == VllmState(
        "alpha", "served-alpha", "127.0.0.1", 24001, 7, 7, 5.0, ("vllm", "--port", "24001"), 0, None
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"port": "high"}, "port: expected an integer, got 'high'"),
        ({"command": "vllm serve"}, "command: expected a non-empty list of strings"),
        ({"prefix_len": 3}, "prefix_len: out of range for a command of 3 words"),
        (
            {"pid": None, "logical_name": ""},
            "logical_name: expected a non-empty string, got ''; pid: expected an integer, got None",
        ),
        ({"format": 3}, "format 3 is not one this version reads (1, 2)"),
    ],
)
def test_a_corrupt_file_is_reported_with_the_field_at_fault(tmp_path, caplog, change, reason):
    path = tmp_path / "active_vllm.json"
    StateFile(str(path)).write(state_for(123, ["vllm", "--model", "/m"]))
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    assert StateFile(str(path)).load_live() is None
    assert not path.exists()
    assert f"vLLM state file {path} is corrupt ({reason}); clearing it" in caplog.text
