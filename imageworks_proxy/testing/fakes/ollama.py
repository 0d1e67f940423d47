"""A fake Ollama speaking Ollama's native API (``/api/chat``, ``/api/generate``, ``/api/embed``,
``/api/tags``, ``/api/show``, ``/api/ps``), for tests.

Run it with ``aiohttp_server(fake.app())``. What it answers is scripted per request by
``fake.responder(body) -> Reply`` (chat) and ``fake.generate_responder(body) -> Reply`` (generate);
embeddings are deterministic vectors of the text. It validates requests the way Ollama does (content must
be a string, images raw base64, tool-call arguments objects, ``think`` true/false or
"low"/"medium"/"high"/"max", capabilities: ``completion`` for chat and generate, ``insert`` for a
``suffix``; a model without ``embedding`` answers ``/api/embed`` with 501 as Ollama's runner does) and
refuses what a tag lacks the capability for, with Ollama's messages: tools (400 "<name> does not support
tools"), thinking (400 "\"<model>\" does not support thinking"). Each tag's capabilities are in
``/api/show`` and, like recent Ollama, in ``/api/tags`` (``list_capabilities=False`` leaves them out there,
like older versions). It keeps the loaded-model state that ``/api/ps`` reports and ``keep_alive: 0`` clears.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
from aiohttp import web

from imageworks_proxy.testing.fakes.ollama_models import ModelRoutes


@attrs.define
class Reply:
    """One scripted answer of ``/api/chat``."""

    content: str = "Hello from the fake Ollama."
    thinking: str = ""
    #: Ollama-shaped calls: ``{"function": {"name": ..., "arguments": {...}}}`` (an ``id`` is optional).
    tool_calls: list[dict[str, Any]] = attrs.Factory(list)
    done_reason: str = "stop"
    prompt_eval_count: int | None = 11
    eval_count: int = 5
    #: Non-200: answer ``{"error": error}`` with this status before streaming.
    status: int = 200
    error: str | None = None
    #: Streaming: send ``{"error": error}`` as a line after this many content lines (status stays 200).
    error_after: int | None = None
    #: Streaming: after this many lines stop sending (connection kept open) until ``resume`` is set
    #: (then carry on) or the fake shuts down.
    stall_after: int | None = None
    resume: asyncio.Event | None = None
    #: Streaming: after this many lines close the stream without a ``done`` line.
    cut_after: int | None = None
    #: Characters per streamed content/thinking line.
    piece: int = 4
    #: Seconds before answering at all (headers included), like a model load; cut short by shutdown.
    delay_s: float = 0.0
    #: Streaming: seconds between lines.
    line_delay_s: float = 0.0
    #: Streaming: send the tool calls inside the ``done: true`` line (Ollama's built-in parsers do).
    calls_in_done: bool = False


#: The strings Ollama takes for ``think`` besides true/false.
THINK_LEVELS = ("low", "medium", "high", "max")


def _ollama_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return msg.get("content", "")
    return ""


def echo_responder(body: dict[str, Any]) -> Reply:
    """Default answer: echo the last user text, and count images; a tool result is quoted back."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return Reply(content=f"The tool {last.get('tool_name')} said: {last.get('content')}")
    images = sum(len(m.get("images") or ()) for m in messages)
    text = f"echo: {_last_user_text(messages)}"
    if images:
        text += f" [{images} image(s)]"
    return Reply(content=text, thinking="Let me think." if body.get("think") else "")


def echo_prompt(body: dict[str, Any]) -> Reply:
    """Default ``/api/generate`` answer: echo the prompt (thinking models think first, as Ollama's do)."""
    return Reply(content=f"echo: {body.get('prompt')}", thinking="Let me think.")


def text_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text`` (Ollama normalises its embeddings too)."""
    raw = hashlib.sha256(text.encode()).digest() * (dims // 32 + 1)
    vector = [b / 127.5 - 1.0 for b in raw[:dims]]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


class FakeOllama(ModelRoutes):
    """State and handlers of one fake Ollama server."""

    def __init__(
        self,
        models: dict[str, tuple[str, ...]] | None = None,
        *,
        responder: Callable[[dict[str, Any]], Reply] = echo_responder,
        generate_responder: Callable[[dict[str, Any]], Reply] = echo_prompt,
        list_capabilities: bool = True,
    ) -> None:
        #: Installed tags -> capabilities (``completion``, ``vision``, ``tools``, ``thinking``, ``insert``,
        #: ``embedding``).
        self.models: dict[str, tuple[str, ...]] = dict(
            models
            if models is not None
            else {"llama3.2:latest": ("completion", "tools", "vision", "thinking")}
        )
        self.responder = responder
        self.generate_responder = generate_responder
        #: Length of the vectors ``/api/embed`` makes; ``knows_dimensions`` False: ignore ``dimensions``
        #: (Ollama before it had the field).
        self.embedding_dims = 8
        self.knows_dimensions = True
        self.generates: list[dict[str, Any]] = []
        self.embeds: list[dict[str, Any]] = []
        #: Whether ``/api/tags`` lists each tag's capabilities (Ollama does since 2025; older ones do not).
        self.list_capabilities = list_capabilities
        self.chats: list[dict[str, Any]] = []
        #: Tags asked about through ``/api/show``, in order; how long each answer takes; the most answers
        #: under way at one time.
        self.shows: list[str] = []
        self.show_delay_s = 0.0
        self.shows_in_flight = 0
        self.most_shows_at_once = 0
        self.unloads: list[str] = []
        #: tag -> monotonic time it unloads (inf: kept loaded).
        self.loaded: dict[str, float] = {}
        #: How long a ``keep_alive: 0`` unload takes to show in ``/api/ps``; ``None``: never unloads.
        self.unload_delay_s: float | None = 0.0
        #: Streams whose client went away before the end (Ollama then stops generating).
        self.disconnects = 0
        self._shutdown = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_post("/api/show", self.show)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_get("/api/version", self.version)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        self._shutdown.set()

    async def _pause(self, seconds: float, until: asyncio.Event | None = None) -> None:
        """Sleep up to ``seconds``; end early at shutdown or when ``until`` is set."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._shutdown, until) if e is not None]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _resolve(self, name: Any) -> str | None:
        if not isinstance(name, str) or not name:
            return None
        tag = name if ":" in name else f"{name}:latest"
        return tag if tag in self.models else None

    def _schedule_unload(self, tag: str) -> None:
        self.unloads.append(tag)
        if self.unload_delay_s is not None and tag in self.loaded:
            self.loaded[tag] = time.monotonic() + self.unload_delay_s

    def loaded_now(self) -> list[str]:
        """The tags ``/api/ps`` lists now."""
        now = time.monotonic()
        for tag in [t for t, until in self.loaded.items() if until <= now]:
            del self.loaded[tag]
        return sorted(self.loaded)

    # -- validation, as Ollama's Go decoder and handlers do it --------------------------------
    def _check_messages(self, tag: str, body: dict[str, Any]) -> str | None:
        caps = self.models[tag]
        for msg in body.get("messages") or []:
            if not isinstance(msg.get("content", ""), str):
                return (
                    "json: cannot unmarshal array into Go struct field Message.messages.content "
                    "of type string"
                )
            for img in msg.get("images") or []:
                if not isinstance(img, str):
                    return "json: cannot unmarshal images"
                try:
                    base64.b64decode(img, validate=True)
                except (binascii.Error, ValueError):
                    return "illegal base64 data at input byte 0"
            for call in msg.get("tool_calls") or []:
                if not isinstance(call.get("function", {}).get("arguments", {}), dict):
                    return "json: cannot unmarshal string into Go struct field ToolCallFunction.arguments"
        think = body.get("think")
        if isinstance(think, str) and think not in THINK_LEVELS:
            return f'invalid think value: "{think}" (must be "high", "medium", "low", "max", true, or false)'
        # the order of Ollama's ChatHandler: thinking first, then the capabilities the scheduler checks
        if think not in (None, False) and "thinking" not in caps:
            return f'"{body["model"]}" does not support thinking'
        if body.get("tools") and "tools" not in caps:
            return f"registry.ollama.ai/library/{tag} does not support tools"
        return None

    # -- handlers ------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _ollama_error(400, "invalid character in request body")
        if not isinstance(body, dict) or not body.get("model"):
            return _ollama_error(400, "model is required")
        self.chats.append(body)
        tag = self._resolve(body["model"])
        if tag is None:
            return _ollama_error(404, f"model '{body['model']}' not found")
        problem = self._check_messages(tag, body)
        if problem:
            return _ollama_error(400, problem)
        keep_alive = body.get("keep_alive")
        if not body.get("messages"):
            # load / unload requests
            if keep_alive == 0:
                self._schedule_unload(tag)
                return web.json_response(
                    {
                        "model": tag,
                        "done": True,
                        "done_reason": "unload",
                        "message": {"role": "assistant", "content": ""},
                    }
                )
            self.loaded[tag] = float("inf")
            return web.json_response(
                {
                    "model": tag,
                    "done": True,
                    "done_reason": "load",
                    "message": {"role": "assistant", "content": ""},
                }
            )
        reply = self.responder(body)
        if reply.delay_s:
            await self._pause(reply.delay_s)
        if reply.status != 200:
            return _ollama_error(reply.status, reply.error or "internal error")
        self.loaded[tag] = float("inf")
        try:
            if body.get("stream", True):
                return await self._stream(request, tag, reply)
            return web.json_response(self._final(tag, reply, whole=True))
        finally:
            if keep_alive == 0:
                self._schedule_unload(tag)

    def _final(self, tag: str, reply: Reply, *, whole: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content if whole else ""}
        if whole and reply.thinking:
            message["thinking"] = reply.thinking
        if whole and reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        out: dict[str, Any] = {
            "model": tag,
            "created_at": "2026-01-05T10:00:00.3Z",
            "message": message,
            "done": True,
            "done_reason": reply.done_reason,
            "total_duration": 812000000,
            "load_duration": 3100000,
            "prompt_eval_duration": 90000000,
            "eval_count": reply.eval_count,
            "eval_duration": 610000000,
        }
        if reply.prompt_eval_count is not None:  # Ollama omits it when the prompt was cached
            out["prompt_eval_count"] = reply.prompt_eval_count
        return out

    async def _stream(self, request: web.Request, tag: str, reply: Reply) -> web.StreamResponse:
        lines: list[dict[str, Any]] = []

        def line(**message: Any) -> dict[str, Any]:
            return {
                "model": tag,
                "created_at": "2026-01-05T10:00:00.1Z",
                "message": {"role": "assistant", "content": "", **message},
                "done": False,
            }

        for i in range(0, len(reply.thinking), reply.piece):
            lines.append(line(thinking=reply.thinking[i : i + reply.piece]))
        for i in range(0, len(reply.content), reply.piece):
            lines.append(line(content=reply.content[i : i + reply.piece]))
        final = self._final(tag, reply, whole=False)
        if reply.tool_calls and reply.calls_in_done:
            final["message"]["tool_calls"] = reply.tool_calls  # as Ollama's built-in parsers can
        elif reply.tool_calls:
            lines.append(line(tool_calls=reply.tool_calls))  # Ollama sends each call whole, in one line
        return await self._send_lines(request, reply, lines, final)

    async def _send_lines(
        self, request: web.Request, reply: Reply, lines: list[dict[str, Any]], final: dict[str, Any]
    ) -> web.StreamResponse:
        """Stream NDJSON ``lines`` and the ``final`` (done) line, with the failures ``reply`` scripts."""
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        # Like Ollama (gin's c.Stream), headers go out with the first line.
        prepared = False
        try:
            for n, item in enumerate([*lines, None]):
                if reply.error is not None and reply.error_after == n:
                    item = {"error": reply.error}
                elif item is None:
                    item = final
                if reply.cut_after == n:
                    if not prepared:
                        await resp.prepare(request)
                    return resp  # ends the body without a done line
                if reply.stall_after == n:
                    if not prepared:
                        await resp.prepare(request)
                        prepared = True
                    await self._pause(30, until=reply.resume)
                    if reply.resume is None or not reply.resume.is_set():
                        return resp
                if not prepared:
                    await resp.prepare(request)
                    prepared = True
                elif reply.line_delay_s:
                    await self._pause(reply.line_delay_s)
                await resp.write(json.dumps(item).encode() + b"\n")
                if "error" in item:
                    break
            await resp.write_eof()
        except ConnectionError:
            self.disconnects += 1
        except asyncio.CancelledError:  # aiohttp cancels the handler when the client goes away
            self.disconnects += 1
            raise
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _ollama_error(400, "invalid character in request body")
        tag = self._resolve(body.get("model"))
        if tag is None:
            return _ollama_error(404, f"model '{body.get('model')}' not found")
        if not body.get("prompt") and body.get("keep_alive") == 0:
            self._schedule_unload(tag)
            return web.json_response({"model": tag, "response": "", "done": True, "done_reason": "unload"})
        caps = self.models[tag]
        if "completion" not in caps:
            return _ollama_error(400, f'"{body["model"]}" does not support generate')
        if body.get("suffix") and "insert" not in caps:
            return _ollama_error(400, f"registry.ollama.ai/library/{tag} does not support insert")
        if body.get("think") and "thinking" not in caps:
            return _ollama_error(400, f'"{body["model"]}" does not support thinking')
        self.loaded[tag] = float("inf")
        if not body.get("prompt"):
            return web.json_response({"model": tag, "response": "", "done": True, "done_reason": "load"})
        self.generates.append(body)
        reply = self.generate_responder(body)
        if reply.delay_s:
            await self._pause(reply.delay_s)
        if reply.status != 200:
            return _ollama_error(reply.status, reply.error or "internal error")
        thinking = reply.thinking if "thinking" in caps and body.get("think") is not False else ""
        text = reply.content
        limit = (body.get("options") or {}).get("num_predict")
        if isinstance(limit, int) and limit >= 0 and len(text) > limit * reply.piece:  # a piece is a token
            reply = attrs.evolve(reply, done_reason="length", eval_count=limit)
            text = text[: limit * reply.piece]
        final = {k: v for k, v in self._final(tag, reply, whole=False).items() if k != "message"}
        if body.get("stream", True):
            step = reply.piece
            pieces = [{"thinking": thinking[i : i + step]} for i in range(0, len(thinking), step)]
            pieces += [{"response": text[i : i + step]} for i in range(0, len(text), step)]
            lines = [{"model": tag, "created_at": final["created_at"], "response": "", **p, "done": False}
                     for p in pieces]
            return await self._send_lines(request, reply, lines, {**final, "response": "", "context": [1, 2]})
        whole = {**final, "response": text, "context": [1, 2]}
        if thinking:
            whole["thinking"] = thinking
        return web.json_response(whole)

    async def embed(self, request: web.Request) -> web.Response:
        """``/api/embed`` as Ollama answers it: input checked, then the model; a model whose runner cannot
        embed (no ``embedding`` capability) answers 501 with llama-server's message."""
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _ollama_error(400, "invalid character in request body")
        text = body.get("input")
        if isinstance(text, str):
            inputs = [text] if text else []
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            inputs = list(text)
        elif text is None:
            inputs = []
        else:
            return _ollama_error(400, "invalid input type")
        tag = self._resolve(body.get("model"))
        if tag is None:
            return _ollama_error(404, f"model '{body.get('model')}' not found")
        self.embeds.append(body)
        self.loaded[tag] = float("inf")
        if body.get("keep_alive") == 0:
            self._schedule_unload(tag)
        if not inputs:
            return web.json_response({"model": body["model"], "embeddings": []})
        if "embedding" not in self.models[tag]:
            return _ollama_error(501, "This server does not support embeddings. Start it with `--embeddings`")
        dims = (body.get("dimensions") or 0) if self.knows_dimensions else 0
        # cut to `dimensions` and normalised again: text_vector's first `dims` values, normalised
        size = dims if 0 < dims < self.embedding_dims else self.embedding_dims
        return web.json_response({
            "model": body["model"],
            "embeddings": [text_vector(item, size) for item in inputs],
            "total_duration": 14_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": sum(max(1, len(t.split())) for t in inputs),
        })


def ollama_entry(
    base_url: str | None,
    *,
    name: str = "llama3.2-3b",
    display_name: str = "llama3.2 3b",
    tag: str = "llama3.2:latest",
    vision: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """A registry entry for a model served by the fake (``base_url=None``: use CHAT_PROXY_OLLAMA_BASE_URL)."""
    backend_config: dict[str, Any] = {"model_path": f"ollama:/{tag}"}
    if base_url:
        backend_config["base_url"] = base_url
    backend_config.update(fields.pop("backend_config", {}))
    entry: dict[str, Any] = {
        "name": name,
        "display_name": display_name,
        "backend": "ollama",
        "backend_config": backend_config,
        "capabilities": {"vision": vision, "tools": True, "reasoning": True},
        "quantization": "q4_k_m",
        "metadata": {"ollama_family": "llama3.2", "ollama_parameter_size": "3.2B"},
    }
    entry.update(fields)
    return entry


if __name__ == "__main__":  # a real process: python -m imageworks_proxy.testing.fakes.ollama PORT
    import sys

    web.run_app(FakeOllama().app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
