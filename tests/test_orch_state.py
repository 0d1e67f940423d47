"""The active-vLLM state file: atomic writes, adoption checks, stale and corrupt files."""

from __future__ import annotations

import json
import os
import sys
import time

import attrs
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
        time.sleep(0.01)
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


def test_several_instances_or_a_sleeping_one_are_written_as_format_2(tmp_path):
    sf = StateFile(str(tmp_path / "active_vllm.json"))
    awake = state_for(123, ["vllm", "--model", "/a", "--port", "24001"])
    asleep = attrs.evolve(state_for(456, ["vllm", "--model", "/b", "--port", "24002"]), logical_name="beta",
                          port=24002, sleep_level=1, asleep_since=1767268800.5)
    sf.write_all([asleep, awake])
    data = json.loads((tmp_path / "active_vllm.json").read_text())
    assert data["format"] == 2 and [i["pid"] for i in data["instances"]] == [456, 123]
    assert data["instances"][0]["sleep_level"] == 1 and data["instances"][0]["asleep_since"] == 1767268800.5
    assert data["instances"][1]["sleep_level"] == 0 and data["instances"][1]["asleep_since"] is None
    assert sf.read_all() == [asleep, awake]
    sf.write_all([asleep])  # one sleeping instance is still format 2: format 1 has no sleep fields
    assert json.loads((tmp_path / "active_vllm.json").read_text())["format"] == 2
    sf.write_all([])
    assert not (tmp_path / "active_vllm.json").exists()


async def test_dead_or_reused_entries_are_dropped_and_the_live_ones_kept(tmp_path):
    dead = process.spawn([sys.executable, "-c", "pass"], str(tmp_path / "x.log"))
    while process.pid_alive(dead):
        time.sleep(0.01)
    flags = ["-c", "import time; time.sleep(30)"]
    live = process.spawn([sys.executable, *flags], str(tmp_path / "y.log"))
    try:
        sf = StateFile(str(tmp_path / "active_vllm.json"))
        kept = attrs.evolve(state_for(live, ["launcher", *flags]), sleep_level=2, asleep_since=5.0)
        sf.write_all([state_for(dead, [sys.executable, "-c", "pass"]), kept])
        assert sf.load_all_live() == [kept]
        assert sf.read_all() == [kept]  # the file was rewritten without the dead one
    finally:
        await process.stop_group(live, term_timeout=2)


def test_a_corrupt_instance_of_a_format_2_file_is_named(tmp_path, caplog):
    path = tmp_path / "active_vllm.json"
    good = {"logical_name": "a", "served_model_id": "a", "port": 1, "pid": 2, "pgid": 2, "started_at": 0,
            "command": ["v", "--x"], "prefix_len": 1}
    path.write_text(json.dumps({"format": 2, "instances": [good, {**good, "sleep_level": 7}]}))
    assert StateFile(str(path)).load_all_live() == []
    assert "instances[1]: sleep_level: expected 0, 1 or 2, got 7" in caplog.text and not path.exists()
