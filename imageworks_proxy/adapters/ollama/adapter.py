"""Built-in adapter plugin: Ollama through its native API: ``/api/chat`` for chat, ``/api/embed`` for
embeddings, ``/api/generate`` for text completions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import aiohttp
import attrs
import orjson

from imageworks_proxy import keys
from imageworks_proxy.adapters.base import (
    Adapter,
    ChatCall,
    ChunkStream,
    Completion,
    Embeddings,
)
from imageworks_proxy.adapters.ollama.embed import embeddings_from_ollama, to_embed_request
from imageworks_proxy.adapters.ollama.generate import (
    GenerateTranslator,
    completion_from_generate,
    to_generate_request,
)
from imageworks_proxy.adapters.ollama.images import fetch_images_base64, png_where_needed
from imageworks_proxy.adapters.ollama.request import (
    image_urls,
    keep_alive_value,
    parse_num_ctx,
    to_ollama_request,
)
from imageworks_proxy.adapters.ollama.response import ChunkTranslator, completion_from_ollama
from imageworks_proxy.adapters.ollama.stream import LineTranslator, OllamaChunkStream
from imageworks_proxy.adapters.ollama.tags import TagCache, tag_key
from imageworks_proxy.catalogue.capabilities import Capabilities
from imageworks_proxy.catalogue.registry import Entry, Registry
from imageworks_proxy.errors import ProxyError
from imageworks_proxy.gpu.scheduler import GpuScheduler
from imageworks_proxy.gpu.tenancy import Lease, NoLease, Tenant, tenancy
from imageworks_proxy.hookspecs import hookimpl
from imageworks_proxy.upstream.autostart import ensure_started
from imageworks_proxy.upstream.body import read_capped, read_head
from imageworks_proxy.upstream.client import UpstreamBroken, UpstreamConnectError, UpstreamResponse
from imageworks_proxy.upstream.errors import json_error_message, no_api_error, transport_failed, unreachable
from imageworks_proxy.upstream.urls import apply_loopback_alias, entry_base_url

log = logging.getLogger("imageworks_proxy.ollama")

#: Connecting to Ollama never waits longer than this (a refused or black-holed host is "unavailable").
CONNECT_TIMEOUT_S = 10.0
PS_TIMEOUT_S = 2.0
#: A stream whose first line takes longer than this (Ollama loading the model) is committed and kept alive.
STREAM_COMMIT_AFTER_S = 2.0
UNLOAD_POLL_S = 0.2
_JSON = {"Content-Type": "application/json"}
_START_HINT = "is `ollama serve` running?"
#: The ``hint`` of that 503: its models stay listed (unavailable) while Ollama is down (docs/ollama.md).
_START_ADVICE = (
    "Start Ollama (`ollama serve`), or point the entry's backend_config.host/port or "
    "CHAT_PROXY_OLLAMA_BASE_URL at where it runs."
)


@attrs.frozen
class _Exchange:
    """One call to Ollama's native API and the way back: ``reply`` turns the whole JSON answer into the
    OpenAI object; ``lines`` makes the line translator of a streamed answer."""

    path: str
    payload: dict[str, Any]
    reply: Callable[[dict[str, Any]], dict[str, Any]]
    lines: Callable[[], LineTranslator] | None = None
    #: Builds ``payload`` again from the request body (chat: after a refused capability was dropped).
    rebuild: Callable[[], dict[str, Any]] | None = None


class OllamaAdapter(Adapter):
    name = "ollama"
    backends = ("ollama",)
    state_key = "ollama"
    description = "Ollama via its native API (/api/chat, /api/embed, /api/generate), translated both ways"

    def __init__(self, app, config) -> None:
        super().__init__(app, config)
        self.tags = TagCache(lambda: self.http)
        self.tenant = Tenant(
            "ollama", "Ollama", start=None, stop=self.free_gpu, idle_unload_s=config.ollama_idle_unload_s
        )
        self._backend_s = config.backend_timeout_ms / 1000
        self._idle_s = config.stream_idle_timeout_ms / 1000
        self._connect_s = min(CONNECT_TIMEOUT_S, self._backend_s)
        self._keep_alive = keep_alive_value(config.ollama_keep_alive)
        self.stream_commit_after_s = STREAM_COMMIT_AFTER_S

    def base_url(self, entry: Entry) -> str:
        url = entry_base_url(entry, default_port=11434, default_url=self.config.ollama_base_url)
        return apply_loopback_alias(url or self.config.ollama_base_url, self.config.loopback_alias)

    async def start(self) -> None:
        if self.config.gpu_exclusive:
            # Ollama may hold GPU memory from before this proxy started: it must unload before another
            # tenant (a vLLM start) takes the GPU.
            tenancy(self.app).add_resident(self.tenant)
        elif self.config.ollama_idle_unload_s:
            log.warning(
                "CHAT_PROXY_OLLAMA_IDLE_UNLOAD_S does nothing with CHAT_PROXY_GPU_EXCLUSIVE=0 (Ollama is not "
                "a GPU tenant then); CHAT_PROXY_OLLAMA_KEEP_ALIVE lets Ollama unload idle models itself"
            )
        keys.models(self.app).store.on_change.append(self._registry_changed)

    def _registry_changed(self, registry: Registry) -> None:
        self.tags.forget_shown()

    def public_state(self) -> dict[str, Any] | None:
        """``/v1/health``'s ``ollama``: whether Ollama is a GPU tenant (``gpu_tenant``) and holds the GPU
        now (``holds_gpu``), its requests in flight and the idle unload (``idle_unload_in_s``: seconds until
        the proxy asks Ollama to unload, ``None`` when no unload is pending). ``None`` when the registry
        routes no model here, or the app runs another tenancy implementation than the built-in scheduler."""
        sched = self.app.get(keys.TENANCY)
        if not keys.models(self.app).entries_for(self) or not isinstance(sched, GpuScheduler):
            return None
        holds = sched.active is not None and sched.active.key == self.tenant.key
        return {
            "gpu_tenant": self.config.gpu_exclusive,
            "holds_gpu": holds,
            "inflight": sched.inflight if holds else 0,
            "idle_unload_s": self.tenant.idle_unload_s or None,
            "idle_unload_in_s": sched.idle.remaining_s(self.tenant.key),
        }

    async def free_gpu(self) -> None:
        """The tenant's ``stop``: unload Ollama's models, if the registry routes any model here (otherwise
        the proxy never talks to Ollama)."""
        if keys.models(self.app).entries_for(self):
            await self.unload_all()

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            keys.models(self.app).store.on_change.remove(self._registry_changed)
        await self.tags.close()

    # -- catalogue -----------------------------------------------------------------------------
    async def prepare_listing(self, entries: Sequence[Entry]) -> None:
        await self.tags.prepare(self.base_url(e) for e in entries)
        for entry in entries:
            if entry.ollama_tag:
                self.tags.start_show(self.base_url(entry), entry.ollama_tag)

    def installed(self, entry: Entry) -> bool | None:
        tags = self.tags.known(self.base_url(entry))
        if tags is None:
            # Ollama down (or not asked yet): whether the tag is pulled is unknown, and an importer-written
            # download_path ("ollama:/<tag>") is no file; keep it listed, its status says unavailable.
            return True
        tag = entry.ollama_tag
        return bool(tag) and tag_key(tag) in tags

    async def capabilities(self, entry: Entry) -> Capabilities | None:
        """What Ollama reports for the entry's tag (``/api/tags``, else ``/api/show``; cached)."""
        tag = entry.ollama_tag
        return await self.tags.capabilities(self.base_url(entry), tag) if tag else None

    def not_installed_reason(self, entry: Entry) -> str:
        tag = entry.ollama_tag or entry.name
        return f"not installed: Ollama at {self.base_url(entry)} has no {tag!r} (ollama pull {tag})"

    def model_status(self, entry: Entry) -> str | None:
        base = self.base_url(entry)
        if self.tags.down(base):
            return "unavailable"
        return "available" if self.tags.known(base) is not None else None

    async def check_upstreams(self, entries: Sequence[Entry]) -> dict[str, bool]:
        bases = sorted({self.base_url(e) for e in entries})
        await asyncio.gather(*(self.tags.fetch(b) for b in bases))
        return {b: not self.tags.down(b) for b in bases}

    # -- the three routes ----------------------------------------------------------------------
    def _tag(self, call: ChatCall) -> str:
        return str(call.body.get("model") or call.entry.ollama_tag or call.entry.name)

    async def chat(self, call: ChatCall) -> Completion | ChunkStream:
        """Translate the OpenAI request to ``/api/chat``, send it and translate the answer back.

        With ``CHAT_PROXY_GPU_EXCLUSIVE=1`` the request holds a GPU tenancy lease for the Ollama tenant
        until the response (stream included) is over.
        """
        entry = call.entry
        # Images are fetched and the request translated before taking the GPU, so bad input fails fast.
        fetched = await fetch_images_base64(
            image_urls(call.body), max_bytes=self.config.max_image_bytes, timeout_s=self._backend_s,
            allow=self.config.image_fetch_allow,
        )
        fetched.update(await png_where_needed(call.body, fetched))  # Ollama reads PNG and JPEG only

        def payload() -> dict[str, Any]:
            return to_ollama_request(
                call.body,
                model=self._tag(call),
                stream=call.stream,
                num_ctx=parse_num_ctx(entry.backend_config.extra_args),
                keep_alive=self._keep_alive,
                fetched=fetched,
            )

        return await self._exchange(call, _Exchange(
            "/api/chat",
            payload(),
            reply=lambda data: completion_from_ollama(data, model=call.model),
            # Always translate Ollama's eval counts into a usage chunk: the request log gets real token
            # counts, and the conformance stage passes the chunk on only when the client asked for it.
            lines=lambda: ChunkTranslator(model=call.model, include_usage=True),
            rebuild=payload,
        ))

    async def embeddings(self, call: ChatCall) -> Embeddings:
        """``/v1/embeddings`` through ``/api/embed``; a lease like chat's unless the entry says
        ``backend_config.gpu: false``."""
        payload = to_embed_request(call.body, model=self._tag(call), keep_alive=self._keep_alive)
        dims = payload.get("dimensions")

        def reply(data: dict[str, Any]) -> dict[str, Any]:
            return embeddings_from_ollama(data, model=call.model, dimensions=dims)

        return await self._exchange(call, _Exchange("/api/embed", payload, reply))  # type: ignore[return-value]

    async def completions(self, call: ChatCall) -> Completion | ChunkStream:
        """``/v1/completions`` through ``/api/generate`` (``suffix`` for fill-in-the-middle), streamed as
        ``text_completion`` chunks."""
        payload = to_generate_request(
            call.body,
            model=self._tag(call),
            stream=call.stream,
            num_ctx=parse_num_ctx(call.entry.backend_config.extra_args),
            keep_alive=self._keep_alive,
        )
        echo = payload["prompt"] if call.body.get("echo") is True else None
        return await self._exchange(call, _Exchange(
            "/api/generate",
            payload,
            reply=lambda data: completion_from_generate(data, model=call.model, echo=echo),
            lines=lambda: GenerateTranslator(model=call.model, echo=echo),
        ))

    async def _exchange(self, call: ChatCall, ex: _Exchange) -> Completion | ChunkStream:
        base = self.base_url(call.entry)
        started = False
        while True:
            try:
                return await self._send(call, base, ex)
            except ProxyError as exc:
                # Connection refused: an autostart command for this entry may bring Ollama up; retry once.
                if not started and exc.code == "backend_unavailable":
                    started = True
                    if await ensure_started(self.app, call.entry, call):
                        continue
                # "does not support tools/thinking" (one at a time): send it again without them
                if ex.rebuild is not None and self.retry_refused(call, exc):
                    ex = attrs.evolve(ex, payload=ex.rebuild())
                    continue
                raise

    async def _send(self, call: ChatCall, base: str, ex: _Exchange) -> Completion | ChunkStream:
        lease = await self._acquire(call)
        if not call.stream:
            try:
                return await self._complete(call, base, ex)
            finally:
                lease.release()
        try:
            return await self._open_stream_kept_alive(call, base, ex, lease)
        except BaseException:
            lease.release()
            raise

    async def _open_stream_kept_alive(
        self, call: ChatCall, base: str, ex: _Exchange, lease: Lease
    ) -> ChunkStream:
        """Open the stream; if Ollama is slow to start it (loading the model), commit the SSE response and
        send keep-alives meanwhile. Fast failures stay JSON error responses."""
        opening = asyncio.ensure_future(self._open_stream(call, base, ex, lease))
        try:
            done, _ = await asyncio.wait({opening}, timeout=self.stream_commit_after_s)
            if not done:
                await call.waiting()
        except BaseException:
            opening.cancel()
            (result,) = await asyncio.gather(opening, return_exceptions=True)
            if isinstance(result, OllamaChunkStream):
                await result.aclose()
            raise
        return await opening

    async def _acquire(self, call: ChatCall) -> Lease:
        if not self.config.gpu_exclusive or call.entry.backend_config.gpu is False:
            return NoLease()
        started = time.perf_counter()
        lease = await tenancy(self.app).acquire(self.tenant, call)
        # Time spent waiting for the GPU (e.g. vLLM being stopped) is queue time in the request log.
        call.queue_ms += (time.perf_counter() - started) * 1000
        return lease

    async def _complete(self, call: ChatCall, base: str, ex: _Exchange) -> Completion:
        where = _where(call)
        with self._upstream_errors(call, base):
            resp = await self.upstream.post(
                base + ex.path, orjson.dumps(ex.payload), _JSON, connect_timeout=self._connect_s,
                timeout=self._backend_s,
            )
            async with resp:
                status = resp.status
                if status >= 400:
                    raw = await read_head(resp)
                else:
                    raw = await read_capped(resp, self.config.max_upstream_body_bytes, where)
        if status >= 400:
            raise self._http_error(status, raw, call, ex)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise ProxyError(502, "backend_error", f"{where} sent a reply that is not a JSON object")
        if data.get("error"):
            raise ProxyError(502, "backend_error", f"Ollama error: {json_error_message(raw)}")
        return ex.reply(data)

    async def _open_stream(self, call: ChatCall, base: str, ex: _Exchange, lease: Lease) -> ChunkStream:
        assert ex.lines is not None
        # No total timeout: the backend timeout covers the wait for the first line, the idle timeout each
        # later read.
        resp: UpstreamResponse | None = None
        try:
            with self._upstream_errors(call, base):
                async with asyncio.timeout(self._backend_s):
                    resp = await self.upstream.post(
                        base + ex.path, orjson.dumps(ex.payload), _JSON, connect_timeout=self._connect_s
                    )
                    if resp.status >= 400:
                        raise self._http_error(resp.status, await read_head(resp), call, ex)
                    stream = OllamaChunkStream(
                        resp, ex.lines(), where=_where(call), idle_s=self._idle_s, lease=lease
                    )
                    # Ollama sends its headers with the first line, so waiting for that line costs nothing and
                    # lets an immediate {"error": ...} line (e.g. a prompt the model cannot take) become a
                    # proper JSON error response instead of an in-band one.
                    await stream.prime()
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        return stream

    @contextlib.contextmanager
    def _upstream_errors(self, call: ChatCall, base: str) -> Iterator[None]:
        """Map transport failures talking to Ollama to the proxy's errors (docs/api.md); Ollama's address
        and the OS error go to the log, not to the client."""
        where = _where(call)
        try:
            yield
        except UpstreamConnectError as exc:
            error = unreachable(where, call.request_id, f"{base}: {_describe(exc)}", _START_HINT)
            error.hint = _START_ADVICE
            raise error from None
        except TimeoutError:
            raise ProxyError(
                504,
                "backend_timeout",
                f"{where} did not answer within {self.config.backend_timeout_ms} ms "
                "(CHAT_PROXY_BACKEND_TIMEOUT_MS)",
            ) from None
        except UpstreamBroken as exc:
            raise transport_failed(where, call.request_id, exc) from None

    def _http_error(self, status: int, raw: bytes, call: ChatCall, ex: _Exchange) -> ProxyError:
        message = json_error_message(raw)
        tag = ex.payload.get("model")
        if message is None:  # an HTML page or nothing: not Ollama's own answer
            return no_api_error(status, raw, _where(call))
        if status == 404:
            return ProxyError(
                404,
                "model_not_found",
                f"Model {call.model!r} (Ollama tag {tag!r}) is not available in Ollama: {message}",
                param="model",
                hint=f"install it with: ollama pull {tag}",
            )
        if status == 501 and ex.path == "/api/embed":
            # the model's runner was started without embeddings: it is not an embedding model
            return ProxyError(
                409,
                "capability_mismatch",
                f"Model {call.model!r} (Ollama tag {tag!r}) does not make embeddings; Ollama said: {message}",
                param="model",
            )
        if status >= 500:
            return ProxyError(502, "backend_error", f"{_where(call)} failed: {message}")
        return ProxyError(status, "backend_rejected", f"Ollama rejected the request: {message}")

    # -- GPU tenancy primitives ----------------------------------------------------------------
    def _bases_in_use(self) -> list[str]:
        bases = {self.base_url(e) for e in keys.models(self.app).entries_for(self)}
        return sorted(bases) or [
            apply_loopback_alias(self.config.ollama_base_url, self.config.loopback_alias)
        ]

    async def _ps(self, base: str) -> list[str] | None:
        """Names of the models loaded in the Ollama at ``base``; ``None`` when it cannot be asked."""
        try:
            timeout = aiohttp.ClientTimeout(total=min(PS_TIMEOUT_S, self._backend_s))
            async with self.http.get(f"{base}/api/ps", timeout=timeout) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            models = data.get("models") or []
            return [str(m.get("model") or m.get("name")) for m in models if m.get("model") or m.get("name")]
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            log.debug("ollama /api/ps at %s unavailable: %s", base, exc)
            return None

    async def loaded_models(self) -> list[str]:
        """Models Ollama holds in memory, over every Ollama base URL the registry uses (``/api/ps``).

        An Ollama that cannot be reached holds nothing as far as the GPU is concerned.
        """
        results = await asyncio.gather(*(self._ps(b) for b in self._bases_in_use()))
        return [name for names in results if names for name in names]

    async def unload_all(self) -> None:
        """Unload every loaded Ollama model (``keep_alive: 0``) and wait until ``/api/ps`` is empty.

        Raises :class:`ProxyError` 503 ``model_start_failed`` when models are still loaded after
        ``CHAT_PROXY_OLLAMA_STOP_TIMEOUT_S`` (the GPU is not free for the next tenant).
        """
        deadline = time.monotonic() + self.config.ollama_stop_timeout_s
        await asyncio.gather(*(self._unload_base(b, deadline) for b in self._bases_in_use()))

    async def _unload_base(self, base: str, deadline: float) -> None:
        loaded = await self._ps(base)
        if not loaded:
            return
        started = time.monotonic()
        log.info("unloading Ollama models at %s: %s", base, ", ".join(loaded))
        await asyncio.gather(*(self._unload(base, name, deadline) for name in loaded))
        while True:
            remaining = await self._ps(base)
            if not remaining:
                log.info("Ollama at %s unloaded its models in %.1f s", base, time.monotonic() - started)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProxyError(
                    503,
                    "model_start_failed",
                    f"Ollama at {base} still has {', '.join(remaining)} loaded after "
                    f"{self.config.ollama_stop_timeout_s:g} s (CHAT_PROXY_OLLAMA_STOP_TIMEOUT_S); "
                    "the GPU is not free",
                    headers={"Retry-After": "10"},
                )
            await asyncio.sleep(min(UNLOAD_POLL_S, left))

    async def _unload(self, base: str, name: str, deadline: float) -> None:
        # /api/generate with no prompt unloads any model, embedding-only ones included (/api/chat refuses
        # those).
        body = orjson.dumps({"model": name, "keep_alive": 0})
        try:
            timeout = aiohttp.ClientTimeout(total=max(deadline - time.monotonic(), 0.1))
            async with self.http.post(
                f"{base}/api/generate", data=body, headers=_JSON, timeout=timeout
            ) as resp:
                await resp.read()
                if resp.status >= 400:
                    log.warning("Ollama at %s refused to unload %s: HTTP %s", base, name, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("unloading %s from Ollama at %s failed: %s", name, base, _describe(exc))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(call: ChatCall) -> str:
    return f"Ollama for {call.model!r}"


@hookimpl
def register_backends(register):
    register(OllamaAdapter)
