"""Process primitives: spawn in an own group, readiness, stop (SIGTERM→SIGKILL to the group, port and
VRAM release), log lines that explain a failed start."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aiohttp
import pytest

from imageworks_proxy.testing import free_port
from imageworks_proxy.testing.fakes import vllm as fake_vllm
from imageworks_proxy.upstream import process
from imageworks_proxy.vllm import ready


def test_the_explaining_line_is_the_root_cause_not_the_pointer_to_it():
    lines = [
        "INFO 10-01 12:00:00 api_server.py:1 vLLM API server version 0.11",
        "Traceback (most recent call last):",
        '  File "/x/gpu_worker.py", line 210, in determine_available_memory',
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]
    assert (
        process.explaining_line(lines)
        == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    )
    assert (
        process.explaining_line(["starting", "api_server.py: error: unrecognized arguments: --bogus"])
        == "api_server.py: error: unrecognized arguments: --bogus"
    )
    assert process.explaining_line(["just some output"]) == "just some output"
    assert process.explaining_line([]) is None


def test_log_tail_reads_the_last_lines(tmp_path):
    path = tmp_path / "x.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert process.log_tail(str(path), 3) == ["line 97", "line 98", "line 99"]
    assert process.log_tail(str(tmp_path / "missing.log")) == []


def _spawn_fake(tmp_path, port, *extra):
    argv = [
        sys.executable,
        str(fake_vllm.SCRIPT),
        "--model",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--fake-start-delay",
        "0.1",
        *extra,
    ]
    return process.spawn(argv, str(tmp_path / "fake.log"), header="== test\n")


async def _ready(pid, port, tmp_path, timeout=30.0):
    async with aiohttp.ClientSession() as s:
        await ready.wait_ready(
            s,
            f"http://127.0.0.1:{port}/health",
            deadline=time.monotonic() + timeout,
            try_timeout=1,
            exited=lambda: False if process.pid_alive(pid) else None,
            log_path=str(tmp_path / "fake.log"),
        )


async def test_spawned_server_gets_its_own_process_group_and_a_log_file(tmp_path):
    port = free_port()
    pid = _spawn_fake(tmp_path, port)
    try:
        await _ready(pid, port, tmp_path)
        assert os.getpgid(pid) == pid != os.getpgid(0)
        assert process.cmdline_matches(pid, ["--port", str(port), "--fake-start-delay", "0.1"])
        assert not process.cmdline_matches(pid, ["--port", str(port + 1), "--fake-start-delay", "0.1"])
        assert not process.port_free("127.0.0.1", port)
    finally:
        result = await process.stop_group(pid, term_timeout=5, host="127.0.0.1", port=port)
    assert result["signal"] == "SIGTERM" and result["exited"] and result["port_free"]
    assert not process.pid_alive(pid)
    log = (tmp_path / "fake.log").read_text()
    assert log.startswith("== test\n") and "Application startup complete" in log


async def test_stop_kills_the_whole_group_when_an_engine_child_ignores_sigterm(tmp_path):
    port = free_port()
    pid = _spawn_fake(tmp_path, port, "--fake-engine-child")
    await _ready(pid, port, tmp_path)
    members = process.group_pids(pid)
    assert len(members) == 2  # the API server and its "engine core"
    result = await process.stop_group(pid, term_timeout=0.5, host="127.0.0.1", port=port)
    assert result["signal"] == "SIGKILL" and result["exited"]
    assert all(not process.pid_alive(p) for p in members)
    assert process.group_pids(pid) == []


async def test_stop_waits_until_nvml_no_longer_lists_the_groups_pids(tmp_path):
    port = free_port()
    pid = _spawn_fake(tmp_path, port)
    await _ready(pid, port, tmp_path)
    stopped_at: list[float] = []
    calls = []

    def gpu_pids() -> set[int]:
        # the driver keeps listing the process for a few polls after it exited
        calls.append(time.monotonic())
        if not stopped_at:
            stopped_at.append(time.monotonic())
        return {pid} if len(calls) < 4 else {12345678}

    result = await process.stop_group(pid, term_timeout=5, host="127.0.0.1", port=port, gpu_pids=gpu_pids)
    assert result["gpu_released"] is True and len(calls) == 4


async def test_stop_gives_up_waiting_for_vram_after_the_timeout(tmp_path):
    port = free_port()
    pid = _spawn_fake(tmp_path, port)
    await _ready(pid, port, tmp_path)
    result = await process.stop_group(
        pid, term_timeout=5, host="127.0.0.1", port=port, gpu_pids=lambda: {pid}, release_timeout=0.2
    )
    assert result["exited"] and result["gpu_released"] is False


async def test_readiness_fails_at_once_with_the_explaining_line_when_the_process_exits(tmp_path):
    port = free_port()
    pid = _spawn_fake(tmp_path, port, "--fake-fail", "ValueError: max_model_len 99999 is too large")
    with pytest.raises(process.StartFailed) as exc:  # not StartTimeout: no waiting out the 10 minutes
        await _ready(pid, port, tmp_path, timeout=600)
    assert exc.value.line == "ValueError: max_model_len 99999 is too large"
    assert exc.value.returncode is None  # not our child here: pid_alive reaped it


async def test_readiness_times_out_when_nothing_becomes_healthy(tmp_path):
    pid = process.spawn([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "fake.log"))
    try:
        with pytest.raises(process.StartTimeout):
            async with aiohttp.ClientSession() as s:
                await ready.wait_ready(
                    s,
                    f"http://127.0.0.1:{free_port()}/health",
                    deadline=time.monotonic() + 0.3,
                    try_timeout=0.1,
                    exited=lambda: False,
                    log_path=None,
                )
    finally:
        await process.stop_group(pid, term_timeout=2)


async def test_spawning_a_missing_program_raises(tmp_path):
    with pytest.raises(OSError):
        process.spawn(["/nonexistent/vllm"], str(tmp_path / "x.log"))


async def test_port_free_sees_a_listener():
    port = free_port()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    try:
        assert not process.port_free("127.0.0.1", port)
    finally:
        server.close()
        await server.wait_closed()
    assert process.port_free("127.0.0.1", port)
