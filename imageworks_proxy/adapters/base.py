"""The adapter contract every backend plugin implements."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from imageworks_proxy import keys
from imageworks_proxy.catalogue.capabilities import Capabilities, drop_fields, refused_capability
from imageworks_proxy.catalogue.registry import Entry
from imageworks_proxy.errors import ProxyError

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    from imageworks_proxy.config import Config
    from imageworks_proxy.upstream.client import UpstreamClient

#: A non-streamed answer: an OpenAI ``chat.completion`` object, or a ``text_completion`` for
#: :meth:`Adapter.completions` (missing required fields are filled in later).
Completion = dict[str, Any]
#: A streamed answer: ``chat.completion.chunk`` objects (``text_completion`` ones for text completions), in
#: order.
ChunkStream = AsyncIterator[dict[str, Any]]
#: An embeddings answer: an OpenAI ``list`` of ``embedding`` objects with ``usage``.
Embeddings = dict[str, Any]
#: In :attr:`Adapter.backends`: claims every registry backend that no other adapter claims.
ANY_BACKEND = "*"

#: :attr:`ChatCall.endpoint` values: the OpenAI route, below ``/v1``, that a request came in on.
CHAT = "chat/completions"
EMBEDDINGS = "embeddings"
COMPLETIONS = "completions"


@attrs.define
class ChatCall:
    """What an adapter gets for one request, after the request stages ran: a chat, or (``endpoint``) an
    embeddings or legacy text completion request.

    ``body`` is the OpenAI request body of that route with ``model`` already set to the upstream (served)
    name and unknown fields kept. ``waiting`` must be awaited before any wait for a model switch or a
    backend start: for streaming requests it commits the SSE response and starts keep-alive comments.
    """

    request_id: str
    entry: Entry
    model: str
    body: dict[str, Any]
    stream: bool
    waiting: Callable[[], Awaitable[None]]
    #: Milliseconds spent waiting for a model switch or start; adapters add to it.
    queue_ms: float = 0.0
    #: The route the body belongs to: :data:`CHAT`, :data:`EMBEDDINGS` or :data:`COMPLETIONS`.
    endpoint: str = CHAT
    #: Request fields the adapter dropped to get the request accepted (:meth:`Adapter.retry_refused`); the
    #: request log shows them.
    adapted: list[str] = attrs.field(factory=list)


class Adapter:
    """Base class for backend adapters.

    Subclasses set ``name`` (unique; what ``backend_config.adapter`` names) and ``backends`` (registry
    ``backend`` values claimed). One instance is built per app, after the shared HTTP client session
    exists, and lives until the app stops (:meth:`start` / :meth:`close`).
    """

    name: ClassVar[str] = ""
    #: Registry ``backend`` values this adapter serves. :data:`ANY_BACKEND` (``"*"``) claims the backends
    #: no other adapter claims: that adapter is the fallback (the built-in openai-passthrough).
    backends: ClassVar[tuple[str, ...]] = ()
    #: Shown in ``/v1/plugins``.
    description: ClassVar[str] = ""

    # -- optional capabilities: the core asks for these, never for an adapter by name -------------------
    #: Key under which :meth:`public_state` appears in ``/v1/health`` and ``/v1/metrics`` (the vLLM
    #: orchestrator uses ``"vllm"``); ``None``: the adapter has no state to show.
    state_key: ClassVar[str | None] = None
    #: Whether ``CHAT_PROXY_AUTOSTART_MAP`` commands apply to this adapter's entries. An adapter that
    #: starts its own servers (the vLLM orchestrator) says no.
    uses_autostart: ClassVar[bool] = True
    #: Whether the chat-template rule (``CHAT_PROXY_REQUIRE_TEMPLATE``) applies: the model is served by a
    #: server this adapter launches, which cannot serve chat without a template.
    requires_chat_template: ClassVar[bool] = False

    def __init__(self, app: web.Application, config: Config) -> None:
        self.app = app
        self.config = config

    @property
    def http(self) -> aiohttp.ClientSession:
        """The app's shared, pooled client session, for the control plane (health checks, listings, admin
        routes)."""
        return self.app[keys.HTTP]

    @property
    def upstream(self) -> UpstreamClient:
        """The app's data-plane client (:mod:`imageworks_proxy.upstream.client`): use it to forward the
        request itself (chat, text completions, embeddings)."""
        return self.app[keys.UPSTREAM]

    def accepts(self, entry: Entry) -> bool:
        """Whether this adapter serves ``entry`` when several claim its backend. Default: yes."""
        return True

    async def start(self) -> None:
        """Called once when the app starts. Default: nothing."""

    async def close(self) -> None:
        """Called once when the app stops; stop background tasks and processes. Default: nothing."""

    async def prepare_listing(self, entries: Sequence[Entry]) -> None:
        """Called before ``/v1/models`` is built with the entries routed to this adapter; refresh
        caches here, quickly (never load a model, never wait long for a backend)."""

    def installed(self, entry: Entry) -> bool | None:
        """Is ``entry`` installed? ``None`` means "use the default rule" (its ``download_path`` exists,
        or it has none and its upstream is external)."""
        return None

    def not_installed_reason(self, entry: Entry) -> str:
        """Why :meth:`installed` said no, for the start-up summary (one short phrase)."""
        return "not installed"

    def entry_problem(self, entry: Entry) -> str | None:
        """Why ``entry`` cannot be served as the registry describes it (a missing URL, nothing to load), or
        ``None`` when it can. Called on each registry load, on the event loop: no I/O. An entry with a
        problem is reported in the log and ``/v1/health``; ``/v1/models`` marks it ``unavailable``."""
        return None

    def model_status(self, entry: Entry) -> str | None:
        """``extensions.status`` in ``/v1/models``: ``loaded`` / ``loading`` / ``asleep`` / ``stopped`` for
        models this adapter starts itself, ``unavailable`` when its server does not answer, ``None`` when
        unknown."""
        return None

    async def check_upstreams(self, entries: Sequence[Entry]) -> dict[str, bool]:
        """Called once at start-up for the summary with the entries routed here: each server address
        these entries use, and whether it answered (a second or two at most). Default: ``{}``."""
        return {}

    async def capabilities(self, entry: Entry) -> Capabilities | None:
        """What this adapter knows about ``entry``'s model (``tools``, ``vision``, ``reasoning``,
        ``embedding``: on or off), before any request is sent. Called before every chat request and every
        ``/v1/models`` listing, so answer from a cache (refreshed now and then, never once per request) and
        never wait long. ``None``: nothing known; the registry decides, or the upstream's refusal
        (:meth:`retry_refused`). docs/registry.md lists the sources and their order."""
        return None

    def native_tool_parser(self, entry: Entry) -> bool:
        """Does the upstream serving ``entry`` turn the model's tool-call output into ``tool_calls`` itself?

        Asked once per chat reply that offered tools. ``False`` makes the proxy's JSON-tool heuristic run:
        a reply that is nothing but a JSON call naming an offered tool becomes a structured call, and a
        streamed reply that starts like JSON is held back until that is decided. Default: the registry's
        ``metadata.tool_parser`` (``"none"`` → ``False``, ``"native"`` → ``True``), else ``True`` — Ollama
        tool models, vLLM with ``--tool-call-parser``, llama-server (``--jinja``) and hosted APIs all parse
        their own calls, and those without a parser refuse tools rather than answer them as text (the
        proxy then sends them none: docs/registry.md, capabilities).
        """
        declared = entry.metadata.get("tool_parser")
        return not (isinstance(declared, str) and declared.strip().lower() == "none")

    def retry_refused(self, call: ChatCall, exc: ProxyError) -> bool:
        """Call when the upstream refused ``call``: if ``exc`` is a refusal of tools or thinking that the
        request still carries (see ``catalogue/capabilities.py``), remember it for the model, drop those
        fields from ``call.body`` and return ``True``: send the request again (an upstream may refuse one
        capability per answer; each can be dropped only once, so this ends). Otherwise ``False``."""
        capability = refused_capability(exc.status, exc.message)
        if capability is None:
            return False
        dropped = drop_fields(call.body, capability)
        if not dropped:
            return False
        keys.models(self.app).capabilities.learn(call.entry, capability, exc.message)
        call.adapted.extend(dropped)
        return True

    def public_state(self) -> dict[str, Any] | None:
        """What ``/v1/health`` shows under :attr:`state_key` (JSON-ready, no I/O, called per health
        request). Default: ``None`` (nothing to show)."""
        return None

    async def chat(self, call: ChatCall) -> Completion | ChunkStream:
        """Send the chat request upstream.

        Non-streaming: return the completion. Streaming: return an async iterator of chunks once the
        upstream has accepted the request (an error raised before that is a JSON error response; one
        raised while iterating becomes an in-band error event). Raise :class:`ProxyError` for failures.
        """
        raise ProxyError(501, "not_implemented", f"adapter {self.name!r} does not serve chat completions")

    async def embeddings(self, call: ChatCall) -> Embeddings:
        """``POST /v1/embeddings`` for ``call.entry``: return the OpenAI ``list`` of ``embedding`` objects
        (``model`` is set to the id the client asked for afterwards). Raise :class:`ProxyError` for
        failures. Default: 501, the model does not serve embeddings."""
        raise not_served(self, call)

    async def completions(self, call: ChatCall) -> Completion | ChunkStream:
        """``POST /v1/completions`` (legacy text completions) for ``call.entry``: return the
        ``text_completion`` object, or when streaming an async iterator of ``text_completion`` chunks, with
        the same rules as :meth:`chat`. Default: 501, the model does not serve text completions."""
        raise not_served(self, call)


class HeldStream:
    """A :data:`ChunkStream` that gives back what it holds (a GPU lease, a server slot) once the stream is
    over: read to the end, failed, or closed (the core always closes it).

    ``on_error`` (optional) is awaited with a :class:`ProxyError` raised while reading, before the stream
    closes (the vLLM adapter checks whether its server died). The wrapped stream's ``ready()`` is passed
    on, so its chunks still reach the client in one write when they arrived together.
    """

    __slots__ = ("_chunks", "_done", "_on_error", "_ready", "_release")

    def __init__(
        self,
        chunks: ChunkStream,
        release: Callable[[], None],
        on_error: Callable[[ProxyError], Awaitable[None]] | None = None,
    ) -> None:
        self._chunks = chunks
        self._release = release
        self._on_error = on_error
        self._ready = getattr(chunks, "ready", None)
        self._done = False

    def ready(self) -> bool:
        return self._ready is not None and self._ready()

    def __aiter__(self) -> HeldStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await anext(self._chunks)
        except ProxyError as exc:
            if self._on_error is not None:
                await self._on_error(exc)
            await self.aclose()
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._release()


def not_served(adapter: Adapter, call: ChatCall) -> ProxyError:
    """The error for a route an adapter does not implement: 501 ``not_implemented``, naming the model."""
    what = "embeddings" if call.endpoint == EMBEDDINGS else "text completions"
    return ProxyError(
        501,
        "not_implemented",
        f"Model {call.model!r} does not serve {what}: adapter {adapter.name!r} has no /v1/{call.endpoint}.",
        param="model",
    )


def default_installed(entry: Entry) -> bool:
    """The default installed rule: ``download_path`` exists; entries without one count as installed."""
    if entry.download_path:
        return os.path.exists(os.path.expanduser(entry.download_path))
    return True
