"""Built-in adapter plugin: any OpenAI-compatible server (``backend: openai`` and unclaimed backends)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson

from imageworks_proxy.adapters.base import (
    ANY_BACKEND,
    COMPLETIONS,
    Adapter,
    ChatCall,
    ChunkStream,
    Completion,
    Embeddings,
)
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.upstream.body import read_capped, read_head
from imageworks_proxy.upstream.client import (
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamHeadTimeout,
    UpstreamResponse,
)
from imageworks_proxy.upstream.errors import transport_failed, unreachable, upstream_error
from imageworks_proxy.upstream.sse_stream import SSEChunkStream
from imageworks_proxy.upstream.urls import apply_loopback_alias, entry_base_url

log = logging.getLogger("imageworks_proxy.passthrough")

#: How long the start-up check waits for each upstream's ``/models``.
CHECK_TIMEOUT_S = 1.5


class OpenAIPassthroughAdapter(Adapter):
    name = "openai-passthrough"
    backends = ("openai", ANY_BACKEND)
    description = "Any OpenAI-compatible server (base_url or http://host:port/v1)"

    @functools.cached_property
    def _connect_s(self) -> float:
        """How long a new upstream connection may take: at most half a short backend budget, so a host that
        never accepts shows as unreachable (the configuration is fixed, so it is worked out once)."""
        return min(10.0, self.config.backend_timeout_ms / 2000)

    def base_url(self, entry: Entry) -> str:
        url = entry_base_url(entry, default_port=None, default_url=None, path="/v1")
        if url is None:
            raise ProxyError(
                503, "backend_unavailable",
                f"Model {entry.name!r} has no backend_config.base_url, host or port in the registry.",
                headers={"Retry-After": "30"},
            )
        return apply_loopback_alias(url, self.config.loopback_alias)

    def _sends_to_entry_urls(self) -> bool:
        """Whether chats go to the URL the entry names: this class's ``chat``, or a subclass with its own
        ``base_url``. A subclass that sends elsewhere (a plugin starting its own server) is not judged by
        the entry's URL."""
        cls, base = type(self), OpenAIPassthroughAdapter
        return cls.chat is base.chat or cls.base_url is not base.base_url

    def entry_problem(self, entry: Entry) -> str | None:
        if not self._sends_to_entry_urls():
            return None
        try:
            self.base_url(entry)
        except ProxyError:
            return (
                f"backend {entry.backend!r} is served by {self.name}, which needs backend_config.base_url "
                "(or host and port) to know where the server is"
            )
        return None

    async def check_upstreams(self, entries: Sequence[Entry]) -> dict[str, bool]:
        """Whether each upstream answers ``GET /models`` at all (any HTTP status counts)."""
        if not self._sends_to_entry_urls():
            return {}
        urls = {}
        for entry in entries:
            try:
                urls[self.base_url(entry)] = entry
            except ProxyError:
                continue

        async def answers(url: str) -> bool:
            try:
                timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S)
                async with self.http.get(url + "/models", headers=self.headers(urls[url]), timeout=timeout):
                    return True
            except (TimeoutError, aiohttp.ClientError, OSError):
                return False

        results = await asyncio.gather(*(answers(u) for u in urls))
        return dict(zip(urls, results, strict=True))

    def headers(self, entry: Entry) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        env = entry.backend_config.api_key_env
        if env:
            key = os.environ.get(env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            else:
                log.warning(
                    "model %s: api_key_env %s is not set; calling upstream without a key", entry.name, env
                )
        return headers

    async def chat(self, call: ChatCall) -> Completion | ChunkStream:
        return await self.forward(call, self.base_url(call.entry))

    # The OpenAI-compatible family serves the other routes the way it serves chat, to the upstream's path
    # for call.endpoint: a subclass whose chat() takes a GPU lease or starts a server (vLLM, llama.cpp)
    # does the same for embeddings and text completions without overriding them.
    async def embeddings(self, call: ChatCall) -> Embeddings:
        return await self.chat(call)  # type: ignore[return-value]

    async def completions(self, call: ChatCall) -> Completion | ChunkStream:
        return await self.chat(call)

    async def on_unreachable(self, call: ChatCall) -> bool:
        """The upstream refused the connection: return True after starting it (autostart) to retry once."""
        from imageworks_proxy.upstream.autostart import ensure_started

        return await ensure_started(self.app, call.entry, call)

    def where(self, call: ChatCall) -> str:
        return f"Backend for {call.entry.name!r}"

    async def forward(
        self, call: ChatCall, base_url: str, headers: dict[str, str] | None = None
    ) -> Completion | ChunkStream:
        """POST the request to ``{base_url}/{call.endpoint}`` (``chat/completions``, ``embeddings``,
        ``completions``) and return the answer or the chunk stream.

        An upstream that refuses the request's tools or thinking (vLLM without a tool parser) gets it again
        without them (:meth:`~imageworks_proxy.adapters.base.Adapter.retry_refused`; once per capability)."""
        while True:
            try:
                return await self._post(call, base_url, headers)
            except ProxyError as exc:
                if not self.retry_refused(call, exc):
                    raise

    async def _post(
        self, call: ChatCall, base_url: str, headers: dict[str, str] | None
    ) -> Completion | ChunkStream:
        cfg = self.config
        url = base_url.rstrip("/") + "/" + call.endpoint
        hdrs = headers if headers is not None else self.headers(call.entry)
        data = orjson.dumps(call.body)
        # For streams the idle timeout bounds upstream silence from the start (the wait for the head too).
        head_s = cfg.stream_idle_timeout_ms / 1000 if call.stream else None
        where = self.where(call)
        for attempt in (0, 1):
            try:
                # The backend timeout bounds the wait for the answer, and for its body unless it streams.
                resp = await self.upstream.post(
                    url, data, hdrs, connect_timeout=self._connect_s, head_timeout=head_s,
                    timeout=cfg.backend_timeout_ms / 1000,
                )
                try:
                    if resp.status >= 400:
                        raise upstream_error(resp.status, await read_head(resp), where)
                    sse = call.stream and "text/event-stream" in resp.content_type
                    if sse:
                        resp.content.stop_timeout()  # from here the stream's idle deadline applies
                    else:  # a completion, or a JSON answer to a streaming request
                        raw = await read_capped(resp, cfg.max_upstream_body_bytes, where)
                except BaseException:
                    resp.close()
                    raise
                break
            except UpstreamConnectError as exc:
                if attempt == 0 and await self.on_unreachable(call):
                    continue
                raise unreachable(where, call.request_id, f"{base_url}: {exc}") from None
            except (UpstreamBroken, TimeoutError) as exc:
                raise self._transport_error(exc, call) from None
        if sse:
            return self._events(resp, where, usage_asked=_asks_usage(call.body))
        resp.release()
        completion = self._completion(raw, where)
        if not call.stream:
            return completion
        return self._replay_text(completion) if call.endpoint == COMPLETIONS else self._replay(completion)

    def _transport_error(self, exc: BaseException, call: ChatCall) -> ProxyError:
        """The client's error for a failure before the upstream answered (its address only in the log)."""
        cfg, where = self.config, self.where(call)
        if isinstance(exc, UpstreamHeadTimeout):  # streams only: the idle timeout from the start
            return ProxyError(
                504,
                "backend_timeout",
                f"{where} sent nothing for {cfg.stream_idle_timeout_ms} ms "
                "(CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS).",
            )
        if isinstance(exc, TimeoutError):
            return ProxyError(
                504,
                "backend_timeout",
                f"{where} did not answer within {cfg.backend_timeout_ms} ms (CHAT_PROXY_BACKEND_TIMEOUT_MS).",
            )
        return transport_failed(where, call.request_id, exc)

    def _completion(self, raw: bytes, where: str) -> dict[str, Any]:
        try:
            completion = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProxyError(502, "backend_error", f"{where} sent a reply that is not JSON.") from None
        if not isinstance(completion, dict):
            raise ProxyError(502, "backend_error", f"{where} sent a reply that is not a completion object.")
        if (
            "choices" not in completion
            and "data" not in completion  # an embeddings answer
            and (completion.get("error") or completion.get("object") == "error")
        ):
            # an error answered with HTTP 200 (some servers and gateways do): still an error for the client
            code = completion.get("code")
            if isinstance(completion.get("error"), dict):
                code = completion["error"].get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 502
            raise upstream_error(status, raw, where)
        return self.adjust_completion(completion)

    def adjust_completion(self, completion: dict[str, Any]) -> dict[str, Any]:
        """Per-backend fix-ups of a non-streamed completion (vLLM overrides)."""
        return completion

    def adjust_chunk(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """Per-backend fix-ups of a streamed chunk (vLLM overrides)."""
        return chunk

    def _events(self, resp: UpstreamResponse, where: str, usage_asked: bool = False) -> SSEChunkStream:
        """The upstream's chunks (:class:`~imageworks_proxy.upstream.sse_stream.SSEChunkStream`)."""
        adjust = (
            self.adjust_chunk
            if type(self).adjust_chunk is not OpenAIPassthroughAdapter.adjust_chunk
            else None
        )
        return SSEChunkStream(
            resp, where, self.config.stream_idle_timeout_ms, usage_asked=usage_asked, adjust=adjust
        )

    async def _replay_text(self, completion: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A text completion answered as JSON to a streaming request: a streamed text completion's chunks
        have the same shape, so the answer is its own (single) chunk."""
        yield completion

    async def _replay(self, completion: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """An upstream that answered a streaming request with plain JSON: replay it as chunks (the chunks'
        fields are checked like any upstream chunk's; the structure around them here)."""
        base = {k: completion.get(k) for k in ("id", "created", "model") if completion.get(k) is not None}
        choices = completion.get("choices") or ()
        if not isinstance(choices, list) or not all(
            isinstance(c, dict) and isinstance(c.get("message") or {}, dict) for c in choices
        ):
            raise ProxyError(502, "backend_error", "The backend sent a completion of the wrong shape.")
        for i, choice in enumerate(choices):
            msg = dict(choice.get("message") or {})
            msg.pop("refusal", None) if msg.get("refusal") is None else None
            yield {
                **base,
                "choices": [{"index": choice.get("index", i), "delta": msg, "finish_reason": None}],
            }
            yield {
                **base,
                "choices": [
                    {
                        "index": choice.get("index", i),
                        "delta": {},
                        "finish_reason": choice.get("finish_reason") or "stop",
                    }
                ],
            }
        if completion.get("usage"):
            yield {**base, "choices": [], "usage": completion["usage"]}


def _asks_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


@hookimpl
def register_backends(register):
    register(OpenAIPassthroughAdapter)
