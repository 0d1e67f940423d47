"""The server as ``imageworks-chat-proxy`` runs it, spoken to over raw sockets: slow and oversized
requests, connection floods, a small open-file limit and malformed HTTP (docs/security.md)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageworks_proxy.testing import free_port
from imageworks_proxy.testing.fakes.openai import registry_for
from tests.openai_schemas import validate_error
from tests.process_helpers import wait_for_json

CHAT = json.dumps({"model": "m-echo", "messages": [{"role": "user", "content": "hi"}]}).encode()
FAKE_UPSTREAM = (
    "import sys; from aiohttp import web; "
    "from imageworks_proxy.testing.fakes.openai import make_fake_openai; "
    "web.run_app(make_fake_openai(), host='127.0.0.1', port=int(sys.argv[1]), print=None, "
    "handler_cancellation=True)"
)


class Proxy:
    """A proxy process, its port and its log (stderr)."""

    def __init__(self, proc: subprocess.Popen[str], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self._seen = 0

    def new_log_lines(self) -> list[str]:
        text = self.log.read_text()
        new, self._seen = text[self._seen:], len(text)
        return [line for line in new.splitlines() if line.strip()]


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FAKE_UPSTREAM, str(port)], text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_json(proc, f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)


def start_proxy(tmp: Path, upstream: str, nofile: int | None = None, **settings: str) -> Proxy:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "registry.json").write_text(json.dumps(registry_for(upstream)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    env.update({"CHAT_PROXY_PORT": str(port), "CHAT_PROXY_REGISTRY": str(tmp / "registry.json"),
                "CHAT_PROXY_LOG_PATH": str(tmp / "requests.jsonl"),
                "CHAT_PROXY_VLLM_STATE_PATH": str(tmp / "state.json")})
    env.update({"CHAT_PROXY_" + k: v for k, v in settings.items()})
    log = tmp / "stderr.log"

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "imageworks_proxy"], env=env, cwd=tmp, text=True,
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit_files)
    wait_for_json(proc, f"http://127.0.0.1:{port}/v1/health")
    proxy = Proxy(proc, port, log)
    proxy.new_log_lines()
    return proxy


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, upstream) -> Iterator[Proxy]:
    p = start_proxy(tmp_path_factory.mktemp("proxy"), upstream, HEADER_TIMEOUT_S="1", BODY_TIMEOUT_S="1",
                    MAX_CONNECTIONS="16", MAX_BODY_BYTES="100000")
    try:
        yield p
    finally:
        _stop(p.proc)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body (the proxy's errors and JSON answers)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 30)
    return int(lines[0].split()[1]), headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 30) == b""
    except ConnectionError:
        return True


def error_code(headers: dict[str, str], body: bytes) -> str:
    assert headers["content-type"].startswith("application/json"), body
    payload = json.loads(body)
    validate_error(payload)
    return payload["error"]["code"]


def post_head(*extra: str, path: str = "/v1/chat/completions", length: int = len(CHAT)) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- slow clients ----------------------------------------------------------------------------------
async def test_a_request_head_trickled_past_the_deadline_gets_408_and_is_closed(proxy):
    reader, writer = await connect(proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    answer = asyncio.ensure_future(read_response(reader))
    for i in range(100):  # a header line every 0.2 s: data keeps coming, the head never ends
        if answer.done():
            break
        try:
            writer.write(f"X-Trickle-{i}: x\r\n".encode())
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.2)
    status, headers, body = await answer
    assert (status, error_code(headers, body)) == (408, "request_timeout")
    assert headers.get("connection") == "close"
    assert await closed(reader)
    writer.close()


async def test_a_body_trickled_past_the_deadline_gets_408_and_is_closed(proxy):
    reader, writer = await connect(proxy.port)
    writer.write(post_head() + CHAT[:10])
    await writer.drain()
    status, headers, body = await read_response(reader)
    assert (status, error_code(headers, body)) == (408, "request_timeout")
    assert await closed(reader)
    writer.close()


@pytest.mark.parametrize("expect", [False, True])
async def test_a_declared_body_over_the_cap_is_413_at_once(proxy, expect):
    reader, writer = await connect(proxy.port)
    writer.write(post_head(*(["Expect: 100-continue"] if expect else []), length=10**9))
    await writer.drain()
    status, headers, body = await read_response(reader)  # no body was sent; nothing waits for it
    assert (status, error_code(headers, body)) == (413, "payload_too_large")
    assert "CHAT_PROXY_MAX_BODY_BYTES" in json.loads(body)["error"]["message"]
    assert await closed(reader)
    writer.close()


async def test_expect_100_continue_is_answered_only_for_a_request_that_will_be_served(proxy):
    """curl sends ``Expect: 100-continue`` for bodies over 1 MiB and waits for the go-ahead."""
    reader, writer = await connect(proxy.port)
    writer.write(post_head("Expect: 100-continue"))
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(CHAT)
    status, _headers, body = await read_response(reader)
    assert status == 200, body
    writer.close()
    # a refused request gets its refusal instead of the go-ahead, and the body is never sent
    reader, writer = await connect(proxy.port)
    writer.write(post_head("Expect: 100-continue", "Origin: https://evil.example"))
    await writer.drain()
    status, headers, body = await read_response(reader)
    assert (status, error_code(headers, body)) == (403, "origin_not_allowed")
    writer.close()


async def test_connections_over_the_cap_make_room_for_new_requests(proxy):
    """Idle connections (nothing sent) past CHAT_PROXY_MAX_CONNECTIONS are closed to make room."""
    idle = [await connect(proxy.port) for _ in range(48)]
    reader, writer = await connect(proxy.port)
    writer.write(post_head() + CHAT)
    status, _headers, body = await read_response(reader)
    assert status == 200, body
    writer.close()

    async def still_open(r: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(r.read(1), 2) != b""
        except TimeoutError:
            return True

    states = await asyncio.gather(*(still_open(r) for r, _w in idle))
    for _r, w in idle:
        w.close()
    assert sum(states) <= 16


async def test_with_every_connection_busy_a_new_one_gets_503_server_busy(proxy):
    hang = json.dumps({"model": "m-hang", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    busy = []
    for _ in range(16):  # the cap: every connection serves a stream that does not end
        reader, writer = await connect(proxy.port)
        writer.write(post_head(length=len(hang)) + hang.encode())
        busy.append((reader, writer))
    for reader, _writer in busy:
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).startswith(b"HTTP/1.1 200")
    reader, writer = await connect(proxy.port)
    status, headers, body = await read_response(reader)
    assert (status, error_code(headers, body)) == (503, "server_busy")
    assert await closed(reader)
    writer.close()
    for _reader, w in busy:
        w.close()


async def test_under_a_small_open_file_limit_trickling_connections_cannot_starve_chats(tmp_path, upstream):
    proxy = start_proxy(tmp_path, upstream, nofile=200)
    held = []
    try:
        for _ in range(400):
            reader, writer = await connect(proxy.port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append((reader, writer))
        for _ in range(5):
            reader, writer = await connect(proxy.port)
            writer.write(post_head() + CHAT)
            status, _headers, body = await read_response(reader)
            assert status == 200, body
            writer.close()
    finally:
        for _r, w in held:
            w.close()
        _stop(proxy.proc)


# -- malformed HTTP --------------------------------------------------------------------------------
GET_MODELS = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
MALFORMED = {
    "too many headers": GET_MODELS + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    "a header too long": GET_MODELS + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "an unknown method": b"FROBNICATE /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "a br body": post_head("Content-Encoding: br", length=4) + b"\x0b\x02\x80x",
    "a zstd body": post_head("Content-Encoding: zstd", length=4) + b"(\xb5/\xfd",
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
async def test_malformed_http_gets_an_openai_error_and_one_log_line(proxy, what):
    await asyncio.sleep(0.2)
    proxy.new_log_lines()  # what earlier tests left
    reader, writer = await connect(proxy.port)
    writer.write(MALFORMED[what])
    await writer.drain()
    status, headers, body = await read_response(reader)
    assert 400 <= status < 500, body
    assert error_code(headers, body)
    writer.close()
    await asyncio.sleep(0.2)  # the log line is written before the answer; let the pipe catch up
    lines = proxy.new_log_lines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "ERROR" not in lines[0]
