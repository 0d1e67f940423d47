"""The pipeline: stage objects run in a fixed order around the adapter call (docs/architecture.md).

A stage is a small object with plain methods, testable without HTTP. Request-side methods run in
ascending ``order`` before dispatch; response-side methods run in the same order on the completion or
on each streamed chunk. A stage runs for the routes it names in ``endpoints`` (chat only by default).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from imageworks_proxy.adapters.base import CHAT

if TYPE_CHECKING:
    from aiohttp import web

    from imageworks_proxy.catalogue.capabilities import Effective
    from imageworks_proxy.catalogue.registry import Entry
    from imageworks_proxy.config import Config


@attrs.define
class ChatContext:
    """Per-request state shared by the stages, the adapter call and the request log."""

    request_id: str
    body: dict[str, Any]
    app: web.Application
    stream: bool = False
    model: str = ""
    entry: Entry | None = None
    adapter_name: str | None = None
    started: float = attrs.field(factory=time.perf_counter)
    first_byte: float | None = None
    queue_ms: float = 0.0
    status: int = 200
    error_code: str | None = None
    images: int = 0
    truncated_messages: int = 0
    #: Inline images the vision stage downscaled, one ``{"from": [w, h], "to": [w, h], "bytes_before": n,
    #: "bytes_after": m}`` each; ``None``: none was.
    images_resized: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None
    #: The client asked for a usage chunk (``stream_options.include_usage``); adapters may ask the upstream
    #: for usage anyway (for real token counts in the request log) and the proxy drops it unless this is set.
    client_wants_usage: bool = False
    #: The model's capabilities as the proxy acts on them (set right after the model is resolved).
    capabilities: Effective | None = None
    #: Request fields dropped because the model cannot take them (``tools``, ``reasoning_effort``...).
    adapted: list[str] = attrs.field(factory=list)
    #: Per-stage scratch space, keyed by stage name (e.g. streamed tool-call assembly).
    state: dict[str, Any] = attrs.field(factory=dict)
    #: Reply text and tool calls, collected only when the request log keeps prompts.
    reply: dict[str, Any] | None = None
    #: The route (``chat/completions``, ``embeddings`` or ``completions``; adapters/base.py names them).
    endpoint: str = CHAT

    def can(self, capability: str) -> bool:
        """Whether the model takes ``capability`` (``vision``, ``tools``...) as far as the proxy knows: the
        effective capabilities where a source said (registry, the adapter — e.g. Ollama's own list —, a
        learned refusal), else whether the registry entry lists it."""
        known = self.capabilities.has(capability) if self.capabilities is not None else None
        if known is not None:
            return known
        return self.entry is not None and capability in self.entry.capabilities


class Stage:
    """Base class for pipeline stages; override only the methods you need.

    Stages are built once per app with its :class:`~imageworks_proxy.config.Config` and must keep
    per-request data in ``ctx.state`` (never on ``self``).
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0
    #: The routes whose requests this stage sees (:data:`~imageworks_proxy.adapters.base.CHAT`,
    #: ``EMBEDDINGS``, ``COMPLETIONS``). Chat only by default: a stage written for chat bodies never
    #: meets another route's.
    endpoints: ClassVar[frozenset[str]] = frozenset({CHAT})

    def __init__(self, app: web.Application, config: Config) -> None:
        self.app = app
        self.config = config

    async def request(self, ctx: ChatContext) -> None:
        """Inspect or rewrite ``ctx.body`` before dispatch; raise ``ProxyError`` to refuse the request."""

    def response(self, ctx: ChatContext, completion: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a non-streamed completion; return it (or a replacement)."""
        return completion

    def chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Rewrite one streamed chunk; return the chunks to send in its place (``[]`` drops it)."""
        return [chunk]

    def stream_end(self, ctx: ChatContext) -> list[dict[str, Any]]:
        """Called when the upstream stream ended normally; return chunks still to send."""
        return []

    def finish(self, ctx: ChatContext) -> None:
        """Called once when the request is over, whatever happened (metrics, logs)."""


class Pipeline:
    """The ordered stages of one app, as they run for one route: chat (the app's pipeline) unless built
    for another ``endpoint``; :meth:`for_endpoint` gives the others. ``stages`` lists every stage."""

    def __init__(self, stages: list[Stage], endpoint: str = CHAT) -> None:
        self.stages = sorted(stages, key=lambda s: s.order)
        self.endpoint = endpoint
        mine = [s for s in self.stages if endpoint in s.endpoints]
        self._request = [s for s in mine if type(s).request is not Stage.request]
        self._response = [s for s in mine if type(s).response is not Stage.response]
        self._chunk = [s for s in mine if type(s).chunk is not Stage.chunk]
        self._end = [s for s in mine if type(s).stream_end is not Stage.stream_end]
        self._finish = [s for s in mine if type(s).finish is not Stage.finish]
        self._routes: dict[str, Pipeline] = {endpoint: self}

    def for_endpoint(self, endpoint: str) -> Pipeline:
        """The same stages as they run for ``endpoint`` requests (built once, on first use)."""
        route = self._routes.get(endpoint)
        if route is None:
            route = self._routes[endpoint] = Pipeline(self.stages, endpoint)
        return route

    async def run_request(self, ctx: ChatContext) -> None:
        for stage in self._request:
            await stage.request(ctx)

    def run_response(self, ctx: ChatContext, completion: dict[str, Any]) -> dict[str, Any]:
        for stage in self._response:
            completion = stage.response(ctx, completion)
        return completion

    def run_chunk(self, ctx: ChatContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        chunks = [chunk]
        for stage in self._chunk:
            if len(chunks) == 1:  # the usual case: one chunk in, no list to flatten
                chunks = stage.chunk(ctx, chunks[0])
            else:
                chunks = [out for c in chunks for out in stage.chunk(ctx, c)]
        return chunks

    def run_stream_end(self, ctx: ChatContext) -> list[dict[str, Any]]:
        pending: list[dict[str, Any]] = []
        for stage in self._end:
            extra = stage.stream_end(ctx)
            # chunks a stage emits at the end still pass through the later stages' chunk hooks
            for later in self._chunk:
                if later.order > stage.order:
                    extra = [out for c in extra for out in later.chunk(ctx, c)]
            pending.extend(extra)
        return pending

    def run_finish(self, ctx: ChatContext) -> None:
        for stage in self._finish:
            stage.finish(ctx)
