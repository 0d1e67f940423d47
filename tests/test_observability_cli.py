"""The server command's human log and request log, seen from a real process."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import queue
import signal
import subprocess
import sys

import aiohttp

from imageworks_proxy.cli.logs import LogWriter, _Formatter, _ThreadQueueHandler
from imageworks_proxy.testing import free_port, user
from imageworks_proxy.testing.fakes.openai import make_fake_openai, registry_for

SECRET_PROMPT = "TANGERINE-SUBMARINE-7"


async def test_the_server_logs_one_line_per_request_and_writes_the_request_log(aiohttp_server, tmp_path):
    upstream = await aiohttp_server(make_fake_openai())
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(registry_for(str(upstream.make_url("/v1")))))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")},
        "CHAT_PROXY_PORT": str(port),
        "CHAT_PROXY_REGISTRY": str(registry),
        "CHAT_PROXY_LOG_PATH": str(tmp_path / "logs" / "chat.jsonl"),
        "CHAT_PROXY_VLLM_STATE_PATH": str(tmp_path / "state.json"),
        "CHAT_PROXY_API_KEYS": "sk-cli-secret",
        "CHAT_PROXY_ENABLE_METRICS": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imageworks_proxy", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(base + "/v1/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            headers = {"Authorization": "Bearer sk-cli-secret", "X-Request-Id": "cli-trace-1"}
            async with http.post(
                base + "/v1/chat/completions",
                headers=headers,
                json={"model": "m-echo", "messages": user(SECRET_PROMPT), "stream": True},
            ) as r:
                assert r.status == 200 and r.headers["X-Request-Id"] == "cli-trace-1"
                await r.read()
            async with http.get(base + "/metrics", headers={"Authorization": "Bearer sk-cli-secret"}) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    text = stderr.decode()
    access = [line for line in text.splitlines() if "imageworks_proxy.access" in line]
    assert any(
        'POST /v1/chat/completions model="m-echo" status=200 ' in line and line.endswith("rid=cli-trace-1")
        for line in access
    ), text
    assert not any("/v1/health" in line or "/metrics" in line for line in access)  # DEBUG, not INFO
    assert "sk-cli-secret" not in text and SECRET_PROMPT not in text
    [record] = [json.loads(line) for line in (tmp_path / "logs" / "chat.jsonl").read_text().splitlines()]
    assert record["request_id"] == "cli-trace-1" and record["stream"] is True and record["status"] == 200
    assert SECRET_PROMPT not in json.dumps(record)


async def test_the_server_freezes_start_up_objects_and_collects_young_objects_less_often():
    import gc

    from imageworks_proxy.cli.server import GC_YOUNG_THRESHOLD, _freeze_startup_objects

    before = gc.get_threshold()
    try:
        await _freeze_startup_objects(None)  # type: ignore[arg-type]  # the app is not looked at
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_log_call_with_a_bad_format_is_written_as_such_and_the_next_lines_follow():
    code = (
        "import logging\n"
        "from imageworks_proxy.cli.logs import configure_logging\n"
        "configure_logging('INFO')\n"
        "logging.getLogger('imageworks_proxy.x').info('%d requests', 'not a number')\n"
        "logging.getLogger('imageworks_proxy.x').info('after %s', 'it')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    lines = proc.stderr.splitlines()
    assert "<unformattable log record from imageworks_proxy.x: '%d requests'" in lines[0]
    assert lines[1].endswith("INFO imageworks_proxy.x: after it") and len(lines) == 2


def _writer() -> tuple[LogWriter, logging.Logger, io.StringIO]:
    """A log writer (no thread: drained by hand) whose handler is the only one of a logger of its own."""
    records: queue.SimpleQueue = queue.SimpleQueue()
    handler = _ThreadQueueHandler(records)
    writer = LogWriter(records, _Formatter(), handler)
    logger = logging.Logger("imageworks_proxy.access")  # outside the logging tree: no root to reach
    logger.addHandler(handler)
    return writer, logger, io.StringIO()


def _drained(writer: LogWriter, out: io.StringIO, monkeypatch) -> list[str]:
    monkeypatch.setattr(sys, "stderr", out)
    writer._drain()
    return out.getvalue().splitlines()


def test_a_line_queued_directly_reads_exactly_as_the_same_line_logged(monkeypatch):
    writer, logger, out = _writer()
    args = ("POST", "/v1/chat/completions", ' model="m"', 200, "", 12.345, "req_1")
    logger.info("%s %s%s status=%d%s %.1fms rid=%s", *args)
    assert writer.direct(logger)(logging.INFO, "%s %s%s status=%d%s %.1fms rid=%s", args) is True
    logged, direct = _drained(writer, out, monkeypatch)
    assert logged.split(" ", 2)[2] == direct.split(" ", 2)[2]
    assert direct.endswith('INFO imageworks_proxy.access: POST /v1/chat/completions model="m" status=200 '
                           "12.3ms rid=req_1")
    # the same instant gives the same date and time, to the millisecond
    record = logging.LogRecord("n", logging.WARNING, "", 0, "hi %s", ("x",), None)
    record.created, record.msecs = 1_700_000_000.0421, 42.0
    assert writer.formatter.line((1_700_000_000.0421, logging.WARNING, "n", "hi %s", ("x",))) == (
        writer.formatter.format(record)
    )


def test_a_line_goes_the_usual_way_when_something_else_would_see_it(monkeypatch):
    writer, logger, out = _writer()
    direct = writer.direct(logger)
    assert direct(logging.INFO, "a %s", ("line",)) is True
    seen: list[str] = []
    logger.addFilter(lambda record: seen.append(record.getMessage()) or True)
    assert direct(logging.INFO, "a %s", ("line",)) is False  # the filter must see it
    logger.filters.clear()
    other = logging.Handler()
    logger.addHandler(other)
    assert direct(logging.INFO, "a %s", ("line",)) is False  # so must a second handler
    logger.removeHandler(other)
    parent = logging.Logger("imageworks_proxy")
    parent.addHandler(other)
    logger.parent = parent
    assert direct(logging.INFO, "a %s", ("line",)) is False  # or one where the line propagates to
    logger.propagate = False
    assert direct(logging.INFO, "a %s", ("line",)) is True
    writer.handler.setLevel(logging.WARNING)
    assert direct(logging.INFO, "a %s", ("line",)) is False  # our handler would drop it
    assert _drained(writer, out, monkeypatch)[-1].endswith("INFO imageworks_proxy.access: a line")
    assert len(out.getvalue().splitlines()) == 2


def test_a_direct_line_with_a_bad_format_is_written_as_such(monkeypatch):
    writer, logger, out = _writer()
    writer.direct(logger)(logging.INFO, "%d requests", ("not a number",))
    logger.info("after %s", "it")
    bad, after = _drained(writer, out, monkeypatch)
    assert bad.startswith("<unformattable log record from imageworks_proxy.access: '%d requests'")
    assert after.endswith("INFO imageworks_proxy.access: after it")
