"""The idle deadline on streamed upstream bodies: a read still waiting at the deadline fails, data moves
the deadline on, data already buffered is returned even late."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from aiohttp import StreamReader

from imageworks_proxy.upstream.idle import IdleDeadline


def body() -> StreamReader:
    return StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())


async def read(content: StreamReader, idle: IdleDeadline) -> bytes:
    idle.arm()
    data = await content.readany()
    idle.waiting = False
    return data


async def test_a_read_still_waiting_at_the_deadline_fails():
    content = body()
    idle = IdleDeadline(content, 0.05)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await read(content, idle)
    assert asyncio.get_running_loop().time() - started >= 0.045
    idle.cancel()


async def test_data_that_keeps_coming_moves_the_deadline_on():
    content = body()
    idle = IdleDeadline(content, 0.1)
    loop = asyncio.get_running_loop()
    for i in range(6):  # 0.3 s in all, never 0.1 s without data
        loop.call_later(0.04, content.feed_data, b"x%d" % i)
        assert await read(content, idle) == b"x%d" % i
        idle.restart()
    idle.cancel()


async def test_data_buffered_before_a_late_read_is_still_returned():
    content = body()
    idle = IdleDeadline(content, 0.05)
    content.feed_data(b"early")
    await asyncio.sleep(0.08)  # the consumer was busy past the deadline
    assert await read(content, idle) == b"early"
    with pytest.raises(TimeoutError):  # but the next read has nothing to wait for in time
        await read(content, idle)
    idle.cancel()
