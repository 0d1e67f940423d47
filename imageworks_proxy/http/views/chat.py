"""``POST /v1/chat/completions``, and the plumbing it shares with the other adapter routes
(``/v1/embeddings``, ``/v1/completions``): the pipeline around the adapter call, JSON or SSE out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import CHAT, COMPLETIONS, EMBEDDINGS, ChatCall
from imageworks_proxy.errors import ProxyError, invalid_request
from imageworks_proxy.http.bodies import read_body
from imageworks_proxy.http.middlewares import request_id
from imageworks_proxy.http.responses import json_response
from imageworks_proxy.http.sse import ClientGone, SSEWriter
from imageworks_proxy.pipeline.stage import ChatContext, Pipeline

log = logging.getLogger("imageworks_proxy.chat")

#: The adapter method that serves each route.
_ADAPTER_METHOD = {CHAT: "chat", EMBEDDINGS: "embeddings", COMPLETIONS: "completions"}


async def _no_wait() -> None:
    return None


async def _read(request: web.Request) -> bytes:
    try:
        return await read_body(request, keys.config(request.app).max_body_bytes)
    except ConnectionError:
        raise ClientGone() from None  # left while sending the body


def _parse(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise invalid_request("The request body is empty; send a JSON request.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await serve(request, CHAT)


async def serve(request: web.Request, endpoint: str) -> web.StreamResponse:
    """Run one request of an adapter route (:data:`~imageworks_proxy.adapters.base.CHAT`, ``EMBEDDINGS``
    or ``COMPLETIONS``): read and parse the body, the route's request stages, the adapter's method for the
    route, then the response stages on the JSON answer or on each streamed chunk; the finish stages run
    whatever happened."""
    app = request.app
    rid = request_id(request)
    pipeline = keys.pipeline(app)
    if endpoint != CHAT:
        pipeline = pipeline.for_endpoint(endpoint)
    ctx = ChatContext(request_id=rid, body={}, app=app, endpoint=endpoint)
    request[keys.CHAT_CONTEXT] = ctx
    writer: SSEWriter | None = None
    try:
        ctx.body = _parse(await _read(request))
        await pipeline.run_request(ctx)
        entry = ctx.entry
        assert entry is not None  # the resolve stage sets it or raises
        adapter = keys.models(app).adapter_for(entry)
        ctx.adapter_name = adapter.name
        ctx.body["model"] = entry.upstream_model
        if ctx.stream:
            writer = SSEWriter(request, rid, stall_s=keys.config(app).client_stall_timeout_ms / 1000)
        call = ChatCall(rid, entry, ctx.model, ctx.body, ctx.stream,
                        waiting=writer.commit_and_keep_alive if writer else _no_wait, endpoint=endpoint,
                        adapted=ctx.adapted)
        try:
            if endpoint == CHAT:
                result = await adapter.chat(call)
            else:
                result = await getattr(adapter, _ADAPTER_METHOD[endpoint])(call)
        finally:
            ctx.queue_ms = call.queue_ms
        if writer is None:
            completion = pipeline.run_response(ctx, result)  # type: ignore[arg-type]
            resp = json_response(completion, headers={"X-Request-Id": rid})
            ctx.first_byte = time.perf_counter()
            return resp
        await _stream(ctx, pipeline, writer, result)  # type: ignore[arg-type]
        return writer.response  # type: ignore[return-value]
    except ProxyError as exc:
        ctx.status, ctx.error_code = exc.status, exc.code
        if writer is not None and writer.committed:
            await _send_error(writer, exc)
            return writer.response  # type: ignore[return-value]
        raise
    except ClientGone:  # left while sending its body, or while the adapter waited (keep-alive, commit)
        ctx.status, ctx.error_code = 499, _gone(writer)
        if writer is not None and writer.response is not None:
            return writer.response
        return web.Response(status=499)  # nobody will read it; aiohttp needs a response
    except asyncio.CancelledError:
        ctx.status, ctx.error_code = 499, _gone(writer)
        raise
    except Exception:
        ctx.status, ctx.error_code = 500, "internal_error"
        if writer is not None and writer.committed:
            log.exception("unhandled error while streaming (request %s)", rid)
            await _send_error(
                writer,
                ProxyError(500, "internal_error", f"Internal error; see the proxy log for request {rid}."),
            )
            return writer.response  # type: ignore[return-value]
        raise
    finally:
        if writer is not None:
            await writer.close()
            # the first data written, on every path (chunks held back go out with [DONE] or an error)
            ctx.first_byte = writer.first_data_at
        try:
            pipeline.run_finish(ctx)
        except Exception:
            # A broken log or metrics stage must not turn an answer the client already has into an error.
            log.exception("a pipeline finish hook failed (request %s)", rid)


def _gone(writer: SSEWriter | None) -> str:
    """The request log's code for a client that went away: it left, or it stopped reading."""
    return "client_stalled" if writer is not None and writer.stalled else "client_disconnected"


async def _send_error(writer: SSEWriter, exc: ProxyError) -> None:
    try:
        await writer.send_error(exc)
        await writer.response.write_eof()  # type: ignore[union-attr]
    except (ClientGone, ConnectionError, RuntimeError):
        pass  # the client is gone


async def _abandon(chunks: AsyncIterator[dict[str, Any]]) -> None:
    """Run an adapter stream's cleanup although nothing was read from it.

    ``aclose()`` on an async generator that never started skips its ``finally`` (where adapters close the
    upstream response and release GPU leases), so step into it once and cancel it there.
    """
    step = asyncio.ensure_future(anext(chunks))
    await asyncio.sleep(0)
    step.cancel()
    await asyncio.wait((step,))
    if not step.cancelled():
        step.exception()  # retrieved: a chunk or an error nobody will see


async def _stream(
    ctx: ChatContext, pipeline: Pipeline, writer: SSEWriter, chunks: AsyncIterator[dict[str, Any]]
) -> None:
    try:
        try:
            await writer.commit()
        except ClientGone:
            await _abandon(chunks)
            raise
        writer.arm_keepalive()
        # A stream that says its next chunk is already here (ready()) gets its chunks written together:
        # one write for what one upstream read delivered, never a chunk held while waiting for the network.
        ready = getattr(chunks, "ready", None)
        async for chunk in chunks:
            for out in pipeline.run_chunk(ctx, chunk):
                writer.hold(out)
            if ready is None or not ready():
                await writer.flush()
        for out in pipeline.run_stream_end(ctx):
            writer.hold(out)
        await writer.finish()
    except ClientGone:
        # Only a failed or stalled write to the client means it left; an adapter's own ConnectionError is
        # an error the client must see in-band. Stop reading upstream at once (the finally closes the
        # iterator, which closes the upstream response and releases a GPU lease).
        ctx.status, ctx.error_code = 499, _gone(writer)
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
