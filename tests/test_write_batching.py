"""Writes held to the end of the loop's tick (wire/writes.py), seen from the socket's other end."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from aiohttp import web

from imageworks_proxy.wire.writes import MAX_HELD, BatchedTransport, WriteBatch


async def _pair(batch: WriteBatch) -> tuple[BatchedTransport, socket.socket]:
    """A batched transport on one end of a socket pair, and the other end (non-blocking)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=ours)
    return BatchedTransport(transport, batch), theirs  # type: ignore[arg-type]


def _received(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not data:
            return out + b"<eof>"
        out += data


async def test_the_first_writer_of_a_quiet_tick_writes_at_once_and_the_rest_at_its_end_in_order():
    batch = WriteBatch(asyncio.get_running_loop())
    (one, peer1), (two, peer2) = await _pair(batch), await _pair(batch)
    one.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert _received(peer1) == b"HTTP/1.1 200 OK\r\n\r\n"  # the tick's first write: at once
    two.write(bytearray(b"GET / HTTP/1.1\r\n"))
    two.writelines([b"Host: x\r\n", memoryview(b"\r\n")])
    one.write(b"data: first chunk\n\n")
    assert _received(peer1) == b"data: first chunk\n\n"  # the first writer's next write, as its head
    assert _received(peer2) == b""  # held: the other peer has nothing yet
    assert two.get_write_buffer_size() == len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0)  # the tick ends
    assert _received(peer2) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    one.close(), two.close(), peer1.close(), peer2.close()


async def test_while_ticks_have_several_writers_every_write_is_held():
    batch = WriteBatch(asyncio.get_running_loop())
    (one, peer1), (two, peer2) = await _pair(batch), await _pair(batch)
    one.write(b"a"), two.write(b"b")
    await asyncio.sleep(0)  # a tick with two writers: the loop is busy
    assert (_received(peer1), _received(peer2)) == (b"a", b"b")
    two.write(b"busy")
    assert _received(peer2) == b""  # even the tick's first write waits, to leave with the others
    await asyncio.sleep(0)  # a tick with one writer: quiet again
    assert _received(peer2) == b"busy"
    one.write(b"quiet")
    assert _received(peer1) == b"quiet"
    one.close(), two.close(), peer1.close(), peer2.close()


async def test_a_large_write_leaves_at_once():
    batch = WriteBatch(asyncio.get_running_loop())
    (opener, peer0), (transport, peer) = await _pair(batch), await _pair(batch)
    opener.write(b"the tick's first write")
    transport.write(b"a" * 10)
    transport.write(b"b" * MAX_HELD)
    await asyncio.sleep(0.05)  # the loop writes what the socket takes; read before the held flush could run
    got = b""
    for _ in range(100):
        got += _received(peer)
        if len(got) >= MAX_HELD + 10:
            break
        await asyncio.sleep(0.01)
    assert got == b"a" * 10 + b"b" * MAX_HELD
    for sock in (opener, transport, peer0, peer):
        sock.close()


async def test_close_writes_what_is_held_first_and_abort_drops_it():
    batch = WriteBatch(asyncio.get_running_loop())
    (opener, peer0), (closed, peer1) = await _pair(batch), await _pair(batch)
    aborted, peer2 = await _pair(batch)
    opener.write(b"the tick's first write")
    closed.write(b"last words")
    closed.close()
    aborted.write(b"never sent")
    aborted.abort()
    await asyncio.sleep(0.05)
    assert _received(peer1) == b"last words<eof>"
    assert b"never sent" not in _received(peer2)
    aborted.write(b"after the end")  # dropped quietly, like a write to a closed transport
    await asyncio.sleep(0)
    assert aborted.is_closing()
    for sock in (opener, peer0, peer1, peer2):
        sock.close()


async def test_the_command_line_server_still_sends_files(tmp_path, make_config):
    """asyncio's loop.sendfile() cannot take a batched transport; aiohttp then writes the file itself."""
    from imageworks_proxy.http.server import make_runner
    from imageworks_proxy.testing import free_port

    page = tmp_path / "page.txt"
    page.write_bytes(b"x" * 100_000)

    async def send_page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(page)

    app = web.Application()
    app.router.add_get("/page", send_page)
    config = make_config()
    runner = make_runner(app, config)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/page") as resp:
            assert resp.status == 200
            assert await resp.read() == b"x" * 100_000
    finally:
        await runner.cleanup()
