"""The data-plane HTTP/1.1 client (imageworks_proxy/upstream/client.py) against scripted raw servers.

Each server here reads whole requests off its sockets and answers with the exact bytes a test gives it,
so the framings, the failures and the connection reuse a real upstream can produce are all reachable.
The proxy-level behaviour on top (errors in the OpenAI shape, idle timeouts, autostart) is tested with
the fake servers elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Callable

import pytest

from imageworks_proxy.upstream.client import (
    UpstreamBroken,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamHeadTimeout,
)
from imageworks_proxy.upstream.wire import BUFFER_LIMIT

JSON = {"Content-Type": "application/json"}


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n" + trailer + b"\r\n"


class Scripted:
    """A raw HTTP server: ``reply(n, request)`` gives the bytes for the n-th request (None: close
    without answering); ``split`` sends them a few bytes per write; after the requests in ``closing``
    the server closes the connection."""

    def __init__(
        self,
        reply: Callable[[int, bytes], bytes | None],
        split: int = 0,
        closing: frozenset[int] = frozenset(),
    ) -> None:
        self.reply = reply
        self.split = split
        self.closing = closing
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                data = self.reply(len(self.requests) - 1, request)
                if data is None:
                    break
                step = self.split or len(data) or 1
                for i in range(0, len(data), step):
                    writer.write(data[i : i + step])
                    await writer.drain()
                    if self.split:
                        await asyncio.sleep(0)
                if len(self.requests) - 1 in self.closing:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def raw_server(handle) -> AsyncIterator[str]:
    """A server running ``handle(reader, writer)`` per connection; yields its URL. The writers the
    handlers leave open are closed at the end."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader, writer):
        writers.append(writer)
        await handle(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x"
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client():
    c = UpstreamClient()
    yield c
    await c.close()


async def post(client: UpstreamClient, url: str, **kw) -> tuple[int, dict[str, str], bytes]:
    resp = await client.post(url, b'{"a":1}', JSON, connect_timeout=2, **kw)
    async with resp:
        return resp.status, resp.headers, await resp.read()


async def test_sends_the_body_and_reuses_the_connection(client):
    server = Scripted(lambda n, req: answer(b'{"n":%d}' % n, "Content-Type: application/json"))
    async with server as url:
        assert await post(client, url) == (
            200,
            {"content-type": "application/json", "content-length": "7"},
            b'{"n":0}',
        )
        assert (await post(client, url))[2] == b'{"n":1}'
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Type: application/json\r\n" in first
    assert b"\r\nContent-Length: 7\r\n\r\n" in first and first.endswith(b'{"a":1}')


@pytest.mark.parametrize("split", [0, 1, 3])
async def test_chunked_bodies_with_extensions_and_trailers_in_any_pieces(client, split):
    data = chunked(b"data: one\n\n", b"data: two\n\n", trailer=b"X-Trailer: 1\r\n")
    server = Scripted(lambda n, req: data, split=split)
    async with server as url:
        assert (await post(client, url))[2] == b"data: one\n\ndata: two\n\n"
        assert (await post(client, url))[2] == b"data: one\n\ndata: two\n\n"
    assert server.connections == 1  # the chunked answer ended where it said, so the connection was kept


async def test_a_body_that_ends_at_close_and_an_interim_100_continue(client):
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    server = Scripted(lambda n, req: data if n == 0 else answer(b"again"), closing=frozenset({0}))
    async with server as url:
        assert await post(client, url) == (200, {"content-type": "text/plain"}, b"all of it")
        assert (await post(client, url))[2] == b"again"
    assert server.connections == 2  # an answer that ends at close cannot share its connection


async def test_gzip_and_deflate_bodies_are_decoded_and_a_cut_one_is_an_error(client):
    bodies = [
        answer(gzip.compress(b"zipped"), "Content-Encoding: gzip"),
        answer(zlib.compress(b"deflated"), "Content-Encoding: deflate"),
        answer(gzip.compress(b"cut short" * 100)[:-12], "Content-Encoding: gzip"),
    ]
    async with Scripted(lambda n, req: bodies[n]) as url:
        assert (await post(client, url))[2] == b"zipped"
        assert (await post(client, url))[2] == b"deflated"
        with pytest.raises(UpstreamBroken, match="cut short"):
            await post(client, url)


async def test_an_idle_connection_the_server_closed_is_replaced_without_failing_the_request(client):
    server = Scripted(lambda n, req: answer(b"ok") if n != 1 else None)
    async with server as url:
        assert (await post(client, url))[2] == b"ok"
        # the server takes the next request on the kept connection and closes it unanswered, as a server
        # whose keep-alive ran out at that moment does; the client sends it again on a new connection
        assert (await post(client, url))[2] == b"ok"
    assert server.connections == 2
    assert len(server.requests) == 3


async def test_a_fresh_connection_closed_unanswered_is_an_error(client):
    async with Scripted(lambda n, req: None) as url:
        with pytest.raises(UpstreamBroken, match="before answering"):
            await post(client, url)


async def test_a_connection_cut_mid_body_fails_the_read(client):
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    server = Scripted(lambda n, req: data, closing=frozenset({0}))
    async with server as url:
        resp = await client.post(url, b"{}", JSON, connect_timeout=2)
        assert resp.status == 200 and resp.content_length == 100
        with pytest.raises(UpstreamBroken, match="mid-answer"):
            await resp.read()


@pytest.mark.parametrize(
    "data",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx",
    ],
    ids=["not-http", "bad-chunk-size", "bad-length", "bad-header", "unknown-encoding"],
)
async def test_an_answer_that_breaks_http_is_an_error_not_a_hang(client, data):
    async with Scripted(lambda n, req: data) as url:
        with pytest.raises(UpstreamBroken, match="broke HTTP"):
            await asyncio.wait_for(post(client, url), 5)


async def test_a_head_over_the_limit_is_refused(client):
    data = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    async with Scripted(lambda n, req: data) as url:
        with pytest.raises(UpstreamBroken, match="headers over"):
            await asyncio.wait_for(post(client, url), 5)


async def test_nothing_listening_is_a_connect_error(client):
    async with Scripted(lambda n, req: None) as url:
        pass  # the port is free again
    with pytest.raises(UpstreamConnectError):
        await post(client, url)


async def test_no_head_in_time_is_a_head_timeout_and_the_connection_is_closed(client):
    release = asyncio.Event()

    async def silent(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # returns when the client closes
        release.set()
        writer.close()

    async with raw_server(silent) as url:
        with pytest.raises(UpstreamHeadTimeout):
            await client.post(url, b"{}", JSON, connect_timeout=2, head_timeout=0.1)
        await asyncio.wait_for(release.wait(), 5)


async def test_a_reader_that_falls_behind_pauses_the_upstream(client):
    size = 4 * BUFFER_LIMIT
    held: list[asyncio.StreamWriter] = []

    async def big(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        held.append(writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)

    async with raw_server(big) as url:
        resp = await client.post(url, b"{}", JSON, connect_timeout=2)
        await asyncio.sleep(0.3)
        # the client stopped reading at its buffer limit, so most of the body still waits at the server
        assert held[0].transport.get_write_buffer_size() > BUFFER_LIMIT
        assert len(await resp.read()) == size
        resp.release()


async def test_closing_an_unread_answer_and_closing_the_client_close_the_connections(client):
    server = Scripted(lambda n, req: chunked(b"first")[:-5])  # the answer never ends
    async with server as url:
        for closes in (1, 2):
            resp = await client.post(url, b"{}", JSON, connect_timeout=2)
            assert await resp.content.readany() == b"first"
            if closes == 1:
                resp.close()
            else:
                await client.close()
            for _ in range(100):  # the server sees the connection end
                if server.closed_by_client == closes:
                    break
                await asyncio.sleep(0.02)
            assert server.closed_by_client == closes
        assert server.connections == 2


async def test_cancelling_the_wait_closes_the_connection(client):
    seen = asyncio.Event()
    gone = asyncio.Event()

    async def slow(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        seen.set()
        await reader.read()
        gone.set()
        writer.close()

    async with raw_server(slow) as url:
        task = asyncio.ensure_future(client.post(url, b"{}", JSON, connect_timeout=2))
        await asyncio.wait_for(seen.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(gone.wait(), 5)


async def test_a_header_value_with_a_line_break_is_refused_before_sending(client):
    with pytest.raises(ValueError, match="line break"):
        await client.post(
            "http://127.0.0.1:9/x", b"{}", {"Authorization": "Bearer a\r\nX: y"}, connect_timeout=1
        )


async def test_the_exchange_timeout_covers_head_and_body_and_can_be_lifted(client):
    rest: list[asyncio.StreamWriter] = []

    async def half_body(reader, writer):  # half the body now, the rest when the test says
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf ")
        rest.append(writer)

    async with raw_server(half_body) as url:
        resp = await client.post(url, b"{}", JSON, connect_timeout=2, timeout=0.2)
        with pytest.raises(TimeoutError):  # the body did not complete within the exchange's time
            await resp.read()
        resp = await client.post(url, b"{}", JSON, connect_timeout=2, timeout=0.2)
        resp.content.stop_timeout()
        await asyncio.sleep(0.3)
        rest[-1].write(b"done!")
        assert await asyncio.wait_for(resp.read(), 5) == b"half done!"
        resp.release()


async def test_no_answer_within_the_exchange_timeout_is_a_plain_timeout(client):
    async def silent(reader, writer):
        await reader.read()
        writer.close()

    async with raw_server(silent) as url:
        with pytest.raises(TimeoutError) as caught:
            await client.post(url, b"{}", JSON, connect_timeout=2, timeout=0.1, head_timeout=5)
        assert not isinstance(caught.value, UpstreamHeadTimeout)


async def test_a_login_in_the_url_is_sent_as_basic_authentication_unless_the_caller_sends_one(client):
    server = Scripted(lambda n, req: answer(b"ok"))
    async with server as url:
        login_url = url.replace("http://", "http://user:s%40cret@")
        await client.post(login_url, b"{}", JSON, connect_timeout=2)
        await client.post(login_url, b"{}", {**JSON, "Authorization": "Bearer sk-own"}, connect_timeout=2)
    expected = base64.b64encode(b"user:s@cret")
    assert b"\r\nAuthorization: Basic " + expected + b"\r\n" in server.requests[0]
    assert b"Basic" not in server.requests[1]
    assert b"\r\nAuthorization: Bearer sk-own\r\n" in server.requests[1]


async def test_an_upper_case_https_url_is_spoken_to_in_tls(client):
    first: list[bytes] = []

    async def plain(reader, writer):
        first.append(await reader.read(5))
        writer.close()

    async with raw_server(plain) as url:
        with pytest.raises(UpstreamConnectError):  # a plain server cannot finish the handshake
            await client.post(url.replace("http://", "HTTPS://"), b'{"secret":1}', JSON, connect_timeout=2)
    assert first and first[0][:1] == b"\x16"  # a TLS handshake record, never the request in clear


async def test_a_kept_connection_closed_after_the_upstream_took_the_request_is_not_sent_again(client):
    requests: list[bytes] = []

    async def crashes_on_the_second(reader, writer):
        while True:
            try:
                requests.append(await reader.readuntil(b"\r\n\r\n") + await reader.readexactly(2))
            except asyncio.IncompleteReadError:
                break
            if len(requests) == 1:
                writer.write(answer(b"ok"))
            else:  # works on it a while, then goes away without an answer (a crash, a gateway timeout)
                await asyncio.sleep(0.4)
                break
        writer.close()

    async with raw_server(crashes_on_the_second) as url:
        assert (await post(client, url))[2] == b"ok"
        with pytest.raises(UpstreamBroken, match="before answering"):
            await post(client, url)
    assert len(requests) == 2  # the second request reached the upstream once


async def test_a_connection_reset_is_not_the_end_of_a_body_that_ends_at_close(client):
    async def reset(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"choices":[{"mess')
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with raw_server(reset) as url:
        resp = await client.post(url, b"{}", JSON, connect_timeout=2)
        with pytest.raises(UpstreamBroken, match="mid-answer"):
            await resp.read()


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["204", "empty-200"],
)
async def test_an_empty_body_marked_compressed_is_just_empty(client, data):
    async with Scripted(lambda n, req: data) as url:
        assert (await post(client, url))[2] == b""


async def test_a_body_left_after_the_last_event_is_dropped_and_the_connection_kept(client):
    async def events(reader, writer):
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\ne\r\ndata: [DONE]\n\n\r\n")
            await asyncio.sleep(0.05)
            writer.write(b"6\r\n: tail\r\n0\r\n\r\n")  # more bytes, then the end, after the client stopped
        writer.close()

    connections = []

    async def counted(reader, writer):
        connections.append(writer)
        await events(reader, writer)

    async with raw_server(counted) as url:
        for _ in range(2):
            resp = await client.post(url, b"{}", JSON, connect_timeout=2)
            assert await resp.content.readany() == b"data: [DONE]\n\n"
            resp.finish_quietly()
            await asyncio.sleep(0.15)
    assert len(connections) == 1


async def test_a_body_that_does_not_end_soon_after_the_last_event_closes_its_connection(client):
    gone = asyncio.Event()

    async def never_ends(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\ne\r\ndata: [DONE]\n\n\r\n")
        await reader.read()  # until the client closes
        gone.set()
        writer.close()

    async with raw_server(never_ends) as url:
        resp = await client.post(url, b"{}", JSON, connect_timeout=2)
        assert await resp.content.readany() == b"data: [DONE]\n\n"
        resp.content.finish_quietly(0.1)
        await asyncio.wait_for(gone.wait(), 5)
